"""The intake through the webhook blueprint (Sanic's ASGI client, Rasa's `register`), with an
agent that fails or hangs on demand: "seen" is not "done", failed turns are retried, the webhook
pushes back when full or stopping, and other bots' numbers are left alone. The end-to-end
versions (kill -9, action server down, SIGTERM) are in test_delivery_e2e.py."""

import asyncio
import dataclasses
import gc
import json
import threading
import time


from connector.channel import WhatsAppInput
from connector.intake import TurnInterrupted
from tests.fixtures.loader import webhook, webhook_body
from tests.test_channel import CREDENTIALS, RecordingAgent, make_app, post

WAMID = "wamid.HBgLMTYzMTU1NTExODEVAgASGBQM0E0QTY1OTlBRUUwMzgxMDE0NDAAA="
SENDER = "16315551181"


class FlakyAgent(RecordingAgent):
    """Fails the first `failures` turns (with `error`), or holds every turn until released."""

    def __init__(self, failures=0, error=RuntimeError("tracker store down")):
        super().__init__()
        self.failures = failures
        self.error = error
        self.calls = 0
        self.release = asyncio.Event()
        self.release.set()

    async def handle_message(self, message):
        self.calls += 1
        await self.release.wait()
        if self.calls <= self.failures:
            raise self.error
        self.messages.append(message)


def channel_with(agent, **settings):
    channel = WhatsAppInput.from_credentials({**CREDENTIALS, **settings})
    channel.intake.first_retry_seconds = 0.01
    return channel, make_app(channel, agent)


async def settled(channel):
    """Every queued job ran, including the inbox writes after the turn."""
    await channel.turns.drain()
    while channel.intake.in_flight:
        await asyncio.sleep(0.01)


async def entry(channel, key=WAMID):
    (found,) = [t for t in await channel.state.turns_of(SENDER) if t.key == key]
    return found


async def test_a_redelivered_message_that_was_handled_is_acknowledged_and_dropped():
    channel, app = channel_with(RecordingAgent())
    assert (await post(app, webhook_body("text"))).status == 200
    await settled(channel)
    assert len(app.ctx.agent.messages) == 1
    assert (await entry(channel)).state == "done"
    assert (await post(app, webhook_body("text"))).status == 200
    await settled(channel)
    assert len(app.ctx.agent.messages) == 1


async def test_a_redelivery_while_the_message_is_being_handled_is_not_handled_twice():
    agent = FlakyAgent()
    agent.release.clear()
    channel, app = channel_with(agent)
    assert (await post(app, webhook_body("text"))).status == 200
    await asyncio.sleep(0.05)
    assert agent.calls == 1  # in Rasa right now
    assert (await post(app, webhook_body("text"))).status == 200
    agent.release.set()
    await settled(channel)
    assert agent.calls == 1 and len(agent.messages) == 1


async def test_a_failed_turn_is_retried_until_rasa_saves_it():
    agent = FlakyAgent(failures=2)
    channel, app = channel_with(agent)
    assert (await post(app, webhook_body("text"))).status == 200
    await settled(channel)
    assert agent.calls == 3 and len(agent.messages) == 1
    assert (await entry(channel)).state == "done"


async def test_an_interrupted_turn_is_retried_and_its_redelivery_waits_for_it():
    agent = FlakyAgent(failures=1, error=TurnInterrupted("the action server could not be reached"))
    channel, app = channel_with(agent)
    channel.intake.first_retry_seconds = 0.3
    assert (await post(app, webhook_body("text"))).status == 200
    await asyncio.sleep(0.1)  # the first attempt failed; the retry waits
    assert (await entry(channel)).attempts == 1
    assert (await post(app, webhook_body("text"))).status == 200  # Meta delivers it again meanwhile
    await settled(channel)
    assert agent.calls == 2 and len(agent.messages) == 1


async def test_after_the_last_attempt_the_message_is_failed_visible_and_taken_back_when_redelivered(caplog):
    agent = FlakyAgent(failures=2, error=RuntimeError("action server down"))
    channel, app = channel_with(agent, turn_attempts=2, api_token="view")
    assert (await post(app, webhook_body("text"))).status == 200
    await settled(channel)
    assert agent.messages == [] and channel.intake.failed == 1
    assert "FAILED after 2 attempt(s)" in caplog.text and "action server down" in caplog.text
    _, view = await app.asgi_client.get(f"/webhooks/whatsapp/conversations/{SENDER}?token=view")
    (shown,) = view.json["inbox"]
    assert shown["state"] == "failed" and shown["attempts"] == 2 and "action server down" in shown["error"]
    _, counts = await app.asgi_client.get("/webhooks/whatsapp/intake?token=view")
    assert counts.json["failed_turns"] == 1

    assert (await post(app, webhook_body("text"))).status == 200  # Meta redelivers: handled again
    await settled(channel)
    assert len(agent.messages) == 1 and (await entry(channel)).state == "done"


async def test_past_max_in_flight_the_whole_webhook_is_refused_and_taken_later():
    agent = FlakyAgent()
    agent.release.clear()
    channel, app = channel_with(agent, max_in_flight=3)
    assert (await post(app, webhook_body("batch_three_customers"))).status == 200
    assert channel.intake.in_flight == 3
    refused = await post(app, webhook_body("text"))
    assert refused.status == 503
    assert [t for t in await channel.state.turns_of(SENDER) if t.key == WAMID] == []  # nothing of it kept
    agent.release.set()
    await settled(channel)
    assert (await post(app, webhook_body("text"))).status == 200  # Meta's redelivery, later
    await settled(channel)
    assert len(agent.messages) == 4


async def test_a_batch_larger_than_max_in_flight_is_taken_when_nothing_else_is_in_flight():
    channel, app = channel_with(FlakyAgent(), max_in_flight=1)
    assert (await post(app, webhook_body("batch_three_customers"))).status == 200
    await settled(channel)
    assert len(app.ctx.agent.messages) == 3


async def test_stopping_refuses_new_webhooks_and_leaves_unfinished_turns_pending():
    agent = FlakyAgent()
    agent.release.clear()
    channel, app = channel_with(agent)
    assert (await post(app, webhook_body("text"))).status == 200
    await asyncio.sleep(0.05)
    stopping = asyncio.get_running_loop().create_task(channel.intake.stop(deadline=0.3))
    await asyncio.sleep(0.05)
    assert (await post(app, webhook_body("batch_three_customers"))).status == 503
    await asyncio.wait_for(stopping, 2)
    assert agent.messages == []
    assert (await entry(channel)).state == "pending"

    # the next start of this instance takes it over at once
    agent.release.set()
    await channel.intake.start(channel.intake.owner)
    await settled(channel)
    assert len(agent.messages) == 1 and (await entry(channel)).state == "done"


async def test_messages_and_statuses_for_another_business_number_are_acknowledged_and_left_alone(caplog):
    channel, app = channel_with(FlakyAgent(), mark_read=True, api_token="view")
    reads = []

    async def mark_read(*args):
        reads.append(args)

    channel.client.mark_read = mark_read
    for name in ("text", "status_read", "text"):
        body = webhook(name)
        body["entry"][0]["changes"][0]["value"]["metadata"]["phone_number_id"] = "999999999999999"
        assert (await post(app, json.dumps(body).encode())).status == 200
    await settled(channel)
    assert app.ctx.agent.messages == [] and reads == []
    assert channel.state.backend.customer(SENDER).last_inbound_at is None
    assert caplog.text.count("business number 999999999999999 are ignored") == 1
    _, counts = await app.asgi_client.get("/webhooks/whatsapp/intake?token=view")
    assert counts.json["other_numbers"] == {"999999999999999": 3}


async def test_a_reply_an_interrupted_attempt_already_sent_is_not_sent_again():
    class ReplyThenFail(FlakyAgent):
        async def handle_message(self, message):
            self.calls += 1
            await message.output_channel.send_response(message.sender_id, {"text": "Let me look that up"})
            if self.calls <= self.failures:  # the custom action after the reply could not run
                raise TurnInterrupted("the action server could not be reached")
            self.messages.append(message)

    agent = ReplyThenFail(failures=1)
    channel, app = channel_with(agent)
    sent = []

    async def send_message(to, message, phone_number_id=None, callback_id=None):
        sent.append(callback_id)
        return f"wamid.out{len(sent)}"

    channel.client.send_message = send_message
    body = webhook("text")
    body["entry"][0]["changes"][0]["value"]["messages"][0]["timestamp"] = str(int(time.time()))  # window open
    assert (await post(app, json.dumps(body).encode())).status == 200
    await settled(channel)
    assert agent.calls == 2 and len(agent.messages) == 1
    assert len(sent) == 1
    (record,) = await channel.state.recent_outbound(SENDER)
    assert record.callback_id == sent[0] and record.decision == "free_form"


class BlockingAgent(RecordingAgent):
    """A turn that makes a synchronous call on the loop, as a blocking database driver would."""

    async def handle_message(self, message):
        time.sleep(0.15)
        self.messages.append(message)


async def test_a_blocking_call_in_a_turn_shows_as_the_longest_loop_stall():
    channel, app = channel_with(BlockingAgent(), api_token="view")
    before = time.time()
    await asyncio.sleep(0.05)
    _, counts = await app.asgi_client.get(f"/webhooks/whatsapp/intake?token=view&stall_since={before}")
    assert counts.json["longest_loop_stall_ms"] < 100
    assert (await post(app, webhook_body("text"))).status == 200
    await settled(channel)
    await asyncio.sleep(0.05)  # the watchdog wakes up after the stall
    _, counts = await app.asgi_client.get(f"/webhooks/whatsapp/intake?token=view&stall_since={before}")
    assert 140 <= counts.json["longest_loop_stall_ms"] < 400
    _, later = await app.asgi_client.get(f"/webhooks/whatsapp/intake?token=view&stall_since={time.time()}")
    assert later.json["longest_loop_stall_ms"] < 100
    _, scraped = await app.asgi_client.get("/webhooks/whatsapp/metrics?token=view")
    (line,) = [x for x in scraped.text.splitlines() if x.startswith("whatsapp_event_loop_stall_seconds_max ")]
    assert float(line.split()[1]) >= 0.14
    _, bad = await app.asgi_client.get("/webhooks/whatsapp/intake?token=view&stall_since=yesterday")
    assert bad.status == 400
    assert gc.get_freeze_count() > 0  # freeze_startup_heap (default on) ran when the channel opened


async def test_a_message_kept_while_meta_hung_up_is_still_handled():
    """Meta gives up on a slow 200 and the handler is cancelled; the inbox write it started still
    ends, and what it kept must run now, not wait for its lease to run out."""
    agent = RecordingAgent()
    channel, app = channel_with(agent)
    assert (await post(app, webhook_body("text"))).status == 200  # the state is open
    await settled(channel)
    backend, writing, finish = channel.state.backend, threading.Event(), threading.Event()
    accept_turns = backend.accept_turns

    def slow_accept(*args):
        writing.set()
        finish.wait(5)
        return accept_turns(*args)

    backend.accept_turns = slow_accept
    (first,) = await channel.state.turns_of(SENDER)
    turn = dataclasses.replace(first, key="wamid.hungup", text="still here", state="pending", attempts=0)
    handler = asyncio.ensure_future(channel.intake.accept([turn]))
    await asyncio.get_running_loop().run_in_executor(None, writing.wait, 5)
    handler.cancel()
    await asyncio.gather(handler, return_exceptions=True)
    finish.set()
    await asyncio.sleep(0.1)
    await settled(channel)
    assert [m.text for m in agent.messages][-1] == "still here"
    assert (await entry(channel, "wamid.hungup")).state == "done"
