"""Human handoff through real `rasa run`, the action server, the simulator and a fake desk: the
bot hands over, the customer's messages reach the desk and not the bot (across a Rasa session
expiry too), the agent answers under the care window's rules, and hands back."""

import sqlite3
import time

import pytest

from tests.stack import FakeDesk, Stack, new_wa_id

pytestmark = pytest.mark.e2e

HOUR = 3600
MARGIN = 60  # care_window_margin_seconds: the channel stops free-form this long before Meta's end


@pytest.fixture(scope="module")
def desk_and_stack(tmp_path_factory):
    stack = Stack(tmp_path_factory.mktemp("handoff"))
    desk = FakeDesk(stack.agent_token)
    stack.desk_url = desk.url
    try:
        yield desk, stack.start()
    finally:
        stack.stop()
        desk.server.shutdown()


@pytest.fixture
def desk(desk_and_stack):
    return desk_and_stack[0]


@pytest.fixture
def stack(desk_and_stack):
    return desk_and_stack[1]


def texts(stack, wa_id):
    return [m["payload"].get("text", {}).get("body") or f"[{m['payload']['type']}]"
            for m in stack.conversation(wa_id)["messages"] if m["direction"] == "out"]


def bot_stays_silent(stack, desk, wa_id, said, forwarded):
    """The message reached the desk (so Rasa handled and saved it) and nothing went to the customer."""
    before = texts(stack, wa_id)
    stack.customer_says(wa_id, said)
    desk.wait(wa_id, "message", forwarded)
    stack.tracker(wa_id, turns=0)
    time.sleep(1)
    assert texts(stack, wa_id) == before


def test_talk_to_a_person_pauses_the_bot_forwards_text_and_media_and_resume_brings_it_back(stack, desk):
    wa_id = new_wa_id()
    violations = stack.stats()["window_violations"]
    stack.customer_says(wa_id, "where is order 10042")
    stack.wait_outbound(wa_id, 1)
    stack.customer_says(wa_id, {"button_reply": {"id": "/human_handoff", "title": "Talk to a person"}})
    assert "colleague" in stack.wait_outbound(wa_id, 2)[-1]["payload"]["text"]["body"]

    (handoff,) = desk.wait(wa_id, "handoff")
    assert handoff["reason"] == "the bot ran action_hand_off"
    said = [(m["direction"], m["by"], m["text"]) for m in handoff["messages"]]
    assert said[0] == ("in", "customer", "where is order 10042") and ("in", "customer", "Talk to a person") in said
    assert any(direction == "out" and "10042" in (text or "") for direction, _, text in said)
    assert handoff["window_expires_at"] > stack.sim_now()

    bot_stays_silent(stack, desk, wa_id, "hello? is anyone there", 1)
    bot_stays_silent(stack, desk, wa_id, {"image": {"caption": "the parcel"}}, 2)
    text, image = desk.of(wa_id, "message")
    assert (text["type"], text["text"]) == ("text", "hello? is anyone there")
    assert text["window_expires_at"] == text["timestamp"] + 24 * HOUR - MARGIN and text["wamid"].startswith("wamid.")
    assert image["type"] == "image" and image["media"]["id"] and image["text"] == "the parcel"

    status, view = stack.agent("GET", f"conversations/{wa_id}")
    assert status == 200 and view["paused"] is True and view["window_open"] is True
    assert view["handoff"]["reason"] == "the bot ran action_hand_off" and view["desk_backlog"] == []
    assert [m["text"] for m in view["messages"] if m["direction"] == "in"][-2:] == ["hello? is anyone there", "the parcel"]
    status, listed = stack.agent("GET", "conversations")
    assert wa_id in [c["sender_id"] for c in listed["conversations"]]

    status, sent = stack.agent("POST", f"conversations/{wa_id}/messages", {"text": "Hi, Sam here. Let me check."})
    assert status == 200 and sent["decision"] == "free_form" and sent["wamid"]
    assert texts(stack, wa_id)[-1] == "Hi, Sam here. Let me check."
    stored = [e for e in stack.tracker(wa_id)["events"] if e["event"] == "bot"][-1]
    assert stored["text"] == "Hi, Sam here. Let me check." and stored["metadata"]["whatsapp"]["agent"] is True

    status, _ = stack.agent("POST", f"conversations/{wa_id}/resume")
    assert status == 200
    assert stack.wait_outbound(wa_id, 4)[-1]["payload"]["text"]["body"].startswith("I'm back!")
    desk.wait(wa_id, "resumed")
    stack.customer_says(wa_id, "where is order 10042")
    assert "10042" in stack.wait_outbound(wa_id, 5)[-1]["payload"]["text"]["body"]
    assert stack.agent("GET", f"conversations/{wa_id}")[1]["paused"] is False
    assert wa_id not in [c["sender_id"] for c in stack.agent("GET", "conversations")[1]["conversations"]]
    assert [e["event"] for e in desk.of(wa_id)] == ["handoff", "message", "message", "resumed"]
    assert stack.stats()["window_violations"] == violations and desk.bad_signatures == 0


def test_handoff_by_the_api_then_the_window_lapses_text_refused_and_one_template(stack, desk):
    wa_id = new_wa_id()
    violations = stack.stats()["window_violations"]
    stack.customer_says(wa_id, {"button_reply": {"id": "/opt_in", "title": "Order updates"}})
    stack.wait_outbound(wa_id, 1)
    status, answer = stack.agent("POST", f"conversations/{wa_id}/handoff", {"reason": "refund over 100 EUR"})
    assert status == 200 and answer["paused"] is True
    assert desk.wait(wa_id, "handoff")[0]["reason"] == "refund over 100 EUR"
    assert len(texts(stack, wa_id)) == 1  # the handoff itself says nothing to the customer
    bot_stays_silent(stack, desk, wa_id, "I want my money back", 1)
    last_message = desk.of(wa_id, "message")[0]["timestamp"]

    stack.sim("POST", "clock", {"advance": 25 * HOUR})
    status, refused = stack.agent("POST", f"conversations/{wa_id}/messages", {"text": "Sorry for the wait!"})
    assert status == 409
    assert refused == {
        "error": "care_window_closed", "window_open": False, "expired_at": last_message + 24 * HOUR - MARGIN,
        "opt_in": True, "templates_left": 1, "templates": ["order_status_update"],
        "reason": "outside the care window: only a template can reach the customer now",
    }
    template = {"template": {"name": "order_status_update", "language": "en_US", "body": ["10042", "refunded"]}}
    status, sent = stack.agent("POST", f"conversations/{wa_id}/messages", template)
    assert status == 200 and sent["decision"] == "template" and sent["wamid"]
    status, again = stack.agent("POST", f"conversations/{wa_id}/messages", template)
    assert status == 409 and again["templates_left"] == 0 and "1 template(s) already sent" in again["reason"]

    out = [m["payload"] for m in stack.conversation(wa_id)["messages"] if m["direction"] == "out"]
    assert [m["type"] for m in out] == ["text", "template"]
    assert out[-1]["template"]["components"][0]["parameters"][1] == {"type": "text", "text": "refunded"}
    view = stack.agent("GET", f"conversations/{wa_id}")[1]
    decisions = [(m["by"], m["decision"]) for m in view["messages"] if m["direction"] == "out"]
    assert decisions[-3:] == [("agent", "suppressed"), ("agent", "template"), ("agent", "suppressed")]
    assert stack.stats()["window_violations"] == violations

    stack.customer_says(wa_id, "thanks, got it")  # a reply opens a new window: free-form again
    desk.wait(wa_id, "message", 2)
    status, sent = stack.agent("POST", f"conversations/{wa_id}/messages", {"text": "You're welcome!"})
    assert status == 200 and sent["decision"] == "free_form"


def test_window_closing_is_sent_once_at_the_lead_time(stack, desk):
    wa_id = new_wa_id()
    stack.customer_says(wa_id, "hi")
    stack.wait_outbound(wa_id, 1)
    assert stack.agent("POST", f"conversations/{wa_id}/handoff", {})[0] == 200
    bot_stays_silent(stack, desk, wa_id, "still there?", 1)
    last_message = desk.of(wa_id, "message")[0]["timestamp"]

    stack.sim("POST", "clock", {"now": last_message + 22 * HOUR})
    time.sleep(7)  # more than a sweep: too early to warn
    assert desk.of(wa_id, "window_closing") == []
    stack.sim("POST", "clock", {"now": last_message + 23 * HOUR + 60})
    (closing,) = desk.wait(wa_id, "window_closing")
    assert closing["window_expires_at"] == last_message + 24 * HOUR - MARGIN and 0 < closing["seconds_left"] <= HOUR
    time.sleep(7)
    assert len(desk.of(wa_id, "window_closing")) == 1
    status, sent = stack.agent("POST", f"conversations/{wa_id}/messages", {"text": "Here's the answer in time."})
    assert status == 200 and sent["decision"] == "free_form"


def test_a_customer_writing_after_the_rasa_session_expired_still_reaches_the_agent(stack, desk):
    wa_id = new_wa_id()
    stack.customer_says(wa_id, {"button_reply": {"id": "/human_handoff", "title": "Talk to a person"}})
    stack.wait_outbound(wa_id, 1)
    desk.wait(wa_id, "handoff")
    stack.tracker(wa_id, turns=1)
    # Two hours pass for Rasa (its 60-minute session expires): its events are aged in its store.
    with sqlite3.connect(stack.workdir / "tracker.db") as db:
        db.execute("UPDATE events SET timestamp = timestamp - 7200, "
                   "data = json_set(data, '$.timestamp', json_extract(data, '$.timestamp') - 7200) WHERE sender_id = ?",
                   (wa_id,))
    bot_stays_silent(stack, desk, wa_id, "hello again, any news?", 1)
    events = stack.tracker(wa_id)["events"]
    starts = [i for i, e in enumerate(events) if e["event"] == "session_started"]
    assert len(starts) == 2 and any(e["event"] == "pause" for e in events[starts[-1]:])
    assert stack.agent("GET", f"conversations/{wa_id}")[1]["paused"] is True
    assert len(desk.of(wa_id, "handoff")) == 1


def test_a_desk_that_is_down_loses_nothing_and_keeps_the_order(stack, desk):
    wa_id = new_wa_id()
    stack.customer_says(wa_id, "hi")
    stack.wait_outbound(wa_id, 1)
    assert stack.agent("POST", f"conversations/{wa_id}/handoff", {"reason": "vip"})[0] == 200
    desk.wait(wa_id, "handoff")
    desk.down = True
    try:
        for n in range(1, 4):
            stack.customer_says(wa_id, f"message {n}")
            stack.tracker(wa_id, turns=1 + n)
        deadline = time.monotonic() + 20
        while len(stack.agent("GET", f"conversations/{wa_id}")[1]["desk_backlog"]) < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        backlog = stack.agent("GET", f"conversations/{wa_id}")[1]["desk_backlog"]
        assert [e["event"] for e in backlog] == ["message"] * 3 and backlog[0]["attempts"] >= 1
        assert "503" in backlog[0]["error"]
        time.sleep(3)
    finally:
        desk.down = False
    forwarded = desk.wait(wa_id, "message", 3, timeout=60)
    assert [e["text"] for e in forwarded] == ["message 1", "message 2", "message 3"]
    assert desk.refused >= 2 and stack.agent("GET", f"conversations/{wa_id}")[1]["desk_backlog"] == []


def test_the_agent_api_answers_only_with_the_agent_token(stack):
    wa_id = new_wa_id()
    assert stack.agent("GET", f"conversations/{wa_id}", token="")[0] == 401
    assert stack.agent("POST", f"conversations/{wa_id}/handoff", {}, token="not-the-token")[0] == 403
    assert stack.agent("POST", f"conversations/{wa_id}/messages", {"text": "hi"}, token=stack.auth_token)[0] == 403
    status, bad = stack.agent("POST", f"conversations/{wa_id}/messages", {"txt": "hi"})
    assert status == 400 and "txt" in bad["error"]
    status, bad = stack.agent("POST", f"conversations/{wa_id}/messages", {"template": {"name": "Order Update"}})
    assert status == 400 and "template.name" in bad["error"]
    assert stack.window(wa_id)["records"] == []  # nothing was decided, let alone sent
