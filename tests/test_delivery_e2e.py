"""No customer message is lost or handled twice, end to end: real `rasa run`, the action server
and the simulator as processes, killed, stopped and overloaded for real. The order-status action
takes 3 s (a slow order system), so a turn can be caught in the middle."""

import threading
import time

import pytest

from tests.stack import Stack, http, new_wa_id

pytestmark = pytest.mark.e2e

ORDER = "where is my order 10042"
LOOKUP_SECONDS = 3.0
DEADLINE_SECONDS = 4.0
SECOND_NUMBER = "222222222222222"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    stack = Stack(
        tmp_path_factory.mktemp("delivery"), tracker_store="tests.faulty_store.FaultySQLTrackerStore",
        order_lookup_seconds=LOOKUP_SECONDS, extra_numbers=(SECOND_NUMBER,),
        redeliver_delays="1,2,4,8,15,30,30,30,30,30",
        channel_settings={"shutdown_deadline_seconds": DEADLINE_SECONDS},
    )
    try:
        yield stack.start()
    finally:
        stack.stop()


def outbound(stack, wa_id):
    return [m for m in stack.conversation(wa_id)["messages"] if m["direction"] == "out"]


def user_turns(stack, wa_id, turns):
    return [e["message_id"] for e in stack.tracker(wa_id, turns=turns, timeout=30)["events"] if e["event"] == "user"]


def inbox(stack, wa_id):
    return {entry["message_id"]: entry for entry in stack.window(wa_id)["inbox"]}


def test_a_turn_cut_short_by_kill_9_is_answered_once_by_the_restarted_instance(stack):
    wa_id = new_wa_id()
    wamid = stack.customer_says(wa_id, ORDER)["wamid"]
    time.sleep(LOOKUP_SECONDS / 2)  # Rasa is waiting for the order system
    assert outbound(stack, wa_id) == [] and inbox(stack, wa_id)[wamid]["state"] == "pending"
    stack.kill_rasa()
    stack.start_rasa()
    (reply,) = stack.wait_outbound(wa_id, 1, timeout=30)
    assert "10042" in reply["payload"]["text"]["body"]
    time.sleep(LOOKUP_SECONDS + 1)  # a second answer would have come by now
    assert len(outbound(stack, wa_id)) == 1
    assert user_turns(stack, wa_id, 1) == [wamid]
    assert inbox(stack, wa_id)[wamid]["state"] == "done"
    assert "left by this instance's last run" in stack.log("rasa")  # taken over at start, not after the lease


def test_the_answer_comes_once_the_action_server_is_back_after_30_s(stack):
    wa_id = new_wa_id()
    stack.stop_actions()
    try:
        wamid = stack.customer_says(wa_id, ORDER)["wamid"]
        time.sleep(30)
        entry = inbox(stack, wa_id)[wamid]
        assert outbound(stack, wa_id) == []
        assert entry["state"] == "pending" and entry["attempts"] >= 4 and "action server" in entry["error"]
    finally:
        stack.start_actions()
    (reply,) = stack.wait_outbound(wa_id, 1, timeout=60)
    assert "10042" in reply["payload"]["text"]["body"]
    assert user_turns(stack, wa_id, 1) == [wamid]  # the failed attempts left no turn behind
    assert inbox(stack, wa_id)[wamid]["state"] == "done"


def test_a_message_refused_when_the_inbox_could_not_be_written_is_handled_once_on_redelivery(stack):
    wa_id = new_wa_id()
    stack.fail_store("INSERT INTO whatsapp_inbox", 1)
    answer = stack.customer_says(wa_id, "hi")
    assert answer["webhook_status"] == 503 and answer["redelivery"] == "queued"
    stack.wait_outbound(wa_id, 1, timeout=30)
    time.sleep(2)
    assert len(outbound(stack, wa_id)) == 1
    assert user_turns(stack, wa_id, 1) == [answer["wamid"]]
    (inbound,) = [m for m in stack.conversation(wa_id)["messages"] if m["direction"] == "in"]
    assert (inbound["delivery_attempts"], inbound["webhook_status"]) == (2, 200)


def test_a_message_for_another_business_number_is_acknowledged_and_left_alone(stack):
    wa_id = new_wa_id()
    answer = stack.customer_says(wa_id, {"text": "hi", "phone_number_id": "999999999999999"})
    assert answer["webhook_status"] == 200
    time.sleep(2)
    (inbound,) = stack.conversation(wa_id)["messages"]
    assert inbound["read_by_phone_number_id"] is None and inbound["status"] != "read"
    assert user_turns(stack, wa_id, 0) == []
    assert "999999999999999 are ignored" in stack.log("rasa")


def test_replies_leave_from_the_number_the_customer_wrote_to(stack):
    wa_id = new_wa_id()
    stack.customer_says(wa_id, {"text": "hi", "phone_number_id": SECOND_NUMBER})
    (reply,) = stack.wait_outbound(wa_id, 1)
    assert reply["from_phone_number_id"] == SECOND_NUMBER
    (inbound,) = [m for m in stack.conversation(wa_id)["messages"] if m["direction"] == "in"]
    assert inbound["read_by_phone_number_id"] == SECOND_NUMBER
    assert stack.window(wa_id)["reply_number"] == SECOND_NUMBER
    stack.kill_rasa()
    stack.start_rasa()  # a message the bot starts itself, from a process that never saw the customer
    stack.rasa("POST", f"/conversations/{wa_id}/trigger_intent?output_channel=whatsapp", {"name": "greet"})
    assert stack.wait_outbound(wa_id, 2)[-1]["from_phone_number_id"] == SECOND_NUMBER


def test_sigterm_under_traffic_exits_within_the_deadline_and_the_next_start_answers_the_rest(stack):
    customers = [new_wa_id() for _ in range(4)]
    sent = {wa_id: [stack.customer_says(wa_id, ORDER)["wamid"] for _ in range(2)] for wa_id in customers}
    time.sleep(0.5)  # each customer's first lookup is running; the second waits behind it
    stopped = {}
    stopping = threading.Thread(target=lambda: stopped.setdefault("seconds", stack.terminate_rasa()))
    stopping.start()
    time.sleep(1)
    late = new_wa_id()
    refused = stack.customer_says(late, "hi")  # while shutting down
    stopping.join(timeout=60)
    assert refused["webhook_status"] == 503 and refused["redelivery"] == "queued"
    assert stopped["seconds"] < DEADLINE_SECONDS + 6, stopped
    answered_before = {wa_id: len(outbound(stack, wa_id)) for wa_id in customers}
    assert sum(answered_before.values()) < 2 * len(customers)  # some were cut short by the deadline

    stack.start_rasa()
    for wa_id in customers:
        replies = stack.wait_outbound(wa_id, 2, timeout=60)
        assert all("10042" in r["payload"]["text"]["body"] for r in replies)
    stack.wait_outbound(late, 1, timeout=60)  # the simulator delivered it again
    time.sleep(LOOKUP_SECONDS + 1)
    for wa_id in customers:
        assert len(outbound(stack, wa_id)) == 2
        assert user_turns(stack, wa_id, 2) == sent[wa_id]


def test_a_storm_of_2000_messages_meets_503s_and_every_message_is_answered_exactly_once(stack):
    status, intake = http("GET", f"{stack.rasa_url}/webhooks/whatsapp/intake?token={stack.auth_token}")
    assert status == 200 and intake["max_in_flight"] == 200
    status, burst = http("POST", f"{stack.sim_url}/_sim/burst", {"count": 2000, "customers": 200, "concurrency": 200,
                                                               "text": "hi"}, timeout=300)
    assert status == 200, burst
    assert burst["first_answers"].get("503", 0) > 0, burst["first_answers"]
    assert set(burst["first_answers"]) <= {"200", "503", "unreachable"}  # a full listen backlog resets some
    print("first answers:", burst["first_answers"], "in", burst["seconds"], "s")
    for wa_id in burst["wa_ids"]:  # everything refused is delivered again, and answered
        stack.wait_outbound(wa_id, 10, timeout=120)
    time.sleep(2)
    for wa_id in burst["wa_ids"]:
        messages = stack.conversation(wa_id)["messages"]
        inbound = [m for m in messages if m["direction"] == "in"]
        assert len(inbound) == 10 and all(m["webhook_status"] == 200 for m in inbound), wa_id
        assert len([m for m in messages if m["direction"] == "out"]) == 10, wa_id
    status, intake = http("GET", f"{stack.rasa_url}/webhooks/whatsapp/intake?token={stack.auth_token}")
    assert intake["in_flight"] == 0 and intake["refused_webhooks"] >= burst["first_answers"]["503"]
