"""Two `rasa run` processes behind one "load balancer", sharing the PostgreSQL tracker store
and the Redis lock store (POSTGRES_URL, REDIS_URL; both must be running: these tests fail, they
never skip). The care window decision is the same on both, and one template per lapsed window
holds across them and across a restart."""

import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from connector.signature import sign
from tests.stack import APP_SECRET, ROOT, FakeDesk, Stack, http, new_wa_id
from tests.test_e2e import webhook_from

pytestmark = [pytest.mark.e2e, pytest.mark.services]

HOUR = 3600
A, B = 0, 1


@pytest.fixture(scope="module")
def pair_and_desk(tmp_path_factory):
    stack = Stack(tmp_path_factory.mktemp("multi"), instances=2, shared=True, order_lookup_seconds=2)
    desk = FakeDesk(stack.agent_token)
    stack.desk_url = desk.url
    try:
        yield stack.start(), desk
    finally:
        stack.stop()
        desk.server.shutdown()


@pytest.fixture
def pair(pair_and_desk):
    return pair_and_desk[0]


def post_to(stack, instance, body):
    raw = json.dumps(body).encode()
    return http("POST", f"{stack.rasa_urls[instance]}/webhooks/whatsapp/webhook", raw,
                headers={"X-Hub-Signature-256": sign(raw, APP_SECRET)})[0]


def test_a_message_delivered_to_both_instances_while_one_handles_it_is_handled_once(pair, wa_id):
    pair.customer_says(wa_id, "hi")  # the simulator, like Meta, lets replies out only to customers who wrote
    pair.wait_outbound(wa_id, 1)
    wamid = f"wamid.twice{wa_id}"
    body = webhook_from(wa_id, [{"from": wa_id, "id": wamid, "timestamp": str(int(pair.sim_now())), "type": "text",
                                 "text": {"body": "where is order 10042"}}])
    assert post_to(pair, A, body) == 200
    time.sleep(0.5)  # A is in the middle of the turn (the order lookup takes 2 s)
    assert post_to(pair, B, body) == 200  # Meta's redelivery, landing on the other instance
    replies = pair.wait_outbound(wa_id, 2)
    assert "10042" in replies[-1]["payload"]["text"]["body"]
    time.sleep(3)
    assert len([m for m in pair.conversation(wa_id)["messages"] if m["direction"] == "out"]) == 2
    events = pair.tracker(wa_id, turns=2)["events"]
    assert [e["message_id"] for e in events if e["event"] == "user"][-1:] == [wamid]
    assert sum(e.get("message_id") == wamid for e in events) == 1
    assert "delivered again: done or being handled" in pair.log("rasa1")


def trigger(stack, wa_id, instance):
    stack.rasa("POST", f"/conversations/{wa_id}/trigger_intent?output_channel=whatsapp",
               {"name": "EXTERNAL_order_follow_up"}, instance=instance)


def kinds(stack, wa_id):
    return [m["type"] for m in stack.conversation(wa_id)["messages"] if m["direction"] == "out"]


def test_both_instances_decide_alike_and_one_template_holds_across_them_and_a_restart(pair, wa_id):
    violations_before = pair.stats()["window_violations"]
    # The customer writes through A (the simulator's webhook goes to A).
    pair.customer_says(wa_id, {"button_reply": {"id": "/opt_in", "title": "Order updates"}})
    pair.wait_outbound(wa_id, 1)
    pair.customer_says(wa_id, "where is order 10042")
    pair.wait_outbound(wa_id, 2)

    trigger(pair, wa_id, B)  # B sees A's customer messages: inside the window, free-form
    assert pair.wait_outbound(wa_id, 3)[-1]["payload"]["type"] == "text"
    assert pair.window(wa_id, A)["window_open"] is pair.window(wa_id, B)["window_open"] is True

    pair.sim("POST", "clock", {"advance": 30 * HOUR})
    trigger(pair, wa_id, B)
    assert pair.wait_outbound(wa_id, 4)[-1]["payload"]["type"] == "template"
    trigger(pair, wa_id, A)  # A knows B already sent this lapsed window's template
    assert pair.window(wa_id, A)["records"][-1]["kind"] == "suppressed"

    pair.stop_rasa(B)
    pair.start_rasa(B)
    trigger(pair, wa_id, B)  # the reservation lives in the shared state, not in B's memory
    assert pair.window(wa_id, B)["records"][-1]["kind"] == "suppressed"
    assert kinds(pair, wa_id) == ["text", "text", "text", "template"]
    assert pair.window(wa_id, B)["templates_sent"] == 1
    assert pair.stats()["window_violations"] == violations_before


def test_a_template_meta_paused_through_a_webhook_to_one_instance_is_not_sent_by_the_other(pair, wa_id):
    pair.customer_says(wa_id, {"button_reply": {"id": "/opt_in", "title": "Order updates"}})
    pair.wait_outbound(wa_id, 1)
    pair.customer_says(wa_id, "where is order 10042")
    pair.wait_outbound(wa_id, 2)
    pair.sim("POST", "clock", {"advance": 30 * HOUR})
    paused = pair.sim("POST", "templates/order_status_update/en_US", {"status": "PAUSED"})
    try:
        assert paused["webhooks"][0]["webhook_status"] == 200  # Meta's webhook went to A
        trigger(pair, wa_id, B)
        record = pair.window(wa_id, B)["records"][-1]
        assert record["kind"] == "suppressed"
        assert record["reason"] == "outside the care window and template order_status_update (en_US) is PAUSED at Meta"
    finally:
        pair.sim("POST", "templates/order_status_update/en_US", {"status": "APPROVED"})
    trigger(pair, wa_id, B)  # reinstated, through A again
    assert pair.wait_outbound(wa_id, 3)[-1]["payload"]["type"] == "template"


def test_simultaneous_triggers_on_both_instances_send_one_template(pair, wa_id):
    pair.customer_says(wa_id, {"button_reply": {"id": "/opt_in", "title": "Order updates"}})
    pair.wait_outbound(wa_id, 1)
    pair.customer_says(wa_id, "where is order 10046")
    pair.wait_outbound(wa_id, 2)
    pair.sim("POST", "clock", {"advance": 30 * HOUR})

    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(lambda instance: trigger(pair, wa_id, instance), [A, B, A, B]))

    assert kinds(pair, wa_id) == ["text", "text", "template"]
    decisions = pair.window(wa_id, A)["records"]
    assert [r["kind"] for r in decisions].count("template") == 1
    assert [r["kind"] for r in decisions].count("suppressed") == 3


@pytest.fixture(scope="module")
def unlocked_pair(tmp_path_factory):
    """Two instances whose lock stores are each their own process's memory: Rasa's lock does not
    serialise them, so only the care-window state's reservation stands between them."""
    stack = Stack(tmp_path_factory.mktemp("unlocked"), instances=2, shared=True, lock_store="in_memory")
    try:
        yield stack.start()
    finally:
        stack.stop()


def test_twenty_concurrent_triggers_on_two_unlocked_instances_send_one_template(unlocked_pair, wa_id):
    pair = unlocked_pair
    pair.customer_says(wa_id, {"button_reply": {"id": "/opt_in", "title": "Order updates"}})
    pair.wait_outbound(wa_id, 1)
    pair.rasa("POST", f"/conversations/{wa_id}/tracker/events?execute_side_effects=true&output_channel=whatsapp",
              [{"event": "slot", "name": "order_id", "value": "10042"}, {"event": "slot", "name": "order_status", "value": "shipped"}])
    pair.sim("POST", "clock", {"advance": 30 * HOUR})
    for instance in (A, B):  # a process's first prediction is slow: it would keep them apart
        trigger(pair, new_wa_id(), instance)
    # Meta is slow to answer the first send: a design that records the template only once it is
    # sent lets the other instance's decisions during those 2 s send a second one.
    pair.sim("PUT", "faults", {"responses": [{"delay": 2.0}]})

    with ThreadPoolExecutor(max_workers=20) as pool:
        list(pool.map(lambda n: trigger(pair, wa_id, n % 2), range(20)))
    pair.sim("DELETE", "faults")

    assert kinds(pair, wa_id) == ["text", "template"]
    records = pair.window(wa_id, A)["records"]
    assert [r["kind"] for r in records].count("template") == 1


def test_a_handoff_holds_on_both_instances_and_the_desk_hears_each_message_once(pair_and_desk, wa_id):
    pair, desk = pair_and_desk
    pair.customer_says(wa_id, "hi")
    pair.wait_outbound(wa_id, 1)
    assert pair.agent("POST", f"conversations/{wa_id}/handoff", {"reason": "on B"}, instance=B)[0] == 200
    for n, instance in enumerate((A, B, A), start=1):
        body = webhook_from(wa_id, [{"from": wa_id, "id": f"wamid.h{n}{wa_id}", "timestamp": str(int(pair.sim_now())),
                                     "type": "text", "text": {"body": f"message {n}"}}])
        assert post_to(pair, instance, body) == 200
        desk.wait(wa_id, "message", n)
    assert pair.agent("GET", f"conversations/{wa_id}", instance=A)[1]["paused"] is True
    assert wa_id in [c["sender_id"] for c in pair.agent("GET", "conversations", instance=A)[1]["conversations"]]
    status, sent = pair.agent("POST", f"conversations/{wa_id}/messages", {"text": "Sam here"}, instance=A)
    assert status == 200 and sent["decision"] == "free_form"
    assert pair.agent("POST", f"conversations/{wa_id}/resume", instance=B)[0] == 200
    assert pair.wait_outbound(wa_id, 3)[-1]["payload"]["text"]["body"].startswith("I'm back!")
    desk.wait(wa_id, "resumed")
    time.sleep(2)  # both instances deliver desk events: none twice
    assert [e["event"] for e in desk.of(wa_id)] == ["handoff", "message", "message", "message", "resumed"]
    assert [e["text"] for e in desk.of(wa_id, "message")] == ["message 1", "message 2", "message 3"]
    out = [m["payload"] for m in pair.conversation(wa_id)["messages"] if m["direction"] == "out"]
    assert len(out) == 3 and out[1]["text"]["body"] == "Sam here"


def test_customers_of_two_runs_never_meet_in_the_shared_stores():
    """PostgreSQL and Redis outlive a test run, and two fresh CI containers start pytest with the
    same PID: a customer of this run must not inherit an earlier run's tracker or templates."""
    def one_run():
        code = "import os; os.getpid = lambda: 4321; from tests.stack import new_wa_id; print(new_wa_id())"
        return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()

    first, second = one_run(), one_run()
    assert first != second
    assert first.isdigit() and len(first) <= 15  # still a phone number
