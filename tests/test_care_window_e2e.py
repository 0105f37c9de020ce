"""The care window on every path a bot message takes, through real `rasa run`, the action
server and the simulator (which, like Meta, fails free-form messages outside the window with
131047 and counts each one). Hours pass on the simulator's clock, which the channel reads."""

import time

import pytest

pytestmark = pytest.mark.e2e

HOUR = 3600


def outbound_types(stack, wa_id):
    return [m["type"] for m in stack.conversation(wa_id)["messages"] if m["direction"] == "out"]


def trigger(stack, wa_id, intent="EXTERNAL_order_follow_up"):
    stack.rasa("POST", f"/conversations/{wa_id}/trigger_intent?output_channel=whatsapp", {"name": intent})


def push_events(stack, wa_id, events):
    stack.rasa("POST", f"/conversations/{wa_id}/tracker/events?execute_side_effects=true&output_channel=whatsapp", events)


def last_record(stack, wa_id):
    return stack.window(wa_id)["records"][-1]


def wait_for_record(stack, wa_id, kind, timeout=15):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        decisions = stack.window(wa_id)["records"]
        if decisions and decisions[-1]["kind"] == kind:
            return decisions[-1]
        time.sleep(0.1)
    raise AssertionError(f"no {kind} decision for {wa_id}: {stack.window(wa_id)}")


def opted_in_customer_with_a_shipped_order(stack, wa_id):
    stack.customer_says(wa_id, {"button_reply": {"id": "/opt_in", "title": "Order updates"}})
    stack.wait_outbound(wa_id, 1)
    stack.customer_says(wa_id, "where is order 10042")
    stack.wait_outbound(wa_id, 2)


def test_customer_writes_reminder_30h_later_trigger_reply_trigger(stack, wa_id):
    """free-form, one template, nothing, free-form, free-form — and never a 131047."""
    violations_before = stack.stats()["window_violations"]
    opted_in_customer_with_a_shipped_order(stack, wa_id)
    assert outbound_types(stack, wa_id) == ["text", "text"]

    stack.sim("POST", "clock", {"advance": 30 * HOUR})  # the follow-up reminder fires 4 s after the check
    messages = stack.wait_outbound(wa_id, 3, timeout=20)
    template = messages[-1]["payload"]
    assert template["type"] == "template"
    assert template["template"]["name"] == "order_status_update"
    assert template["template"]["components"] == [
        {"type": "body", "parameters": [{"type": "text", "text": "10042"}, {"type": "text", "text": "shipped"}]}
    ]

    trigger(stack, wa_id)  # a second business-initiated message in the same lapsed window
    record = last_record(stack, wa_id)
    assert record["kind"] == "suppressed" and "1 template(s) already sent" in record["reason"]
    assert outbound_types(stack, wa_id) == ["text", "text", "template"]

    stack.customer_says(wa_id, "thanks")  # the customer replies: a new window
    stack.wait_outbound(wa_id, 4)
    trigger(stack, wa_id)
    messages = stack.wait_outbound(wa_id, 5)
    assert messages[-1]["payload"]["text"]["body"].startswith("A quick update: Order 10042")
    assert outbound_types(stack, wa_id) == ["text", "text", "template", "text", "text"]
    assert stack.stats()["window_violations"] == violations_before

    view = stack.window(wa_id)
    assert view["window_open"] is True and view["opt_in"] is True
    delivered = [d["status"] for d in view["records"] if d["kind"] in ("free_form", "template")]
    assert delivered and all(status in ("sent", "delivered", "read") for status in delivered[:-1])
    assert view["expires_at"] == pytest.approx(view["last_inbound_at"] + 24 * HOUR - 60)


def test_window_slots_let_the_dialogue_branch(stack, wa_id):
    opted_in_customer_with_a_shipped_order(stack, wa_id)
    trigger(stack, wa_id)
    stack.wait_outbound(wa_id, 3)
    slots = stack.tracker(wa_id, turns=3)["slots"]
    assert slots["whatsapp_window_open"] is True
    assert slots["whatsapp_window_expires_at"] > stack.sim_now() + 23 * HOUR


def test_agent_reply_inside_the_window_goes_out_and_outside_is_suppressed_and_recorded(stack, wa_id):
    stack.customer_says(wa_id, "hi")
    stack.wait_outbound(wa_id, 1)
    push_events(stack, wa_id, [{"event": "bot", "text": "Hi, Sam from support here."}])
    assert stack.wait_outbound(wa_id, 2)[-1]["payload"]["text"]["body"] == "Hi, Sam from support here."

    stack.sim("POST", "clock", {"advance": 25 * HOUR})
    push_events(stack, wa_id, [{"event": "bot", "text": "Are you still there?"}])
    record = last_record(stack, wa_id)
    assert record["kind"] == "suppressed"
    assert record["reason"] == "outside the care window and no template is mapped for a message without a response name"
    assert len(stack.wait_outbound(wa_id, 2)) == 2
    assert stack.window(wa_id)["records"][-1]["kind"] == "suppressed"  # kept in the shared state


def test_window_outlives_rasa_session_expiry(stack, wa_id):
    stack.customer_says(wa_id, "hi")
    stack.wait_outbound(wa_id, 1)
    # A new Rasa session, as after 60 idle minutes: retrieve() no longer returns the message.
    push_events(stack, wa_id, [{"event": "session_started"}, {"event": "action", "name": "action_listen"}])
    stack.sim("POST", "clock", {"advance": 2 * HOUR})
    push_events(stack, wa_id, [{"event": "bot", "text": "Following up on your question."}])
    assert stack.wait_outbound(wa_id, 2)[-1]["payload"]["text"]["body"] == "Following up on your question."


def test_a_message_written_25h_ago_is_answered_outside_the_window(stack, wa_id):
    """Meta redelivers for days: the late message is processed, the reply judged by its timestamp."""
    violations_before = stack.stats()["window_violations"]
    sent = stack.customer_says(wa_id, {"text": "hi", "timestamp": int(stack.sim_now() - 25 * HOUR)})
    record = wait_for_record(stack, wa_id, "suppressed")
    assert record["response"] == "utter_greet"
    user_events = [e for e in stack.tracker(wa_id, turns=1)["events"] if e["event"] == "user"]
    assert [e["message_id"] for e in user_events] == [sent["wamid"]]  # not dropped
    assert stack.stats()["window_violations"] == violations_before


def test_stop_keyword_opts_out_without_nlu_and_blocks_templates(stack, wa_id):
    opted_in_customer_with_a_shipped_order(stack, wa_id)
    stack.customer_says(wa_id, "STOP")
    assert "won't send you order updates" in stack.wait_outbound(wa_id, 3)[-1]["payload"]["text"]["body"]
    assert stack.tracker(wa_id, turns=3)["slots"]["whatsapp_opt_in"] is False
    user_event = [e for e in stack.tracker(wa_id, turns=3)["events"] if e["event"] == "user"][-1]
    assert user_event["parse_data"]["intent"]["name"] == "opt_out"

    stack.sim("POST", "clock", {"advance": 30 * HOUR})
    trigger(stack, wa_id)
    record = last_record(stack, wa_id)
    assert record["kind"] == "suppressed" and "not opted in" in record["reason"]
    assert outbound_types(stack, wa_id) == ["text", "text", "text"]


def test_meta_refusing_synchronously_closes_the_window_and_falls_back_to_the_template(stack, wa_id):
    opted_in_customer_with_a_shipped_order(stack, wa_id)
    stack.sim("PUT", "faults", {"responses": [{"status": 400, "code": 131047}]})
    push_events(stack, wa_id, [{
        "event": "bot", "text": "Update on your order 10042: it is now shipped.",
        "metadata": {"utter_action": "utter_order_update", "order_id": "10042", "order_status": "shipped"},
    }])
    messages = stack.wait_outbound(wa_id, 3)
    assert messages[-1]["payload"]["type"] == "template"
    view = stack.window(wa_id)
    assert view["window_open"] is False and view["closed_by_meta_for"] == view["last_inbound_at"]
    refused, template = view["records"][-2:]
    assert (refused["kind"], refused["code"], template["kind"]) == ("failed", 131047, "template")
    assert template["fallback_of"] == refused["callback_id"]


def test_meta_failing_a_message_later_closes_the_window(stack, wa_id):
    stack.customer_says(wa_id, "hi")
    stack.wait_outbound(wa_id, 1)
    stack.sim("POST", "clock", {"advance": 5})  # WhatsApp timestamps have whole seconds
    stack.sim("PUT", "faults", {"responses": [{"async_code": 131047}]})
    push_events(stack, wa_id, [{"event": "bot", "text": "One more thing."}])
    stack.wait_outbound(wa_id, 2)
    deadline = time.monotonic() + 15
    while stack.window(wa_id)["window_open"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert stack.window(wa_id)["window_open"] is False
    push_events(stack, wa_id, [{"event": "bot", "text": "Hello?"}])
    assert last_record(stack, wa_id)["kind"] == "suppressed"
    assert len(stack.wait_outbound(wa_id, 2)) == 2
    stack.sim("POST", "clock", {"advance": 5})
    stack.customer_says(wa_id, "hello")  # the customer writes: open again
    assert len(stack.wait_outbound(wa_id, 3)) == 3


def test_conversation_view_needs_the_token(stack, wa_id):
    from tests.stack import http

    assert http("GET", f"{stack.rasa_url}/webhooks/whatsapp/conversations/{wa_id}")[0] == 401
    assert http("GET", f"{stack.rasa_url}/webhooks/whatsapp/conversations/{wa_id}?token=wrong")[0] == 401
