"""Prometheus metrics through the real blueprint (Sanic's ASGI client, Rasa's `register`), with
the Cloud API simulator in-process for what Meta answers: the route and its token, inbound by
type, decisions and suppressions by reason code, Graph errors by code, retries, redeliveries,
billable pricing, and no customer id in any label."""

import asyncio
import json
import logging
import time

import pytest
from aiohttp import web
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from connector.channel import WhatsAppInput, WhatsAppOutput
from connector.metrics import INBOUND_TYPES, Metrics
from connector.window import SuppressReason
from tests.fixtures.loader import webhook, webhook_body
from tests.test_channel import CREDENTIALS, RecordingAgent, make_app, post
from connector.simulator import Settings, create_app
from tests.test_client import CUSTOMER, PNID, SECRET, TOKEN, Sim, _serve, make_sim  # noqa: F401  (a fixture)
from tests.test_intake import FlakyAgent, settled

METRICS = "/webhooks/whatsapp/metrics"
SENDER = "16315551181"  # the fixtures' customer
ORDER_UPDATE = {"utter_order_update": {"name": "order_status_update", "language": "en_US",
                                       "body": ["{order_id}", "{order_status}"]}}


def value(text, name, **labels):
    """The sample's value in Prometheus text, 0 when the series is not there."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return 0.0


async def scrape(app, token="view"):
    _, response = await app.asgi_client.get(METRICS, headers={"Authorization": f"Bearer {token}"})
    assert response.status == 200, response.text
    return response.text


class ReplyingAgent(RecordingAgent):
    """Answers every message with one bot message, as Rasa's turn would."""

    def __init__(self, reply=None):
        super().__init__()
        self.reply = reply or {"text": "Let me look that up", "utter_action": "utter_looking"}

    async def handle_message(self, message):
        await message.output_channel.send_response(message.sender_id, dict(self.reply))
        self.messages.append(message)


def channel_with(agent=None, **settings):
    channel = WhatsAppInput.from_credentials({**CREDENTIALS, "api_token": "view", **settings})
    channel.intake.first_retry_seconds = 0.01
    return channel, make_app(channel, agent or RecordingAgent())


async def start(app):
    """The long-lived test server is up and the channel's state open."""
    _, response = await app.asgi_client.get("/webhooks/whatsapp/")
    assert response.status == 200


# --- the route --------------------------------------------------------------------------------


@pytest.mark.parametrize("headers, status", [({}, 401), ({"Authorization": "Bearer wrong"}, 401)])
async def test_the_metrics_route_wants_the_api_token_like_the_conversation_view(headers, status):
    _, app = channel_with()
    _, metrics = await app.asgi_client.get(METRICS, headers=headers)
    _, view = await app.asgi_client.get(f"/webhooks/whatsapp/conversations/{SENDER}", headers=headers)
    assert metrics.status == view.status == status
    assert "whatsapp_" not in metrics.text


async def test_without_an_api_token_the_metrics_route_is_off_like_the_conversation_view():
    channel = WhatsAppInput.from_credentials(CREDENTIALS)
    app = make_app(channel)
    _, metrics = await app.asgi_client.get(METRICS, headers={"Authorization": "Bearer anything"})
    _, view = await app.asgi_client.get(f"/webhooks/whatsapp/conversations/{SENDER}")
    assert metrics.status == view.status == 404 and "api_token" in metrics.json["error"]


async def test_the_right_token_gets_prometheus_text_with_every_fixed_series_at_zero():
    _, app = channel_with()
    _, response = await app.asgi_client.get(METRICS, headers={"Authorization": "Bearer view"})
    assert response.status == 200
    assert response.headers["content-type"] == CONTENT_TYPE_LATEST and CONTENT_TYPE_LATEST.startswith("text/plain")
    text = response.text
    for name, kind in [("whatsapp_inbound_messages", "counter"), ("whatsapp_outbound_messages", "counter"),
                       ("whatsapp_suppressed", "counter"), ("whatsapp_graph_errors", "counter"),
                       ("whatsapp_retries", "counter"), ("whatsapp_duplicates", "counter"),
                       ("whatsapp_billable_messages", "counter"), ("whatsapp_graph_request_seconds", "histogram"),
                       ("whatsapp_webhook_ack_seconds", "histogram")]:
        assert f"# TYPE {name}{'_total' if kind == 'counter' else ''} {kind}" in text, name
    for code in SuppressReason:  # alerts on a reason work before its first suppression
        assert f'whatsapp_suppressed_total{{reason="{code.value}"}} 0.0' in text
    for decision in ("free_form", "template", "suppressed", "failed", "unknown"):
        assert f'whatsapp_outbound_messages_total{{decision="{decision}"}} 0.0' in text
    _, by_query = await app.asgi_client.get(f"{METRICS}?token=view")  # as the conversation view takes it
    assert by_query.status == 200


def test_each_channel_counts_in_a_registry_of_its_own():
    first, second = Metrics(), Metrics()
    first.inbound("text")
    assert value(first.exposition().decode(), "whatsapp_inbound_messages_total", type="text") == 1
    assert value(second.exposition().decode(), "whatsapp_inbound_messages_total", type="text") == 0


def test_label_values_are_bounded():
    metrics = Metrics()
    metrics.inbound("a_type_meta_adds_next_year")
    metrics.inbound(None)
    metrics.billable("something_new")
    metrics.graph_error(None, answered=False)
    metrics.graph_error(None, answered=True)
    metrics.graph_error(131047)
    text = metrics.exposition().decode()
    assert value(text, "whatsapp_inbound_messages_total", type="other") == 2
    assert value(text, "whatsapp_billable_messages_total", category="other") == 1
    assert value(text, "whatsapp_graph_errors_total", code="transport") == 1
    assert value(text, "whatsapp_graph_errors_total", code="none") == 1
    assert value(text, "whatsapp_graph_errors_total", code="131047") == 1
    assert "a_type_meta_adds_next_year" not in text and "something_new" not in text
    assert "text" in INBOUND_TYPES and "interactive" in INBOUND_TYPES and "call" in INBOUND_TYPES


# --- inbound, redeliveries, acks, turn retries ---------------------------------------------------


async def test_inbound_messages_are_counted_by_whatsapp_type():
    channel, app = channel_with()
    for name in ("text", "image", "location", "contacts", "interactive_button_reply", "button_template_quick_reply",
                 "batch_three_customers", "reaction", "status_read"):
        assert (await post(app, webhook_body(name))).status == 200, name
    await settled(channel)
    text = await scrape(app)
    assert value(text, "whatsapp_inbound_messages_total", type="text") == 4  # one, and a batch of three
    for kind in ("image", "location", "contacts", "interactive", "button"):
        assert value(text, "whatsapp_inbound_messages_total", type=kind) == 1, kind
    assert value(text, "whatsapp_inbound_messages_total", type="reaction") == 0  # recorded, not for Rasa
    assert sum(value(text, "whatsapp_inbound_messages_total", type=kind) for kind in INBOUND_TYPES) == 9
    assert value(text, "whatsapp_webhook_ack_seconds_count") == 9  # every webhook answered is timed
    assert value(text, "whatsapp_duplicates_total") == 0


async def test_a_redelivered_message_counts_as_a_duplicate_not_as_inbound():
    channel, app = channel_with()
    for _ in range(3):
        assert (await post(app, webhook_body("text"))).status == 200
    await settled(channel)
    text = await scrape(app)
    assert value(text, "whatsapp_inbound_messages_total", type="text") == 1
    assert value(text, "whatsapp_duplicates_total") == 2
    assert value(text, "whatsapp_webhook_ack_seconds_count") == 3


async def test_refused_and_forged_webhooks_are_timed_too_but_count_nothing():
    channel, app = channel_with()
    assert (await post(app, webhook_body("text"), signature="sha256=" + "0" * 64)).status == 403
    assert (await post(app, b"not json")).status == 400
    text = await scrape(app)
    assert value(text, "whatsapp_webhook_ack_seconds_count") == 2
    assert value(text, "whatsapp_inbound_messages_total", type="text") == 0


async def test_a_failed_turn_that_is_retried_counts_turn_retries():
    channel, app = channel_with(FlakyAgent(failures=2))
    assert (await post(app, webhook_body("text"))).status == 200
    await settled(channel)
    text = await scrape(app)
    assert value(text, "whatsapp_retries_total", kind="turn") == 2
    assert value(text, "whatsapp_retries_total", kind="send") == 0


# --- decisions and suppressions by reason code -----------------------------------------------------


async def test_a_template_to_a_customer_who_never_opted_in_is_suppressed_as_no_opt_in(caplog):
    channel, app = channel_with(templates=ORDER_UPDATE)
    await start(app)
    with caplog.at_level(logging.INFO, logger="connector.decisions"):
        await WhatsAppOutput(channel).send_response(
            SENDER, {"text": "Order 10042 has shipped", "utter_action": "utter_order_update",
                     "order_id": "10042", "order_status": "shipped"})
    text = await scrape(app)
    assert value(text, "whatsapp_suppressed_total", reason="no_opt_in") == 1
    assert value(text, "whatsapp_outbound_messages_total", decision="suppressed") == 1
    assert sum(value(text, "whatsapp_suppressed_total", reason=code.value) for code in SuppressReason) == 1
    (line,) = [r.getMessage() for r in caplog.records if r.name == "connector.decisions"]
    logged = json.loads(line.split(" ", 1)[1])
    assert logged["decision"] == "suppressed" and logged["reason_code"] == "no_opt_in"
    assert logged["reason"] == "outside the care window and the customer has not opted in"  # the text stays


async def test_templates_past_the_limit_unmapped_and_unfillable_have_their_own_codes():
    channel, app = channel_with(templates=ORDER_UPDATE, opt_in_collected_elsewhere=True)
    await start(app)
    sent = []

    async def send_message(to, message, phone_number_id=None, callback_id=None):
        sent.append(message["type"])
        return f"wamid.out{len(sent)}"

    channel.client.send_message = send_message
    update = {"text": "x", "utter_action": "utter_order_update", "order_id": "10042", "order_status": "shipped"}
    for _ in range(2):  # one template per lapsed window
        await WhatsAppOutput(channel).send_response(SENDER, dict(update))
    await WhatsAppOutput(channel).send_response("16315551182", {"text": "bye", "utter_action": "utter_goodbye"})
    await WhatsAppOutput(channel).send_response("16315551182", {"text": "x", "utter_action": "utter_order_update"})
    assert sent == ["template"]
    text = await scrape(app)
    assert value(text, "whatsapp_outbound_messages_total", decision="template") == 1
    assert value(text, "whatsapp_outbound_messages_total", decision="suppressed") == 3
    assert value(text, "whatsapp_suppressed_total", reason="template_limit") == 1
    assert value(text, "whatsapp_suppressed_total", reason="no_template") == 1
    assert value(text, "whatsapp_suppressed_total", reason="template_unfillable") == 1
    assert value(text, "whatsapp_suppressed_total", reason="no_opt_in") == 0


async def test_an_agent_message_outside_the_window_is_409_chosen_by_reason_code():
    channel, app = channel_with(ReplyingAgent(), agent_token="agent-secret")
    await start(app)
    _, answer = await app.asgi_client.post(
        f"/webhooks/whatsapp/agent/conversations/{SENDER}/messages", content=json.dumps({"text": "Hi, Sam here"}),
        headers={"Authorization": "Bearer agent-secret"})
    assert answer.status == 409 and answer.json["error"] == "care_window_closed"
    assert answer.json["reason"] == "outside the care window: only a template can reach the customer now"
    assert value(await scrape(app), "whatsapp_suppressed_total", reason="no_template") == 1


async def test_an_agent_message_with_the_state_unreadable_is_503_chosen_by_reason_code():
    channel, app = channel_with(ReplyingAgent(), agent_token="agent-secret")
    await start(app)

    async def unreadable(sender_id):
        raise ConnectionError("database down")

    channel.state.customer = unreadable
    _, answer = await app.asgi_client.post(
        f"/webhooks/whatsapp/agent/conversations/{SENDER}/messages", content=json.dumps({"text": "Hi"}),
        headers={"Authorization": "Bearer agent-secret"})
    assert answer.status == 503 and answer.json["error"] == "care_window_unknown"
    assert "care window unknown" in answer.json["reason"]
    assert value(await scrape(app), "whatsapp_suppressed_total", reason="state_unknown") == 1


# --- what Meta answers: the simulator in-process ---------------------------------------------------


def sim_channel(sim, agent=None, **settings):
    return channel_with(agent or ReplyingAgent(), access_token=TOKEN, api_url=sim.url, **settings)


async def forward(app, sim, since=0):
    """The simulator's webhooks to the bot (it posts them to a recorder) into the blueprint."""
    for body in sim.bot_posts[since:]:
        assert (await post(app, json.dumps(body).encode())).status == 200
    return len(sim.bot_posts)


async def test_a_graph_error_is_counted_by_its_code_and_the_send_as_failed(make_sim):  # noqa: F811
    sim = await make_sim()
    channel, app = sim_channel(sim)
    await sim.customer_says(CUSTOMER, text="where is my order")
    await sim.faults({"status": 400, "code": 131026})
    await forward(app, sim)
    await settled(channel)
    text = await scrape(app)
    assert value(text, "whatsapp_graph_errors_total", code="131026") == 1
    assert value(text, "whatsapp_outbound_messages_total", decision="failed") == 1
    assert value(text, "whatsapp_outbound_messages_total", decision="free_form") == 0
    assert value(text, "whatsapp_graph_request_seconds_count", operation="send") == 1
    assert value(text, "whatsapp_retries_total", kind="send") == 0
    assert value(text, "whatsapp_inbound_messages_total", type="text") == 1
    assert CUSTOMER not in text


async def test_a_retried_rate_limit_counts_a_send_retry_every_request_and_one_free_form(make_sim):  # noqa: F811
    sim = await make_sim()
    channel, app = sim_channel(sim)
    await sim.customer_says(CUSTOMER, text="hi")
    await sim.faults({"status": 429, "code": 130429})
    await forward(app, sim)
    await settled(channel)
    assert (await sim.stats())["accepted"] == 1
    text = await scrape(app)
    assert value(text, "whatsapp_graph_errors_total", code="130429") == 1
    assert value(text, "whatsapp_retries_total", kind="send") == 1
    assert value(text, "whatsapp_graph_request_seconds_count", operation="send") == 2
    assert value(text, "whatsapp_outbound_messages_total", decision="free_form") == 1
    assert value(text, "whatsapp_outbound_messages_total", decision="failed") == 0


async def wait_posts(sim, count, timeout=5.0):
    deadline = time.monotonic() + timeout
    while len(sim.bot_posts) < count and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert len(sim.bot_posts) >= count, sim.bot_posts


@pytest.fixture
async def sim_with_statuses():
    """The simulator sending `sent` and `delivered` statuses to a recorder (make_sim sends none)."""
    posts = []

    async def recorder(request):
        posts.append(json.loads(await request.read()))
        return web.json_response({"ok": True})

    bot = web.Application()
    bot.router.add_post("/webhooks/whatsapp/webhook", recorder)
    bot_runner, bot_url = await _serve(bot)
    settings = Settings(access_token=TOKEN, phone_number_id=PNID, app_secret=SECRET,
                        bot_webhook_url=f"{bot_url}/webhooks/whatsapp/webhook", statuses=("sent", "delivered"))
    sim_runner, sim_url = await _serve(create_app(settings))
    sim = Sim(sim_url, posts)
    yield sim
    await sim.http.close()
    await sim_runner.cleanup()
    await bot_runner.cleanup()


async def test_failed_statuses_count_their_codes_and_pricing_counts_once_per_message(sim_with_statuses):
    sim = sim_with_statuses
    channel, app = sim_channel(sim, mark_read=True)
    await sim.customer_says(CUSTOMER, text="hi")
    seen = await forward(app, sim)
    await settled(channel)
    (record,) = await channel.state.recent_outbound(CUSTOMER)
    await wait_posts(sim, seen + 2)  # sent, delivered: free customer service
    await forward(app, sim, since=seen)
    billable = webhook("status_sent")  # the same message's pricing said again, billable this time
    billable["entry"][0]["changes"][0]["value"]["statuses"][0].update(
        id="wamid.other", recipient_id=CUSTOMER, biz_opaque_callback_data=record.callback_id,
        pricing={"billable": True, "pricing_model": "PMP", "type": "regular", "category": "utility"})
    for body in (billable, webhook("status_failed_131026")):
        assert (await post(app, json.dumps(body).encode())).status == 200
    await settled(channel)
    for _ in range(100):  # the read receipt goes out beside the turn
        text = await scrape(app)
        if value(text, "whatsapp_graph_request_seconds_count", operation="mark_read"):
            break
        await asyncio.sleep(0.02)
    assert value(text, "whatsapp_graph_request_seconds_count", operation="mark_read") == 1
    assert value(text, "whatsapp_billable_messages_total", category="utility") == 0  # not its first pricing
    assert value(text, "whatsapp_billable_messages_total", category="service") == 0  # free
    assert value(text, "whatsapp_graph_errors_total", code="131026") == 1
    assert value(text, "whatsapp_outbound_messages_total", decision="free_form") == 1
    assert CUSTOMER not in text and SENDER not in text


async def test_pricing_first_stored_for_a_callback_counts_billable_by_category():
    channel, app = channel_with()
    await start(app)
    body = webhook("status_sent")
    item = body["entry"][0]["changes"][0]["value"]["statuses"][0]
    item.update(biz_opaque_callback_data="cb-1",
                pricing={"billable": True, "pricing_model": "PMP", "type": "regular", "category": "utility"})
    free = json.loads(json.dumps(body))
    free["entry"][0]["changes"][0]["value"]["statuses"][0].update(
        biz_opaque_callback_data="cb-2", pricing={"billable": False, "type": "free_customer_service", "category": "service"})
    for sent in (body, body, free):
        assert (await post(app, json.dumps(sent).encode())).status == 200
    await settled(channel)
    text = await scrape(app)
    assert value(text, "whatsapp_billable_messages_total", category="utility") == 1
    assert value(text, "whatsapp_billable_messages_total", category="service") == 0
    assert SENDER not in text


async def test_no_label_carries_a_customer_id(make_sim):  # noqa: F811
    sim = await make_sim()
    channel, app = sim_channel(sim, templates=ORDER_UPDATE)
    await sim.customer_says(CUSTOMER, text="hi")
    await sim.faults({"status": 400, "code": 131047})
    await forward(app, sim)
    for name in ("text", "image", "status_failed_131047", "username_user_id_only", "user_preferences_marketing_stop"):
        assert (await post(app, webhook_body(name))).status == 200
    await settled(channel)
    text = await scrape(app)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            for label, shown in sample.labels.items():
                assert CUSTOMER not in shown and SENDER not in shown and "US." not in shown, (sample.name, label)
                assert not (shown.isdigit() and len(shown) > 7), (sample.name, label, shown)  # no phone numbers
    assert CUSTOMER not in text and SENDER not in text
    assert value(text, "whatsapp_graph_errors_total", code="131047") >= 1
