"""`GET /webhooks/whatsapp/conversations/{sender_id}` through the blueprint (Sanic's ASGI client,
Rasa's `register`): ISO 8601 UTC times beside the epoch ones, what `templates_left` means inside
and outside the window, and nothing process-wide in a customer's view."""

import json
import re
import time
from datetime import datetime, timezone

import pytest

from connector.care_state import OutboundRecord
from connector.channel import WhatsAppInput, WhatsAppOutput
from connector.conversation import history
from tests.fixtures.loader import webhook
from tests.test_channel import CREDENTIALS, RecordingAgent, make_app, post

SENDER = "16315551181"
TOKEN = "view-token"
HOUR = 3600


def iso(ts):
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_iso(text):
    assert text.endswith("Z"), text
    return datetime.fromisoformat(text[:-1] + "+00:00").timestamp()


def channel_with(**settings):
    channel = WhatsAppInput.from_credentials({**CREDENTIALS, "api_token": TOKEN, **settings})
    return channel, make_app(channel, RecordingAgent())


async def customer_writes(app, channel, at):
    """The customer's text message with WhatsApp timestamp `at`, taken by the intake."""
    body = webhook("text")
    message = body["entry"][0]["changes"][0]["value"]["messages"][0]
    message["timestamp"], message["id"] = str(int(at)), f"wamid.view{time.monotonic_ns()}"
    assert (await post(app, json.dumps(body).encode())).status == 200
    await channel.turns.drain()
    while channel.intake.in_flight:
        await channel.turns.drain()


async def view(app, sender=SENDER):
    _, response = await app.asgi_client.get(f"/webhooks/whatsapp/conversations/{sender}",
                                            headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status == 200, response.text
    return response.json


def record(channel, window_of, **fields):
    base = dict(callback_id=f"cb-{time.monotonic_ns()}", sender_id=SENDER, decision="suppressed", window_of=int(window_of),
                at=time.time(), created_at=time.time(), response="utter_greet", status="suppressed",
                reason="outside the care window and no template is mapped for utter_greet",
                rendered_with={"text": "Hi!"})
    return OutboundRecord(**{**base, **fields})


async def test_every_time_has_an_iso_8601_utc_twin_and_the_epoch_fields_stay():
    channel, app = channel_with()
    wrote = int(time.time()) - 60
    await customer_writes(app, channel, wrote)
    suppressed = record(channel, wrote, at=time.time() - 5.25)
    await channel.state.add_outbound(suppressed)

    shown = await view(app)
    assert isinstance(shown["now"], float) and shown["now_iso"] == iso(shown["now"])
    assert abs(parse_iso(shown["now_iso"]) - time.time()) < 5
    assert shown["last_inbound_at"] == wrote and shown["last_inbound_at_iso"] == iso(wrote)
    assert shown["window_open"] is True
    assert shown["expires_at"] == wrote + 24 * HOUR - 60
    assert shown["expires_at_iso"] == iso(wrote + 24 * HOUR - 60)
    (kept,) = shown["records"]
    assert kept["at"] == pytest.approx(suppressed.at) and kept["at_iso"] == iso(suppressed.at)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", kept["at_iso"])  # UTC, milliseconds
    assert kept["text"] == "Hi!" and kept["kind"] == "suppressed"
    (turn,) = shown["inbox"]
    assert turn["received_at_iso"] == iso(turn["received_at"])


async def test_a_customer_who_never_wrote_has_null_iso_times():
    channel, app = channel_with()
    await customer_writes(app, channel, time.time())  # someone else's conversation opens the state
    shown = await view(app, "4915100000000")
    assert shown["last_inbound_at"] is None and shown["last_inbound_at_iso"] is None
    assert shown["expires_at"] is None and shown["expires_at_iso"] is None
    assert shown["now_iso"] == iso(shown["now"])


@pytest.mark.parametrize("limit", [1, 3])
async def test_inside_the_window_templates_left_is_what_may_go_out_once_it_lapses(limit):
    """The issue's "templates_left reads 0 while the window is open and none were sent" does not
    happen: inside the window nothing has been reserved for it yet, so the whole allowance shows."""
    channel, app = channel_with(templates_per_lapsed_window=limit)
    await customer_writes(app, channel, time.time() - 60)
    shown = await view(app)
    assert shown["window_open"] is True
    assert (shown["templates_sent"], shown["templates_left"]) == (0, limit)


async def test_outside_the_window_templates_left_counts_down_and_a_new_message_refills_it():
    channel, app = channel_with()
    lapsed = int(time.time()) - 25 * HOUR
    await customer_writes(app, channel, lapsed)
    before = await view(app)
    assert before["window_open"] is False and before["templates_left"] == 1
    template = record(channel, lapsed, decision="template", status="accepted", template="order_status_update", reason=None)
    assert await channel.state.reserve_template(template, 1)
    after = await view(app)
    assert (after["templates_sent"], after["templates_left"]) == (1, 0)
    await customer_writes(app, channel, time.time() - 10)  # a new window, a new allowance
    again = await view(app)
    assert again["window_open"] is True and (again["templates_sent"], again["templates_left"]) == (0, 1)


async def test_a_clock_turned_back_after_a_template_shows_the_window_open_with_none_left():
    """The one way to see 0 inside the window: the template went out for this very window while
    the clock said it had lapsed (e.g. the simulator's clock advanced, then reset). It is the
    truth: when this window lapses, its one template has been used."""
    channel, app = channel_with()
    wrote = int(time.time()) - 60
    await customer_writes(app, channel, wrote)
    template = record(channel, wrote, decision="template", status="accepted", template="order_status_update", reason=None)
    assert await channel.state.reserve_template(template, 1)
    shown = await view(app)
    assert shown["window_open"] is True and (shown["templates_sent"], shown["templates_left"]) == (1, 0)


async def test_a_customers_view_holds_nothing_process_wide():
    channel, app = channel_with()
    await customer_writes(app, channel, time.time())
    channel.refused, channel.other_numbers["999"] = 7, 3  # what /intake reports for the process
    shown = await view(app)
    flat = json.dumps(shown)
    for counter in ("refused", "failed_turns", "in_flight", "max_in_flight", "other_numbers", "instance"):
        assert f'"{counter}"' not in flat
    assert set(shown) >= {"sender_id", "now", "window_open", "templates_left", "records", "inbox"}


async def test_a_suppression_shows_its_reason_code_beside_its_reason():
    """The code the outbound path decided with is stored with the record, so the view (and the
    simulator's page, which prints "suppressed: one template per lapsed window" from it) has it."""
    order_update = {"utter_order_update": {"name": "order_status_update", "language": "en_US",
                                           "body": ["{order_id}", "{order_status}"]}}
    channel, app = channel_with(templates=order_update)
    lapsed = int(time.time()) - 25 * HOUR
    await customer_writes(app, channel, lapsed)
    await WhatsAppOutput(channel).send_response(  # a template, but the customer never opted in
        SENDER, {"text": "Order 10042 has shipped", "utter_action": "utter_order_update",
                 "order_id": "10042", "order_status": "shipped"})
    await channel.state.add_outbound(record(channel, lapsed, decision="free_form", status="read", reason=None))

    shown = await view(app)
    suppressed, read = shown["records"]
    assert (suppressed["kind"], suppressed["reason_code"]) == ("suppressed", "no_opt_in")
    assert suppressed["reason"] == "outside the care window and the customer has not opted in"
    assert (read["kind"], read["reason_code"]) == ("free_form", None)
    records = await channel.state.recent_outbound(SENDER, 2)
    (stored,) = [r for r in records if r.decision == "suppressed"]
    assert stored.reason_code == "no_opt_in"  # the record as stored, not only as returned
    # the agent API's (and the desk's) history shows it too
    assert [(m["decision"], m["reason_code"]) for m in history((), records, 10)] == [
        ("suppressed", "no_opt_in"), ("free_form", None)]
