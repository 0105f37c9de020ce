"""The webhook blueprint through Sanic's ASGI test client, with Rasa's own `register`.

`app.ctx.agent` is a recorder standing in for Rasa's Agent: what reaches it is exactly what
Rasa's `handle_message` would get. The end-to-end tests drive the real Agent.
"""

import asyncio
import json
import uuid

import pytest
from sanic import Sanic

from rasa.core.channels.channel import register
from rasa.core.lock_store import InMemoryLockStore
from rasa.core.tracker_store import InMemoryTrackerStore
from rasa.shared.core.domain import Domain

from connector.channel import WhatsAppInput, WhatsAppOutput
from connector.signature import sign
from tests.fixtures.loader import webhook, webhook_body

SECRET = "test-app-secret"
CREDENTIALS = {
    "access_token": "test-token",
    "phone_number_id": "106540352242922",
    "app_secret": SECRET,
    "verify_token": "test-verify",
    "api_url": "http://127.0.0.1:9",
    "api_version": "v23.0",
    "mark_read": False,
}
URL = "/webhooks/whatsapp/webhook"


class RecordingAgent:
    def __init__(self):
        self.messages = []
        self.lock_store = InMemoryLockStore()
        self.tracker_store = InMemoryTrackerStore(Domain.empty())

    async def handle_message(self, message):
        self.messages.append(message)


@pytest.fixture
def channel():
    return WhatsAppInput.from_credentials(CREDENTIALS)


class LongLived(Sanic):
    """Starts once and stays up, as a real server does (Sanic's test client would start and stop
    the server around every request)."""

    async def _server_event(self, concern, action, loop=None):
        if concern == "init" and not getattr(self.ctx, "started", False):
            await super()._server_event(concern, action, loop=loop)
            self.ctx.started = action == "after"


def make_app(channel, agent=None):
    Sanic.test_mode = True
    app = LongLived(f"whatsapp_test_{uuid.uuid4().hex[:8]}")
    app.ctx.agent = agent or RecordingAgent()
    register([channel], app, route="/webhooks/")
    return app


@pytest.fixture
def app(channel):
    return make_app(channel)


async def post(app, body: bytes, signature="valid"):
    headers = {"content-type": "application/json"}
    if signature == "valid":
        headers["x-hub-signature-256"] = sign(body, SECRET)
    elif signature is not None:
        headers["x-hub-signature-256"] = signature
    _, response = await app.asgi_client.post(URL, content=body, headers=headers)
    return response


async def delivered(app, channel):
    await channel.turns.drain()
    return app.ctx.agent.messages


async def test_handshake_answers_the_challenge(app):
    params = {"hub.mode": "subscribe", "hub.verify_token": "test-verify", "hub.challenge": "1158201444"}
    _, response = await app.asgi_client.get(URL, params=params)
    assert response.status == 200 and response.text == "1158201444"


@pytest.mark.parametrize("params", [
    {"hub.mode": "subscribe", "hub.verify_token": "wrong", "hub.challenge": "1"},
    {"hub.mode": "unsubscribe", "hub.verify_token": "test-verify", "hub.challenge": "1"},
    {},
])
async def test_handshake_with_wrong_token_is_forbidden(app, params):
    _, response = await app.asgi_client.get(URL, params=params)
    assert response.status == 403


async def test_signed_text_reaches_rasa_with_wamid_and_metadata(app, channel):
    response = await post(app, webhook_body("text"))
    assert response.status == 200
    (message,) = await delivered(app, channel)
    assert message.text == "Hi, is my order on its way?"
    assert message.sender_id == "16315551181"
    assert message.message_id == "wamid.HBgLMTYzMTU1NTExODEVAgASGBQM0E0QTY1OTlBRUUwMzgxMDE0NDAAA="
    assert message.input_channel == "whatsapp"
    assert isinstance(message.output_channel, WhatsAppOutput)
    assert message.metadata["whatsapp"]["timestamp"] == 1732543200
    assert message.metadata["whatsapp"]["profile_name"] == "Kerry Fisher"


async def test_unsigned_post_is_401_and_reaches_no_bot(app, channel, caplog):
    response = await post(app, webhook_body("text"), signature=None)
    assert response.status == 401
    assert await delivered(app, channel) == []
    assert "no X-Hub-Signature-256" in caplog.text


@pytest.mark.parametrize("signature", ["sha256=" + "0" * 64, "sha256=nothex", "garbage", sign(b"{}", SECRET)])
async def test_forged_post_is_403_and_reaches_no_bot(app, channel, signature):
    response = await post(app, webhook_body("text"), signature=signature)
    assert response.status == 403
    assert await delivered(app, channel) == []


async def test_signature_with_another_secret_is_403(app, channel):
    body = webhook_body("text")
    response = await post(app, body, signature=sign(body, "not-the-app-secret"))
    assert response.status == 403
    assert await delivered(app, channel) == []


@pytest.mark.parametrize("body", [b"not json", b"", b"[1, 2]", b'{"object": "whatsapp_business_account", "entry": 5}', b"\xff\xfe"])
async def test_malformed_body_is_400_with_a_log_line(app, channel, body, caplog):
    response = await post(app, body)
    assert response.status == 400
    assert "Webhook refused" in caplog.text
    assert await delivered(app, channel) == []


async def test_batch_of_three_customers_reaches_rasa_three_times(app, channel):
    response = await post(app, webhook_body("batch_three_customers"))
    assert response.status == 200
    messages = await delivered(app, channel)
    assert sorted(m.sender_id for m in messages) == ["16315551181", "16315551182", "16315551183"]


async def test_one_customers_batch_keeps_its_order(app, channel):
    await post(app, webhook_body("batch_two_messages_one_value"))
    assert [m.text for m in await delivered(app, channel)] == ["Two quick questions", "Do you ship to Canada?"]


async def test_statuses_reactions_and_unsupported_never_reach_rasa(app, channel, caplog):
    for name in ["status_read", "status_failed_131047", "reaction", "unsupported", "revoked_message", "account_update"]:
        response = await post(app, webhook_body(name))
        assert response.status == 200, name
    assert await delivered(app, channel) == []
    assert "code=131047" in caplog.text
    assert "code=131051" in caplog.text  # the unsupported message's error is logged with its code


async def test_media_without_caption_and_location_reach_rasa_as_intents(app, channel):
    await post(app, webhook_body("image_no_caption"))
    await post(app, webhook_body("location"))
    media, location = await delivered(app, channel)
    assert media.text == "/whatsapp_media"
    assert media.metadata["whatsapp"]["media"]["id"]
    assert location.text.startswith('/whatsapp_location{"latitude": ')


async def test_the_same_wamid_twice_is_handled_once(app, channel):
    for _ in range(3):
        assert (await post(app, webhook_body("text"))).status == 200
    assert len(await delivered(app, channel)) == 1


async def test_a_customer_call_reaches_rasa_as_an_intent_with_its_timestamp(app, channel):
    await post(app, webhook_body("call_connect"))
    (call,) = await delivered(app, channel)
    assert call.text == "/whatsapp_call"
    assert call.metadata["whatsapp"]["type"] == "call" and call.metadata["whatsapp"]["timestamp"] > 0


async def test_marketing_stop_preference_stops_marketing_templates_not_the_opt_in(app, channel):
    await post(app, webhook_body("user_preferences_marketing_stop"))
    await channel.turns.drain()
    assert await channel.state.marketing_stopped("16315551181") is True
    assert list(await app.ctx.agent.tracker_store.keys()) == []  # no opt-out written to the tracker


async def test_oversized_body_is_413(app, channel):
    body = b'{"object": "whatsapp_business_account", "entry": [], "pad": "' + b"x" * 1_100_000 + b'"}'
    assert (await post(app, body)).status == 413
    assert await delivered(app, channel) == []


async def test_a_broken_item_is_logged_and_the_rest_delivered(app, channel, caplog):
    body = webhook("batch_three_customers")
    del body["entry"][0]["changes"][0]["value"]["messages"][0]["id"]
    response = await post(app, json.dumps(body).encode())
    assert response.status == 200
    assert len(await delivered(app, channel)) == 2
    assert "missing 'id'" in caplog.text


async def test_button_tap_with_intent_payload(app, channel):
    body = webhook("interactive_button_reply")
    body["entry"][0]["changes"][0]["value"]["messages"][0]["interactive"]["button_reply"]["id"] = "/order_status"
    await post(app, json.dumps(body).encode())
    (message,) = await delivered(app, channel)
    assert message.text == "/order_status"
    assert message.metadata["whatsapp"]["reply"]["title"] == "Confirm"


async def test_username_customer_uses_user_id_as_sender(app, channel):
    await post(app, webhook_body("username_user_id_only"))
    (message,) = await delivered(app, channel)
    assert message.sender_id == "US.13491208655302741918"


async def test_health(app):
    _, response = await app.asgi_client.get("/webhooks/whatsapp/")
    assert response.status == 200


async def test_template_quick_reply_unsubscribe_opts_out_without_nlu(app, channel):
    body = webhook("button_template_quick_reply")
    body["entry"][0]["changes"][0]["value"]["messages"][0]["button"] = {"payload": "Unsubscribe", "text": "Unsubscribe"}
    await post(app, json.dumps(body).encode())
    (message,) = await delivered(app, channel)
    assert message.text == "/opt_out" and message.metadata["whatsapp"]["opt_out_keyword"] == "Unsubscribe"
    tracker = await app.ctx.agent.tracker_store.retrieve("16315551181")
    assert [(e.key, e.value) for e in tracker.events if e.type_name == "slot"] == [("whatsapp_opt_in", False)]


async def test_replies_leave_from_the_number_the_customer_wrote_to():
    channel = WhatsAppInput.from_credentials({**CREDENTIALS, "phone_number_id": ["106540352242922", "222222222222222"]})
    app = make_app(channel)
    body = webhook("text")
    body["entry"][0]["changes"][0]["value"]["metadata"]["phone_number_id"] = "222222222222222"
    assert (await post(app, json.dumps(body).encode())).status == 200
    (message,) = await delivered(app, channel)
    assert message.output_channel.turn.phone_number_id == "222222222222222"
    assert channel.state.backend.customer("16315551181").reply_number == "222222222222222"


async def test_an_opt_out_a_previous_process_left_unfinished_is_finished_here(app, channel):
    """The state says an opt-out is pending (its process died before the tracker held it): the
    customer counts as opted out, and this process writes the slot and clears the flag."""
    await channel.open_state(app)
    channel.opt_outs.retry_seconds = (0.01,)
    channel.state.backend.note_inbound("16315551181", 1_700_000_000, "106540352242922")
    channel.state.backend.set_opt_out_pending("16315551181", True)
    facts, _, _ = await channel.outbound.facts("16315551181", now=1_700_000_000 + 30 * 3600)
    assert facts.opt_in is False
    for _ in range(100):
        if not channel.state.backend.customer("16315551181").opt_out_pending:
            break
        await asyncio.sleep(0.02)
    tracker = await app.ctx.agent.tracker_store.retrieve("16315551181")
    assert [(e.key, e.value) for e in tracker.events if e.type_name == "slot"] == [("whatsapp_opt_in", False)]
    assert not channel.state.backend.customer("16315551181").opt_out_pending
    assert not channel.opt_outs.counts_as_opted_out(channel.state.backend.customer("16315551181"))


AGENT_URL = "/webhooks/whatsapp/agent/conversations/16315551181"


async def test_the_agent_api_is_off_without_agent_token(app):
    _, response = await app.asgi_client.get(AGENT_URL, headers={"Authorization": "Bearer anything"})
    assert response.status == 404 and "agent_token" in response.json["error"]


@pytest.mark.parametrize("body, field", [
    ({"txt": "hi"}, "txt"),
    ({}, '"text" or "template"'),
    ({"text": "hi", "template": {"name": "x", "language": "en_US"}}, '"text" or "template"'),
    ({"text": ""}, "text"),
    ({"text": "x" * 4097}, "text"),
    ({"template": {"name": "order_update"}}, "template.language"),
    ({"template": {"name": "order_update", "language": "en_US", "body": "10042"}}, "template.body"),
    ({"template": {"name": "order_update", "language": "en_US", "body": ["{order_id}"]}}, "placeholders"),
    ([], "JSON object"),
])
async def test_a_bad_agent_message_is_400_naming_the_field(body, field):
    channel = WhatsAppInput.from_credentials({**CREDENTIALS, "agent_token": "agent-secret"})
    app = make_app(channel)
    _, response = await app.asgi_client.post(f"{AGENT_URL}/messages", content=json.dumps(body),
                                             headers={"Authorization": "Bearer agent-secret"})
    assert response.status == 400 and field in response.json["error"]


@pytest.mark.parametrize("headers, status", [({}, 401), ({"Authorization": "Bearer wrong"}, 403),
                                             ({"Authorization": "agent-secret"}, 401)])
async def test_the_agent_api_wants_its_own_token(headers, status):
    channel = WhatsAppInput.from_credentials({**CREDENTIALS, "agent_token": "agent-secret", "api_token": "api"})
    app = make_app(channel)
    _, response = await app.asgi_client.post(f"{AGENT_URL}/handoff", content="{}", headers=headers)
    assert response.status == status


async def test_a_bot_message_sent_while_the_server_starts_waits_for_the_state_instead_of_being_lost(channel):
    """Rasa answers its HTTP API (trigger_intent) a moment before `after_server_start` opens the state."""
    early = asyncio.get_running_loop().create_task(
        WhatsAppOutput(channel).send_response("16315551181", {"text": "Hello!", "utter_action": "utter_greet"}))
    await asyncio.sleep(0.2)
    assert not early.done()
    app = make_app(channel)
    _, response = await app.asgi_client.get("/webhooks/whatsapp/")
    assert response.status == 200
    await asyncio.wait_for(early, 10)
    (record,) = await channel.state.recent_outbound("16315551181")
    assert record.decision == "suppressed" and record.response == "utter_greet"  # decided and recorded
