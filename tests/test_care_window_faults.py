"""The care window's promise under faults, through real `rasa run`, the action server and the
simulator: answers Meta took but never sent back, 131047 reported later in a status webhook, a
tracker store whose database fails for a while, a `kill -9` in the middle of a send, concurrent
triggers, and a stale numbered list. Each of these failed on the previous version."""

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.stack import Stack, http
from tests.test_care_window_e2e import opted_in_customer_with_a_shipped_order, outbound_types, push_events, trigger

pytestmark = pytest.mark.e2e

HOUR = 3600
ORDER_UPDATE = {
    "event": "bot", "text": "Update on your order 10042: it is now shipped.",
    "metadata": {"utter_action": "utter_order_update", "order_id": "10042", "order_status": "shipped"},
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """SQLite through a tracker store that fails on demand; the client gives up on an answer
    after 1 s; the follow-up reminder fires 4 s after an order check."""
    stack = Stack(tmp_path_factory.mktemp("faults"), follow_up_seconds=4,
                  tracker_store="tests.faulty_store.FaultySQLTrackerStore",
                  channel_settings={"request_timeout": 1})
    try:
        yield stack.start()
    finally:
        stack.heal_store()
        stack.stop()


@pytest.fixture(autouse=True)
def healthy_store_afterwards(stack):
    yield
    stack.heal_store()
    stack.sim("DELETE", "faults")


def records(stack, wa_id):
    return stack.window(wa_id)["records"]


def wait_until(check, timeout=15, what="the condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def opted_in_with_an_order_in_the_slots(stack, wa_id):
    """Like checking an order, without the follow-up reminder that the check schedules."""
    stack.customer_says(wa_id, {"button_reply": {"id": "/opt_in", "title": "Order updates"}})
    stack.wait_outbound(wa_id, 1)
    push_events(stack, wa_id, [{"event": "slot", "name": "order_id", "value": "10042"},
                               {"event": "slot", "name": "order_status", "value": "shipped"}])


def templates_at_the_simulator(stack, wa_id):
    return outbound_types(stack, wa_id).count("template")


def test_a_template_meta_took_without_answering_goes_out_once(stack, wa_id):
    opted_in_customer_with_a_shipped_order(stack, wa_id)
    stack.sim("PUT", "faults", {"responses": [{"hold": 3}]})  # accepted, answered after the client gave up
    stack.sim("POST", "clock", {"advance": 30 * HOUR})  # the reminder fires: the template
    stack.wait_outbound(wa_id, 3, timeout=20)
    template = wait_until(lambda: next((r for r in records(stack, wa_id) if r["kind"] in ("template", "unknown")), None),
                          what="the template's record")
    assert template["decision"] == "template"
    for _ in range(2):
        trigger(stack, wa_id)
    assert templates_at_the_simulator(stack, wa_id) == 1
    assert [r["kind"] for r in records(stack, wa_id)][-2:] == ["suppressed", "suppressed"]
    # Meta's statuses, matched by the callback id, settle the send whose wamid never came back.
    settled = wait_until(lambda: next((r for r in records(stack, wa_id)
                                       if r["decision"] == "template" and r["status"] in ("sent", "delivered", "read")), None),
                         what="the template's status")
    sim_wamid = [m for m in stack.conversation(wa_id)["messages"] if m["type"] == "template"][0]["wamid"]
    assert settled["wamid"] == sim_wamid


def test_a_free_form_message_meta_took_without_answering_is_not_sent_twice(stack, wa_id):
    stack.customer_says(wa_id, "hi")
    stack.wait_outbound(wa_id, 1)
    stack.sim("PUT", "faults", {"responses": [{"hold": 0, "drop": True}]})
    push_events(stack, wa_id, [{"event": "bot", "text": "One moment, checking."}])
    time.sleep(1)
    messages = stack.wait_outbound(wa_id, 2)
    assert [m["payload"]["text"]["body"] for m in messages[1:]] == ["One moment, checking."]
    assert records(stack, wa_id)[-1]["status"] in ("sent", "delivered", "read")


def test_131047_in_a_status_webhook_sends_the_fallback_template_once(stack, wa_id):
    violations_before = stack.stats()["window_violations"]
    opted_in_customer_with_a_shipped_order(stack, wa_id)
    stack.sim("POST", "clock", {"advance": 5})
    stack.sim("PUT", "faults", {"responses": [{"async_code": 131047}]})  # 200 now, `failed` later
    push_events(stack, wa_id, [ORDER_UPDATE])
    messages = stack.wait_outbound(wa_id, 4)
    assert [m["type"] for m in messages] == ["text", "text", "text", "template"]
    assert messages[-1]["payload"]["template"]["components"] == [
        {"type": "body", "parameters": [{"type": "text", "text": "10042"}, {"type": "text", "text": "shipped"}]}
    ]
    refused, fallback = records(stack, wa_id)[-2:]
    assert (refused["kind"], refused["code"], fallback["kind"]) == ("failed", 131047, "template")
    assert fallback["fallback_of"] == refused["callback_id"]

    push_events(stack, wa_id, [{"event": "bot", "text": "Anything else?"}])  # nothing free-form now
    assert records(stack, wa_id)[-1]["kind"] == "suppressed"
    push_events(stack, wa_id, [ORDER_UPDATE])  # and no second template for this window
    assert "1 template(s) already sent" in records(stack, wa_id)[-1]["reason"]
    assert len(stack.wait_outbound(wa_id, 4)) == 4

    stack.sim("POST", "clock", {"advance": 5})
    stack.customer_says(wa_id, "thanks")  # the customer writes: a new window
    assert stack.wait_outbound(wa_id, 5)[-1]["type"] == "text"
    assert stack.stats()["window_violations"] == violations_before


def test_a_state_read_that_fails_once_does_not_reset_the_count(stack, wa_id):
    opted_in_customer_with_a_shipped_order(stack, wa_id)
    stack.sim("POST", "clock", {"advance": 30 * HOUR})
    assert stack.wait_outbound(wa_id, 3, timeout=20)[-1]["type"] == "template"  # the reminder
    stack.fail_store("whatsapp_customers", 1)
    push_events(stack, wa_id, [ORDER_UPDATE])  # the bot's message, decided while the read fails
    assert "care window state unavailable" in records(stack, wa_id)[-1]["reason"]
    trigger(stack, wa_id)
    trigger(stack, wa_id)
    assert "1 template(s) already sent" in records(stack, wa_id)[-1]["reason"]
    assert templates_at_the_simulator(stack, wa_id) == 1


def test_an_opt_out_while_the_store_fails_is_stored_once_it_is_back(stack, wa_id):
    opted_in_customer_with_a_shipped_order(stack, wa_id)
    # The channel's own reads and writes of the tracker fail (Rasa's turns still work).
    stack.fail_store("events", -1, off_loop_only=True)
    stack.customer_says(wa_id, "STOP")  # the opt-out keyword: stored by the channel before the bot confirms
    wait_until(lambda: "not stored yet" in stack.log("rasa"), what="the failed opt-out write")
    stack.sim("POST", "clock", {"advance": 30 * HOUR})
    trigger(stack, wa_id)
    assert records(stack, wa_id)[-1]["kind"] == "suppressed"

    stack.heal_store()
    wait_until(lambda: stack.tracker(wa_id)["slots"]["whatsapp_opt_in"] is False, timeout=20,
               what="the opt-out in the tracker")
    trigger(stack, wa_id)
    assert "not opted in" in records(stack, wa_id)[-1]["reason"]
    assert templates_at_the_simulator(stack, wa_id) == 0


def test_twenty_concurrent_triggers_send_one_template(stack, wa_id):
    opted_in_with_an_order_in_the_slots(stack, wa_id)
    stack.sim("POST", "clock", {"advance": 23 * HOUR + 59 * 60 + 30})  # inside the margin: closed
    with ThreadPoolExecutor(max_workers=20) as pool:
        list(pool.map(lambda _: trigger(stack, wa_id), range(20)))
    time.sleep(1)
    assert templates_at_the_simulator(stack, wa_id) == 1
    kinds = [r["kind"] for r in records(stack, wa_id)]
    assert kinds.count("template") == 1 and kinds.count("suppressed") >= 19


def test_a_crash_between_send_and_record_sends_no_second_template(stack, wa_id):
    opted_in_with_an_order_in_the_slots(stack, wa_id)
    stack.sim("POST", "clock", {"advance": 30 * HOUR})
    stack.sim("PUT", "faults", {"responses": [{"hold": 0.8}]})  # answered just before the 1 s timeout
    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(lambda: http("POST", f"{stack.rasa_url}/conversations/{wa_id}/trigger_intent"
                                 f"?output_channel=whatsapp&token={stack.auth_token}",
                                 {"name": "EXTERNAL_order_follow_up"}, timeout=5))
        stack.wait_outbound(wa_id, 2, timeout=20)  # Meta has it; its answer is still on the way
        stack.kill_rasa()
    stack.start_rasa()
    trigger(stack, wa_id)
    trigger(stack, wa_id)
    assert templates_at_the_simulator(stack, wa_id) == 1
    assert "1 template(s) already sent" in records(stack, wa_id)[-1]["reason"]


def test_a_typed_number_maps_only_to_the_latest_numbered_list(stack, wa_id):
    stack.customer_says(wa_id, "hi")
    stack.wait_outbound(wa_id, 1)
    buttons = [{"title": f"Option {n}", "payload": "/order_status" if n == 2 else f"Option {n}"} for n in range(1, 13)]
    push_events(stack, wa_id, [{"event": "bot", "text": "Pick one", "data": {"buttons": buttons}}])
    stack.wait_outbound(wa_id, 2)
    stack.customer_says(wa_id, "2")  # answers the list: its payload
    stack.wait_outbound(wa_id, 3)
    push_events(stack, wa_id, [{"event": "bot", "text": "How many items did you order?"}])
    stack.wait_outbound(wa_id, 4)
    stack.customer_says(wa_id, "2")  # answers the question: just "2"
    stack.wait_outbound(wa_id, 5)
    said = [e["text"] for e in stack.tracker(wa_id, turns=3)["events"] if e["event"] == "user"]
    assert said[-2:] == ["/order_status", "2"]


def test_rasa_run_refuses_to_start_when_the_state_tables_cannot_be_created(tmp_path):
    broken = Stack(tmp_path, tracker_store="tests.faulty_store.FaultySQLTrackerStore")
    broken.fail_store("whatsapp_customers", -1)  # e.g. a database user without DDL rights
    try:
        try:  # Rasa may answer /status in the moment between its own start and the channel's failing
            broken.start()
        except RuntimeError:
            pass
        rasa = broken.processes["rasa"]
        assert rasa.wait(timeout=60) != 0
        log = broken.log("rasa")
        assert "care-window tables could not be created" in log and "CREATE TABLE whatsapp_customers" in log
    finally:
        broken.stop()


def test_a_reservation_that_cannot_be_written_suppresses_and_no_ledger_tracker_appears(stack, wa_id):
    import sqlite3

    opted_in_with_an_order_in_the_slots(stack, wa_id)
    stack.sim("POST", "clock", {"advance": 30 * HOUR})
    stack.fail_store("INSERT INTO whatsapp_template_reservations", 1)  # the read works, the write fails
    push_events(stack, wa_id, [ORDER_UPDATE])
    assert "reservation could not be written" in records(stack, wa_id)[-1]["reason"]
    assert templates_at_the_simulator(stack, wa_id) == 0  # suppressed, never sent
    push_events(stack, wa_id, [ORDER_UPDATE])  # the slot was never taken: the template goes out
    assert stack.wait_outbound(wa_id, 2)[-1]["type"] == "template"
    with sqlite3.connect(stack.workdir / "tracker.db") as db:  # the state is not a conversation
        senders = [row[0] for row in db.execute("SELECT DISTINCT sender_id FROM events")]
    assert senders and not [s for s in senders if not s[:1].isdigit()]
