"""The metrics through real processes (`rasa run`, the action server, the simulator): after a short
conversation, `GET /webhooks/whatsapp/metrics` agrees with what the simulator received and with the
channel's own records. A stack of its own, so the simulator's counters are this conversation's."""

import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.stack import Stack, http, new_wa_id

pytestmark = pytest.mark.e2e

HOUR = 3600


def samples(text):
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def total(text, name, **labels):
    """The sum over the series of `name` whose labels include `labels`."""
    return sum(s.value for s in samples(text) if s.name == name and labels.items() <= s.labels.items())


def scrape(stack):
    status, text = http("GET", f"{stack.rasa_url}/webhooks/whatsapp/metrics",
                        headers={"Authorization": f"Bearer {stack.auth_token}"})
    assert status == 200, text
    return text


def wait_for(check, timeout=15):
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def own_stack(tmp_path_factory):
    stack = Stack(tmp_path_factory.mktemp("metrics-e2e"), follow_up_seconds=4)
    try:
        yield stack.start()
    finally:
        stack.stop()


def test_metrics_agree_with_the_simulator_and_the_records(own_stack):
    stack, wa_id = own_stack, new_wa_id()
    assert http("GET", f"{stack.rasa_url}/webhooks/whatsapp/metrics")[0] == 401
    assert http("GET", f"{stack.rasa_url}/webhooks/whatsapp/metrics",
                headers={"Authorization": "Bearer wrong"})[0] == 401

    stack.customer_says(wa_id, {"button_reply": {"id": "/opt_in", "title": "Order updates"}})
    stack.wait_outbound(wa_id, 1)
    stack.customer_says(wa_id, "where is order 10042")  # schedules the follow-up, 4 s later
    stack.wait_outbound(wa_id, 2)
    stack.sim("POST", "clock", {"advance": 30 * HOUR})  # the follow-up goes out as the template
    messages = stack.wait_outbound(wa_id, 3, timeout=20)
    assert messages[-1]["type"] == "template"
    stack.rasa("POST", f"/conversations/{wa_id}/trigger_intent?output_channel=whatsapp",
               {"name": "EXTERNAL_order_follow_up"})  # a second one in the lapsed window: suppressed
    wait_for(lambda: any(r["kind"] == "suppressed" for r in stack.window(wa_id)["records"]))
    stack.customer_says(wa_id, "thanks")  # a new window: free-form again
    stack.wait_outbound(wa_id, 4)
    stack.tracker(wa_id, turns=3)  # the last turn saved, its reply recorded

    stats = stack.stats()
    records = stack.window(wa_id)["records"]
    # the template's billable `sent` status has come back, and so has every reply's decision
    wait_for(lambda: total(scrape(stack), "whatsapp_billable_messages_total", category="utility") == 1)
    text = scrape(stack)

    sent = total(text, "whatsapp_outbound_messages_total", decision="free_form") + \
        total(text, "whatsapp_outbound_messages_total", decision="template")
    assert sent == stats["accepted"] == len(stack.wait_outbound(wa_id, 4))
    assert total(text, "whatsapp_outbound_messages_total", decision="template") == 1
    assert total(text, "whatsapp_outbound_messages_total", decision="failed") == 0
    assert total(text, "whatsapp_inbound_messages_total") == stats["inbound_messages"] == 3
    assert total(text, "whatsapp_inbound_messages_total", type="interactive") == 1
    assert total(text, "whatsapp_inbound_messages_total", type="text") == 2
    suppressed = [r for r in records if r["kind"] == "suppressed"]
    assert total(text, "whatsapp_suppressed_total") == len(suppressed) == 1
    assert total(text, "whatsapp_outbound_messages_total", decision="suppressed") == 1
    assert total(text, "whatsapp_suppressed_total", reason="template_limit") == 1
    assert "1 template(s) already sent" in suppressed[0]["reason"]
    assert total(text, "whatsapp_graph_errors_total") == sum(stats["rejected"].values()) == 0
    assert total(text, "whatsapp_duplicates_total") == stats["redeliveries"] == 0
    assert total(text, "whatsapp_graph_request_seconds_count", operation="send") == stats["accepted"]
    assert total(text, "whatsapp_graph_request_seconds_count", operation="mark_read") == stats["marked_read"]
    assert total(text, "whatsapp_graph_request_seconds_count", operation="templates") >= 1  # the startup sync
    assert total(text, "whatsapp_webhook_ack_seconds_count") >= 3  # every webhook: messages and statuses
    assert wa_id not in text
