"""The Cloud API client and the renderer against the REAL simulator over HTTP (in-process, on
127.0.0.1 free ports), plus the pacing limiter's timing logic with a fake clock.

Sleeps are injected: retries and pacing record their delays and advance a fake clock instead of
really sleeping, so budgets are checked exactly and the tests stay fast."""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Dict, List, Optional

import aiohttp
import pytest
from aiohttp import web

from connector.client import CloudApiClient
from connector.config import ChannelConfig
from connector.errors import (
    AccountRateLimited, AuthError, GraphError, MarketingStopped, OutcomeUnknown, RateLimited, ReEngagementRequired, TemplateError,
    TransientError, Undeliverable,
)
from connector.pacing import Gcra, Pacer
from connector.render import message_problem, render
from connector.simulator import Settings, create_app

TOKEN = "client-test-token"
PNID = "106540352242922"
SECRET = "client-test-secret"
CUSTOMER = "4915112345678"
OTHER = "4915187654321"
BSUID = "US.13491208655302741918"
ENVELOPE = {"messaging_product": "whatsapp", "recipient_type": "individual", "to": CUSTOMER}


class FakeTime:
    """A clock that only moves when someone sleeps (and, with `real`, also with real time, so
    that request durations count); records every sleep."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: List[float] = []
        self.real = False
        self._started = time.monotonic()

    def clock(self) -> float:
        return self.now + (time.monotonic() - self._started if self.real else 0.0)

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(round(seconds, 6))
        self.now += seconds


async def _serve(app: web.Application):
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    return runner, f"http://{host}:{port}"


class Sim:
    def __init__(self, url: str, bot_posts: List[Any]) -> None:
        self.url = url
        self.bot_posts = bot_posts
        self.http = aiohttp.ClientSession()

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        async with self.http.request(method, self.url + path, json=body) as response:
            assert response.status < 300, await response.text()
            return await response.json()

    async def customer_says(self, wa_id: str = CUSTOMER, **spec: Any) -> Dict[str, Any]:
        return await self.call("POST", f"/_sim/customers/{wa_id}/messages", spec or {"text": "hi"})

    async def stats(self) -> Dict[str, Any]:
        return await self.call("GET", "/_sim/stats")

    async def outbound(self, wa_id: str = CUSTOMER) -> List[Dict[str, Any]]:
        conversation = await self.call("GET", f"/_sim/conversations/{wa_id}")
        return [m["payload"] for m in conversation["messages"] if m["direction"] == "out"]

    async def faults(self, *responses: Dict[str, Any]) -> None:
        await self.call("PUT", "/_sim/faults", {"responses": list(responses)})

    async def served(self) -> int:
        """Message sends the simulator answered (accepted or rejected)."""
        s = await self.stats()
        return s["accepted"] + sum(s["rejected"].values())


@pytest.fixture
async def make_sim():
    """Factory: a simulator app and a recording bot webhook, both on real local ports."""
    runners: List[web.AppRunner] = []
    sims: List[Sim] = []

    async def make(**overrides: Any) -> Sim:
        posts: List[Any] = []

        async def webhook(request: web.Request) -> web.Response:
            posts.append(json.loads(await request.read()))
            return web.json_response({"ok": True})

        bot_app = web.Application()
        bot_app.router.add_post("/webhooks/whatsapp/webhook", webhook)
        bot_runner, bot_url = await _serve(bot_app)
        runners.append(bot_runner)
        settings = Settings(
            access_token=TOKEN, phone_number_id=PNID, app_secret=SECRET,
            bot_webhook_url=f"{bot_url}/webhooks/whatsapp/webhook", statuses=(), **overrides,
        )
        sim_runner, sim_url = await _serve(create_app(settings))
        runners.append(sim_runner)
        sim = Sim(sim_url, posts)
        sims.append(sim)
        return sim

    yield make
    for sim in sims:
        await sim.http.close()
    for runner in reversed(runners):
        await runner.cleanup()


@pytest.fixture
async def sim(make_sim):
    return await make_sim()


@pytest.fixture
def fake_time():
    return FakeTime()


@pytest.fixture
async def make_client(fake_time):
    clients: List[CloudApiClient] = []

    def make(sim: Sim, request_timeout: float = 5.0, pacer: Optional[Pacer] = None, **kwargs: Any) -> CloudApiClient:
        config = ChannelConfig(
            access_token=TOKEN, phone_number_ids=(PNID,), app_secret=SECRET, verify_token="v",
            api_url=sim.url, request_timeout=request_timeout,
        )
        kwargs.setdefault("random", lambda: 1.0)
        client = CloudApiClient(
            config, sleep=fake_time.sleep, clock=fake_time.clock,
            pacer=pacer if pacer is not None else Pacer.disabled(), **kwargs,
        )
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


async def send_rendered(client: CloudApiClient, rasa_message: Dict[str, Any], to: str = CUSTOMER) -> List[str]:
    rendered = render(rasa_message)
    assert rendered.not_rendered == () and rendered.problems == (), rendered
    return [await client.send_message(to, message) for message in rendered.messages]


# --- every Rasa response type, as the simulator received it ---------------------------------

LONG = "Your parcel left our warehouse this morning. " * 120  # ~5,400 characters
BUTTONS = [{"title": f"Option {i}", "payload": f"/choose{{\"n\": {i}}}"} for i in range(1, 13)]


def out(kind: str, body: Any) -> Dict[str, Any]:
    return {**ENVELOPE, "type": kind, kind: body}


EXACT = [
    pytest.param({"text": "Hello!"}, [out("text", {"body": "Hello!", "preview_url": False})], id="text"),
    pytest.param(
        {"text": "See https://shop.example/track", "utter_action": "utter_track", "timestamp": 1},
        [out("text", {"body": "See https://shop.example/track", "preview_url": True})], id="text-with-url",
    ),
    pytest.param(
        {"text": "What can I do?", "buttons": BUTTONS[:3]},
        [out("interactive", {"type": "button", "body": {"text": "What can I do?"}, "action": {"buttons": [
            {"type": "reply", "reply": {"id": f"/choose{{\"n\": {i}}}", "title": f"Option {i}"}} for i in (1, 2, 3)]}})],
        id="buttons",
    ),
    pytest.param(
        {"text": "Ok?", "quick_replies": [{"title": "Yes please, go ahead now", "payload": "/affirm"}, {"title": "No", "payload": "/deny"}]},
        [out("interactive", {"type": "button", "body": {"text": "Ok?"}, "action": {"buttons": [
            {"type": "reply", "reply": {"id": "/affirm", "title": "Yes please, go ahea…"}},
            {"type": "reply", "reply": {"id": "/deny", "title": "No"}}]}})],
        id="quick-replies",
    ),
    pytest.param(
        {"text": "Pick one", "buttons": BUTTONS[:3] + [{"title": "A very long option title that does not fit", "payload": "/long"}]},
        [out("interactive", {"type": "list", "body": {"text": "Pick one"}, "action": {"button": "Choose", "sections": [{"rows": [
            {"id": '/choose{"n": 1}', "title": "Option 1"},
            {"id": '/choose{"n": 2}', "title": "Option 2"},
            {"id": '/choose{"n": 3}', "title": "Option 3"},
            {"id": "/long", "title": "A very long option titl…", "description": "A very long option title that does not fit"},
        ]}]}})],
        id="list",
    ),
    pytest.param(
        {"image": "https://cdn.example/map.png"},
        [out("image", {"link": "https://cdn.example/map.png"})], id="image",
    ),
    pytest.param(
        {"text": "Our map", "image": "https://cdn.example/map.jpg"},
        [out("image", {"link": "https://cdn.example/map.jpg", "caption": "Our map"})], id="image-text-as-caption",
    ),
    pytest.param(
        {"attachment": {"type": "image", "payload": {"src": "https://cdn.example/p.jpeg", "caption": "The parcel"}}},
        [out("image", {"link": "https://cdn.example/p.jpeg", "caption": "The parcel"})], id="attachment-image",
    ),
    pytest.param(
        {"attachment": {"type": "video", "payload": {"url": "https://cdn.example/how-to.mp4", "caption": "How to"}}},
        [out("video", {"link": "https://cdn.example/how-to.mp4", "caption": "How to"})], id="attachment-video",
    ),
    pytest.param(
        {"attachment": {"type": "audio", "payload": {"src": "https://cdn.example/hello.mp3", "caption": "Listen"}}},
        [out("audio", {"link": "https://cdn.example/hello.mp3"}), out("text", {"body": "Listen", "preview_url": False})],
        id="attachment-audio-caption-follows",
    ),
    pytest.param(
        {"attachment": {"type": "document", "payload": {"src": "https://cdn.example/i/42", "filename": "invoice-42.pdf"}}},
        [out("document", {"link": "https://cdn.example/i/42", "filename": "invoice-42.pdf"})], id="attachment-document",
    ),
    pytest.param(
        {"text": "Your invoice", "attachment": {"type": "file", "payload": {"src": "https://cdn.example/files/Invoice%2042.pdf"}}},
        [out("document", {"link": "https://cdn.example/files/Invoice%2042.pdf", "caption": "Your invoice", "filename": "Invoice 42.pdf"})],
        id="attachment-file",
    ),
    pytest.param(
        {"attachment": "https://cdn.example/clip.3gp?sig=abc"},
        [out("video", {"link": "https://cdn.example/clip.3gp?sig=abc"})], id="attachment-url-video",
    ),
    pytest.param(
        {"attachment": {"type": "sticker", "payload": {"id": "1234567890"}}},
        [out("sticker", {"id": "1234567890"})], id="attachment-sticker-by-id",
    ),
    pytest.param(
        {"elements": [
            {"title": "Running shoe", "subtitle": "€89", "image_url": "https://cdn.example/shoe.jpg",
             "buttons": [{"title": "Buy", "payload": "/buy{\"sku\": \"shoe\"}"}, {"title": "Details", "url": "https://shop.example/shoe"}]},
            {"title": "Cap", "image_url": "https://cdn.example/cap.png"},
        ]},
        [
            out("interactive", {
                "type": "button",
                "header": {"type": "image", "image": {"link": "https://cdn.example/shoe.jpg"}},
                "body": {"text": "*Running shoe*\n€89\nDetails: https://shop.example/shoe"},
                "action": {"buttons": [{"type": "reply", "reply": {"id": "/buy{\"sku\": \"shoe\"}", "title": "Buy"}}]},
            }),
            out("image", {"link": "https://cdn.example/cap.png", "caption": "*Cap*"}),
        ],
        id="elements-with-images",
    ),
    pytest.param(
        {"text": "Our stores", "elements": [
            {"title": "Berlin Mitte", "subtitle": "Open until 20:00", "buttons": [{"title": "Pick", "payload": "/store{\"id\": 1}"}]},
            {"title": "Hamburg", "subtitle": "Open until 18:00", "buttons": [{"title": "Pick", "payload": "/store{\"id\": 2}"}]},
        ]},
        [out("interactive", {"type": "list", "body": {"text": "Our stores"}, "action": {"button": "Choose", "sections": [{"rows": [
            {"id": "/store{\"id\": 1}", "title": "Berlin Mitte", "description": "Open until 20:00"},
            {"id": "/store{\"id\": 2}", "title": "Hamburg", "description": "Open until 18:00"},
        ]}]}})],
        id="elements-without-images",
    ),
    pytest.param(
        {"text": "Here:", "custom": {"type": "location", "location": {"latitude": 52.52, "longitude": 13.405, "name": "Shop"}}},
        [out("text", {"body": "Here:", "preview_url": False}),
         out("location", {"latitude": 52.52, "longitude": 13.405, "name": "Shop"})],
        id="custom-location",
    ),
    pytest.param(
        {"custom": {"type": "interactive", "interactive": {"type": "cta_url", "body": {"text": "Track it"},
                    "action": {"name": "cta_url", "parameters": {"display_text": "Track", "url": "https://shop.example/t"}}}}},
        [out("interactive", {"type": "cta_url", "body": {"text": "Track it"},
                             "action": {"name": "cta_url", "parameters": {"display_text": "Track", "url": "https://shop.example/t"}}})],
        id="custom-cta-url",
    ),
    pytest.param(
        {"text": "Where are you?", "quick_replies": [{"content_type": "location"}]},
        [out("interactive", {"type": "location_request_message", "body": {"text": "Where are you?"}, "action": {"name": "send_location"}})],
        id="location-request",
    ),
    pytest.param(
        {"text": "The manual", "buttons": [{"title": "Open the manual", "url": "https://shop.example/manual"}]},
        [out("interactive", {"type": "cta_url", "body": {"text": "The manual"},
                             "action": {"name": "cta_url", "parameters": {"display_text": "Open the manual", "url": "https://shop.example/manual"}}})],
        id="url-button",
    ),
]


@pytest.mark.parametrize("rasa_message, expected", EXACT)
async def test_each_response_type_arrives_exactly_and_is_accepted(sim, make_client, rasa_message, expected):
    await sim.customer_says()
    client = make_client(sim)
    wamids = await send_rendered(client, rasa_message)
    assert len(wamids) == len(expected) and all(w.startswith("wamid.") for w in wamids)
    assert await sim.outbound() == expected
    stats = await sim.stats()
    assert (stats["rejected"], stats["window_violations"], stats["accepted"]) == ({}, 0, len(expected))


async def test_split_text_and_numbered_choices_arrive_within_limits(sim, make_client):
    await sim.customer_says()
    client = make_client(sim)
    await send_rendered(client, {"text": LONG})
    rendered = render({"text": "Pick a slot", "buttons": BUTTONS})
    for message in rendered.messages:
        await client.send_message(CUSTOMER, message)
    received = await sim.outbound()
    assert [m["type"] for m in received] == ["text", "text", "text"]
    assert all(m.keys() == {*ENVELOPE, "type", "text"} and m["to"] == CUSTOMER for m in received)
    long_parts = [m["text"]["body"] for m in received[:2]]
    assert " ".join(long_parts) == LONG.strip() and all(len(p) <= 4096 and p.endswith(".") for p in long_parts)
    numbered = received[2]["text"]["body"]
    assert numbered.startswith("Pick a slot\n\n1. Option 1\n2. Option 2\n") and numbered.endswith("12. Option 12")
    assert rendered.numbered_choices[1] == ("2", '/choose{"n": 2}') and len(rendered.numbered_choices) == 12
    assert (await sim.stats())["rejected"] == {}


async def test_bad_custom_is_not_sent_and_validation_agrees_with_the_simulator(sim, make_client):
    """What render refuses, the simulator (Meta's limits) refuses too; what it lets through is accepted."""
    await sim.customer_says()
    client = make_client(sim)
    customs = [
        ({"type": "text", "text": {"body": "x" * 4097}}, 131009),
        ({"type": "image", "image": {"link": "https://x/y.jpg", "caption": "c" * 1025}}, 131009),
        ({"type": "audio", "audio": {"link": "https://x/y.mp3", "caption": "no"}}, 131009),
        ({"type": "image", "image": {"id": "1", "link": "https://x/y.jpg"}}, 131009),
        ({"type": "interactive", "interactive": {"type": "button", "body": {"text": "b"}, "action": {"buttons": [
            {"type": "reply", "reply": {"id": str(i), "title": "t" + str(i)}} for i in range(4)]}}}, 131009),
        ({"type": "interactive", "interactive": {"type": "button", "body": {"text": "b"}, "action": {"buttons": [
            {"type": "reply", "reply": {"id": "1", "title": "x" * 21}}]}}}, 131009),
        ({"type": "interactive", "interactive": {"type": "list", "body": {"text": "b"}, "action": {"button": "Go", "sections": [
            {"rows": [{"id": str(i), "title": "r"} for i in range(11)]}]}}}, 131009),
        ({"type": "interactive", "interactive": {"type": "location_request_message", "body": {"text": "b"}, "action": {}}}, 131009),
        ({"type": "location", "location": {"latitude": 95, "longitude": 0}}, 131009),
        ({"type": "location", "location": {"longitude": 0}}, 131008),
        ({"type": "contacts", "contacts": [{"name": {}}]}, 131008),
        ({"type": "template", "template": {"name": "hello_world"}}, 131008),
    ]
    for custom, code in customs:
        rendered = render({"custom": custom})
        assert rendered.messages == () and rendered.not_rendered == ("custom",), custom
        assert rendered.problems[0].startswith("custom: ") and message_problem(custom)
        with pytest.raises(GraphError) as raised:
            await client.send_message(CUSTOMER, custom)  # bypassing render: the simulator agrees
        assert raised.value.code == code, custom
    good = [
        {"type": "contacts", "contacts": [{"name": {"formatted_name": "Shop", "first_name": "Shop"}, "phones": [{"phone": "+4930123"}]}]},
        {"type": "template", "template": {"name": "order_update", "language": {"code": "en_US"},
                                          "components": [{"type": "body", "parameters": [{"type": "text", "text": "10042"}]}]}},
        {"location": {"latitude": "52.5", "longitude": "13.4"}},  # type inferred
        {"type": "interactive", "interactive": {"type": "list", "header": {"type": "text", "text": "Stores"},
                                                "body": {"text": "b" * 4096}, "footer": {"text": "f" * 60},
                                                "action": {"button": "b" * 20, "sections": [
                                                    {"title": "North", "rows": [{"id": "n", "title": "r" * 24, "description": "d" * 72}]},
                                                    {"title": "South", "rows": [{"id": "s", "title": "South"}]}]}}},
    ]
    for custom in good:
        await send_rendered(client, {"custom": custom})
    stats = await sim.stats()
    assert stats["accepted"] == len(good) and sum(stats["rejected"].values()) == len(customs)


async def test_custom_cannot_redirect_a_message(sim, make_client):
    await sim.customer_says()
    rendered = render({"custom": {"type": "text", "text": {"body": "hi"}, "to": OTHER}})
    assert rendered.messages == () and "to" in rendered.problems[0]
    # and the client never lets a message object override the recipient
    await make_client(sim).send_message(CUSTOMER, {"type": "text", "text": {"body": "hi"}, "to": OTHER})
    assert len(await sim.outbound(CUSTOMER)) == 1


# --- retries ---------------------------------------------------------------------------------


async def test_rate_limits_then_5xx_then_success_is_delivered_once(sim, make_client, fake_time, caplog):
    await sim.customer_says()
    await sim.faults({"status": 429, "code": 130429}, {"status": 429, "code": 130429}, {"status": 500})
    client = make_client(sim)
    with caplog.at_level(logging.INFO, logger="connector.client"):
        wamid = await client.send_message(CUSTOMER, {"type": "text", "text": {"body": "hello"}})
    assert (await sim.outbound()) == [out("text", {"body": "hello"})]
    stats = await sim.stats()
    assert (stats["accepted"], stats["faults_served"], stats["rejected"]) == (1, 3, {"130429": 2, "2": 1})
    assert fake_time.sleeps == [0.5, 1.0, 2.0]  # 0.5·2ⁿ, jitter pinned to its top
    retries = [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
    assert len(retries) == 3 and "130429" in retries[0] and "HTTP 500" in retries[2]
    assert wamid.startswith("wamid.")


RETRIED = [(429, 130429), (400, 131056), (503, 131057), (500, 131000), (503, 131016), (400, 1), (503, 2), (502, None), (500, 100)]
NOT_RETRIED = [
    (400, 131026, Undeliverable), (400, 131047, ReEngagementRequired), (400, 132001, TemplateError),
    (400, 132000, TemplateError), (401, 190, AuthError), (400, 4, AccountRateLimited), (400, 80007, AccountRateLimited),
    (400, 131048, GraphError), (400, 131050, MarketingStopped), (400, 131009, GraphError), (404, 100, GraphError),
]


@pytest.mark.parametrize("status, code", RETRIED)
async def test_transient_codes_are_retried(sim, make_client, fake_time, status, code):
    await sim.customer_says()
    await sim.faults({"status": status, **({"code": code} if code else {})})
    await make_client(sim).send_message(CUSTOMER, {"type": "text", "text": {"body": "x"}})
    assert await sim.served() == 2 and len(await sim.outbound()) == 1
    assert len(fake_time.sleeps) == 1


@pytest.mark.parametrize("status, code, error_class", NOT_RETRIED)
async def test_permanent_codes_are_raised_typed_and_not_retried(sim, make_client, fake_time, status, code, error_class):
    await sim.customer_says()
    await sim.faults({"status": status, "code": code})
    with pytest.raises(error_class) as raised:
        await make_client(sim).send_message(CUSTOMER, {"type": "text", "text": {"body": "x"}})
    assert type(raised.value) is error_class and raised.value.code == code and not raised.value.retryable
    assert raised.value.http_status == status
    assert await sim.served() == 1 and fake_time.sleeps == []
    assert await sim.outbound() == []


async def test_undeliverable_131026_is_served_once(sim, make_client, fake_time):
    await sim.customer_says()
    await sim.faults({"status": 400, "code": 131026})
    with pytest.raises(Undeliverable):
        await make_client(sim).send_message(CUSTOMER, {"type": "text", "text": {"body": "x"}})
    stats = await sim.stats()
    assert (stats["faults_served"], stats["rejected"], stats["accepted"]) == (1, {"131026": 1}, 0)
    assert fake_time.sleeps == []


async def test_sync_window_violation_is_re_engagement_required(make_sim, make_client, fake_time):
    sim = await make_sim(window_errors="sync")
    with pytest.raises(ReEngagementRequired) as raised:
        await make_client(sim).send_message(CUSTOMER, {"type": "text", "text": {"body": "anyone?"}})
    assert raised.value.http_status == 400 and "24 hours" in (raised.value.details or "")
    stats = await sim.stats()
    assert (stats["rejected"], stats["window_violations"], stats["accepted"]) == ({"131047": 1}, 1, 0)
    assert fake_time.sleeps == []


async def test_retry_budget_bounds_a_call_and_a_turn(sim, make_client, fake_time, caplog):
    """Budget 6 s, delays 1, 2, 4, …: the third retry (4 s) does not fit. A second send to the same
    customer within the 60 s window only has what is left; a minute later the budget is back."""
    await sim.customer_says()
    await sim.faults(*[{"status": 500}] * 20)
    client = make_client(sim, max_attempts=10, backoff_seconds=1.0, max_backoff_seconds=8.0, retry_budget_seconds=6.0)
    message = {"type": "text", "text": {"body": "x"}}
    with caplog.at_level(logging.WARNING, logger="connector.client"), pytest.raises(TransientError):
        await client.send_message(CUSTOMER, message)
    assert fake_time.sleeps == [1.0, 2.0] and await sim.served() == 3
    assert "retry budget" in caplog.records[-1].getMessage()

    with pytest.raises(TransientError):
        await client.send_message(CUSTOMER, message)  # 3 s of the budget left: one 1 s retry
    assert fake_time.sleeps == [1.0, 2.0, 1.0] and await sim.served() == 5

    with pytest.raises(TransientError):
        await client.send_message(OTHER, message)  # another customer has their own budget
    assert fake_time.sleeps[3:] == [1.0, 2.0]

    fake_time.now += 61
    await sim.call("DELETE", "/_sim/faults")
    await sim.faults({"status": 500})
    await client.send_message(CUSTOMER, message)
    assert fake_time.sleeps[5:] == [1.0]
    assert sum(fake_time.sleeps) <= 3 * 6


async def test_default_policy_stays_well_inside_the_lock(sim, make_client, fake_time):
    """Four failing messages of one turn: the retry sleeps AND the retried requests' own
    durations (each answer takes 0.2 s here) fit the 15 s budget, well inside Rasa's 60 s lock."""
    await sim.customer_says()
    await sim.faults(*[{"status": 429, "code": 130429, "delay": 0.2}] * 40)
    client = make_client(sim, random=lambda: 1.0)  # defaults: 5 attempts, 0.5 s doubling to 4 s, 15 s budget
    fake_time.real = True
    started = fake_time.clock()
    for _ in range(4):  # four messages of one turn, all failing
        with pytest.raises(RateLimited):
            await client.send_message(CUSTOMER, {"type": "text", "text": {"body": "x"}})
    elapsed = fake_time.clock() - started
    first_attempts = 4 * 0.2  # each message's first try is not a retry
    assert fake_time.sleeps[:4] == [0.5, 1.0, 2.0, 4.0]
    assert elapsed - sum(fake_time.sleeps) >= (await sim.served()) * 0.2  # the durations were real
    assert elapsed - first_attempts <= 15 + 0.3


@pytest.mark.parametrize("fault", [{"hold": 2.0}, {"hold": 0, "drop": True}])
async def test_an_answer_lost_after_meta_accepted_is_not_retried(sim, make_client, fake_time, fault):
    """Meta took the message and the answer never came: a retry would deliver it twice."""
    await sim.customer_says()
    await sim.faults(fault)
    client = make_client(sim, request_timeout=0.3)
    with pytest.raises(OutcomeUnknown):
        await client.send_message(CUSTOMER, {"type": "text", "text": {"body": "late"}}, callback_id="cb-1")
    assert fake_time.sleeps == []
    assert [m["text"]["body"] for m in await sim.outbound()] == ["late"]  # delivered, once
    assert (await sim.outbound())[0]["biz_opaque_callback_data"] == "cb-1"


async def test_unreachable_api_is_transient(make_client, fake_time):
    dead = Sim("http://127.0.0.1:9", [])
    try:
        client = make_client(dead, max_attempts=2)
        with pytest.raises(TransientError) as raised:
            await client.send_message(CUSTOMER, {"type": "text", "text": {"body": "x"}})
        assert raised.value.code is None and len(fake_time.sleeps) == 1
    finally:
        await dead.http.close()


# --- mark read, media, numbers, session ------------------------------------------------------


async def test_mark_read_with_and_without_typing_indicator(sim, make_client):
    first = await sim.customer_says(text="hi")
    second = await sim.customer_says(text="are you there?")
    client = make_client(sim)
    assert await client.mark_read(first["wamid"]) is None
    await client.mark_read(second["wamid"], typing_indicator=False)
    conversation = await sim.call("GET", f"/_sim/conversations/{CUSTOMER}")
    inbound = [m for m in conversation["messages"] if m["direction"] == "in"]
    assert [(m["status"], m["typing_indicator"]) for m in inbound] == [("read", True), ("read", False)]
    with pytest.raises(GraphError) as raised:
        await client.mark_read("wamid.unknown")
    assert raised.value.code == 100
    stats = await sim.stats()
    assert (stats["marked_read"], stats["accepted"], stats["window_violations"]) == (2, 0, 0)


async def test_download_media_played_and_uploaded(sim, make_client):
    await sim.customer_says(image={"caption": "my parcel", "mime_type": "image/png"})
    image = next(m for p in sim.bot_posts for e in p["entry"] for c in e["changes"] for m in c["value"].get("messages", []))
    client = make_client(sim)
    data, mime = await client.download_media(image["image"]["id"])
    assert (data, mime) == (b"simulated media content\nimage", "image/png")

    form = aiohttp.FormData()
    form.add_field("messaging_product", "whatsapp")
    form.add_field("type", "application/pdf")
    form.add_field("file", b"%PDF-1.4 invoice", filename="invoice.pdf", content_type="application/pdf")
    async with sim.http.post(f"{sim.url}/v23.0/{PNID}/media", data=form, headers={"Authorization": f"Bearer {TOKEN}"}) as response:
        media_id = (await response.json())["id"]
    assert await client.download_media(media_id) == (b"%PDF-1.4 invoice", "application/pdf")
    with pytest.raises(GraphError) as raised:
        await client.download_media("987654321")
    assert raised.value.code == 100


async def test_phone_number_id_per_send(sim, make_client):
    await sim.customer_says()
    client = make_client(sim)
    await client.send_message(CUSTOMER, {"type": "text", "text": {"body": "from the default number"}})
    await client.send_message(CUSTOMER, {"type": "text", "text": {"body": "explicit"}}, phone_number_id=PNID)
    with pytest.raises(GraphError) as raised:  # the simulator knows one number: proof the id is used
        await client.send_message(CUSTOMER, {"type": "text", "text": {"body": "other"}}, phone_number_id="999000")
    assert raised.value.code == 100 and "999000" in (raised.value.details or "")
    assert client.messages_url("999000").endswith("/v23.0/999000/messages")
    assert len(await sim.outbound()) == 2


async def test_username_customer_is_addressed_by_recipient(sim, make_client):
    await sim.customer_says(BSUID, text="hi", user_id=BSUID, omit_wa_id=True, username="ada")
    await make_client(sim).send_message(BSUID, {"type": "text", "text": {"body": "hello Ada"}})
    (payload,) = await sim.outbound(BSUID)
    assert payload == {"messaging_product": "whatsapp", "recipient_type": "individual", "recipient": BSUID,
                       "type": "text", "text": {"body": "hello Ada"}}
    assert (await sim.stats())["window_violations"] == 0


async def test_one_session_reused_and_recreated_after_close(sim, make_client):
    await sim.customer_says()
    client = make_client(sim)
    await client.send_message(CUSTOMER, {"type": "text", "text": {"body": "1"}})
    session = client._session
    await client.send_message(CUSTOMER, {"type": "text", "text": {"body": "2"}})
    assert client._session is session and not session.closed
    await client.close()
    assert session.closed
    await client.send_message(CUSTOMER, {"type": "text", "text": {"body": "3"}})
    assert client._session is not session
    assert len(await sim.outbound()) == 3


async def test_pacing_spaces_a_chatty_turn_through_the_client(sim, make_client, fake_time):
    await sim.customer_says()
    pacer = Pacer(customer_burst=2, customer_interval=6.0, clock=fake_time.clock, sleep=fake_time.sleep)
    client = make_client(sim, pacer=pacer)
    for n in range(4):
        await client.send_message(CUSTOMER, {"type": "text", "text": {"body": str(n)}})
    assert fake_time.sleeps == [6.0, 6.0]
    await client.send_message(OTHER, {"type": "text", "text": {"body": "other"}})  # not slowed
    assert fake_time.sleeps == [6.0, 6.0]
    assert len(await sim.outbound()) == 4


# --- pacing: pure timing ---------------------------------------------------------------------


def test_gcra_burst_then_steady_rate():
    bucket = Gcra(interval=6.0, burst=3)
    slots = []
    for _ in range(5):
        slot = bucket.earliest(0.0)
        bucket.book(slot)
        slots.append(slot)
    assert slots == [0.0, 0.0, 0.0, 6.0, 12.0]
    assert not bucket.idle(17.0) and bucket.idle(30.0)


def test_default_customer_bucket_lets_normal_turns_through():
    time = FakeTime()
    pacer = Pacer(clock=time.clock, sleep=time.sleep)
    for turn in range(8):  # a quick exchange: 4 messages per turn, a turn every 10 s
        assert [pacer.reserve(PNID, CUSTOMER) for _ in range(4)] == [0.0] * 4, turn
        time.now += 10
    # 32 messages in 80 s: the burst (30) plus what refilled (13) is not yet used up
    assert pacer.reserve(PNID, CUSTOMER) == 0.0


def test_customer_bucket_refills_one_per_interval_and_queues_concurrent_sends():
    time = FakeTime()
    pacer = Pacer(customer_burst=30, customer_interval=6.0, clock=time.clock, sleep=time.sleep)
    assert [pacer.reserve(PNID, CUSTOMER) for _ in range(30)] == [0.0] * 30
    assert [pacer.reserve(PNID, CUSTOMER) for _ in range(3)] == [6.0, 10.0, 10.0]  # capped at max_wait
    assert pacer.reserve(PNID, OTHER) == 0.0
    assert pacer.reserve("another-number", CUSTOMER) == 0.0


def test_min_gap_spaces_messages_to_one_customer():
    time = FakeTime()
    pacer = Pacer(customer_min_gap=0.2, clock=time.clock, sleep=time.sleep)
    assert [round(pacer.reserve(PNID, CUSTOMER), 6) for _ in range(3)] == [0.0, 0.2, 0.4]
    time.now += 1
    assert pacer.reserve(PNID, CUSTOMER) == 0.0


def test_number_throughput_across_customers():
    time = FakeTime()
    pacer = Pacer(messages_per_second=80, clock=time.clock, sleep=time.sleep)
    delays = [pacer.reserve(PNID, f"49151{n:08d}") for n in range(82)]
    assert delays[:80] == [0.0] * 80
    assert delays[80] == pytest.approx(1 / 80) and delays[81] == pytest.approx(2 / 80)
    assert pacer.reserve("106540352242923", CUSTOMER) == 0.0  # numbers are independent


async def test_wait_sleeps_only_when_needed_and_disabled_never_waits():
    time = FakeTime()
    pacer = Pacer(customer_burst=1, customer_interval=2.0, clock=time.clock, sleep=time.sleep)
    assert await pacer.wait(PNID, CUSTOMER) == 0.0 and time.sleeps == []
    assert await pacer.wait(PNID, CUSTOMER) == 2.0 and time.sleeps == [2.0]
    off = Pacer.disabled(clock=time.clock, sleep=time.sleep)
    assert [off.reserve(PNID, CUSTOMER) for _ in range(500)] == [0.0] * 500


def test_idle_customers_are_forgotten():
    time = FakeTime()
    pacer = Pacer(clock=time.clock, sleep=time.sleep)
    for n in range(1023):
        pacer.reserve(PNID, f"c{n}")
    time.now += 20  # every bucket has refilled (the last of 1,023 went out ~10 s late at 80/s)
    pacer.reserve(PNID, "last")  # the 1,024th reservation prunes
    assert pacer.tracked_customers() == 1


def test_pacer_rejects_nonsense():
    with pytest.raises(ValueError):
        Pacer(customer_burst=0)
    with pytest.raises(ValueError):
        Pacer(messages_per_second=-1)


async def test_a_gateway_error_page_on_a_send_is_an_unknown_outcome_but_retried_for_a_read(make_client, fake_time):
    """A 502 page from a proxy proves nothing about whether Meta took the message."""
    calls = []

    async def gateway(request):
        calls.append(request.method)
        return web.Response(status=502, text="<html>Bad Gateway</html>", content_type="text/html")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", gateway)
    runner, url = await _serve(app)
    proxy = Sim(url, [])
    try:
        client = make_client(proxy, max_attempts=3)
        with pytest.raises(OutcomeUnknown):
            await client.send_message(CUSTOMER, {"type": "text", "text": {"body": "x"}})
        assert calls == ["POST"]
        with pytest.raises(TransientError):
            await client.download_media("123")
        assert calls == ["POST", "GET", "GET", "GET"]
    finally:
        await proxy.http.close()
        await runner.cleanup()
