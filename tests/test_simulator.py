"""The local WhatsApp Cloud API simulator, over real HTTP: a simulator app and a tiny recording bot
on 127.0.0.1 ephemeral ports. No Rasa involved; waits are on conditions, never fixed sleeps."""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from typing import Any, Awaitable, Callable, Deque, Dict, List, Optional, Union

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from connector.signature import is_valid
from connector.simulator import Settings, SettingsError, create_app
from connector.simulator import cli

TOKEN = "test-access-token"
PNID = "106540352242922"
SECRET = "test-app-secret"
DISPLAY = "15550001234"
CUSTOMER = "4915112345678"
OTHER = "4915187654321"
EXTRA = "106540352240001"  # a second business number of the same app
EXTRA_DISPLAY = "15550000001"
DAY = 24 * 60 * 60
FAST = (0.05, 0.05, 0.05)  # redeliver_delays for tests: Meta's backoff, in milliseconds
STALL = 0.5  # a bot answer this late times out a simulator with webhook_timeout=0.2


class Bot:
    """Stands in for the Rasa channel: records every webhook POST and checks its signature."""

    def __init__(self) -> None:
        self.posts: List[Dict[str, Any]] = []
        self.on_message: Optional[Callable[[Dict[str, Any]], Awaitable[None]]] = None
        self.answers: Deque[Union[int, str]] = deque()  # for the next valid posts: a status, or "stall" (a timeout)
        self.hold = 0.0  # seconds every post is held, so concurrency shows in max_in_flight
        self.in_flight = self.max_in_flight = 0
        self._changed = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self._handle(request)
        finally:
            self.in_flight -= 1

    async def _handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        header = request.headers.get("X-Hub-Signature-256")
        valid = header is not None and is_valid(raw, header, SECRET)
        body = json.loads(raw) if raw.strip().startswith((b"{", b"[")) else raw.decode()
        self.posts.append({"raw": raw, "signature": header, "valid": valid, "body": body})
        self._changed.set()
        if not valid:
            return web.json_response({"error": "bad signature"}, status=403)
        await asyncio.sleep(self.hold)
        answer = self.answers.popleft() if self.answers else 200
        if answer == "stall":
            await asyncio.sleep(STALL)
        elif answer != 200:
            return web.json_response({"error": "not now"}, status=answer)
        if self.on_message is not None:
            for message in self.messages_in(body):
                await self.on_message(message)
        return web.json_response({"ok": True})

    @staticmethod
    def values_in(body: Any) -> List[Dict[str, Any]]:
        if not isinstance(body, dict):
            return []
        return [c["value"] for e in body.get("entry", []) for c in e.get("changes", [])]

    def messages_in(self, body: Any) -> List[Dict[str, Any]]:
        return [m for v in self.values_in(body) for m in v.get("messages", [])]

    def statuses(self) -> List[Dict[str, Any]]:
        return [s for p in self.posts for v in self.values_in(p["body"]) for s in v.get("statuses", [])]

    def messages(self) -> List[Dict[str, Any]]:
        return [m for p in self.posts for m in self.messages_in(p["body"])]

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        async def loop() -> None:
            while not predicate():
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(loop(), timeout)


@pytest.fixture
async def bot():
    bot = Bot()
    app = web.Application()
    app.router.add_post("/webhooks/whatsapp/webhook", bot.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    bot.url = str(server.make_url("/webhooks/whatsapp/webhook"))
    yield bot
    await server.close()


@pytest.fixture
async def make_sim(bot):
    """Factory: a running simulator (as a TestClient) pointed at the recording bot."""
    clients: List[TestClient] = []

    async def make(**overrides: Any) -> TestClient:
        server_options = overrides.pop("server_options", {})  # aiohttp server knobs, not Settings
        settings = Settings(
            access_token=TOKEN, phone_number_id=PNID, app_secret=SECRET, display_phone_number=DISPLAY,
            bot_webhook_url=overrides.pop("bot_webhook_url", bot.url), **overrides,
        )
        client = TestClient(TestServer(create_app(settings), host="127.0.0.1", **server_options))
        await client.start_server()
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


@pytest.fixture
async def sim(make_sim):
    return await make_sim()


async def send(sim: TestClient, payload: Dict[str, Any], token: str = TOKEN, pnid: str = PNID, version: str = "v23.0"):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    resp = await sim.post(f"/{version}/{pnid}/messages", json=payload, headers=headers)
    return resp.status, await resp.json()


async def customer_says(sim: TestClient, wa_id: str = CUSTOMER, **spec: Any) -> Dict[str, Any]:
    spec = spec or {"text": "hi"}
    resp = await sim.post(f"/_sim/customers/{wa_id}/messages", json=spec)
    assert resp.status == 200, await resp.text()
    return await resp.json()


async def stats(sim: TestClient) -> Dict[str, Any]:
    return await (await sim.get("/_sim/stats")).json()


async def conversation(sim: TestClient, wa_id: str = CUSTOMER) -> Dict[str, Any]:
    resp = await sim.get(f"/_sim/conversations/{wa_id}")
    assert resp.status == 200
    return await resp.json()


async def settled(sim: TestClient, timeout: float = 5.0) -> Dict[str, Any]:
    """The stats once no redelivery is pending any more (each lands after the bot's answer)."""
    deadline = time.monotonic() + timeout
    while (s := await stats(sim))["pending_redeliveries"]:
        assert time.monotonic() < deadline, f"redeliveries still pending: {s}"
        await asyncio.sleep(0.01)
    return s


def text(body: str, to: str = CUSTOMER) -> Dict[str, Any]:
    return {"messaging_product": "whatsapp", "recipient_type": "individual", "to": to, "type": "text", "text": {"body": body}}


def interactive(inter: Dict[str, Any], to: str = CUSTOMER) -> Dict[str, Any]:
    return {"messaging_product": "whatsapp", "to": to, "type": "interactive", "interactive": inter}


def buttons(*titles: str, ids: Optional[List[str]] = None) -> Dict[str, Any]:
    ids = ids or [f"/b{i}" for i in range(len(titles))]
    return interactive({
        "type": "button",
        "body": {"text": "Pick one"},
        "action": {"buttons": [{"type": "reply", "reply": {"id": i, "title": t}} for i, t in zip(ids, titles)]},
    })


def list_message(rows_per_section: List[int], *, row_title: str = "Row", description: str = "", titled: bool = True,
                 button: str = "Choose") -> Dict[str, Any]:
    sections = []
    for s, n in enumerate(rows_per_section):
        rows = [{"id": f"s{s}r{r}", "title": row_title, **({"description": description} if description else {})} for r in range(n)]
        sections.append({**({"title": f"Section {s}"} if titled else {}), "rows": rows})
    return interactive({"type": "list", "body": {"text": "Orders"}, "action": {"button": button, "sections": sections}})


def template(name: str, lang: str = "en_US", components: Optional[List[Dict[str, Any]]] = None, to: str = CUSTOMER):
    tpl: Dict[str, Any] = {"name": name, "language": {"code": lang}}
    if components is not None:
        tpl["components"] = components
    return {"messaging_product": "whatsapp", "to": to, "type": "template", "template": tpl}


def body_params(*values: str) -> List[Dict[str, Any]]:
    return [{"type": "body", "parameters": [{"type": "text", "text": v} for v in values]}]


# --- auth and envelope -----------------------------------------------------------------------


async def test_wrong_or_missing_token_is_401_oauth_190(sim):
    for token in ("wrong-token", None):
        status, body = await send(sim, text("hi"), token=token)
        assert status == 401
        error = body["error"]
        assert error["code"] == 190
        assert error["type"] == "OAuthException"
        assert error["error_data"]["messaging_product"] == "whatsapp"
        assert error["fbtrace_id"]
    status, body = await send(sim, text("hi"), pnid="999")
    assert (status, body["error"]["code"]) == (400, 100)
    assert (await stats(sim))["rejected"] == {"100": 1, "190": 2}


# --- limits ----------------------------------------------------------------------------------

media_both = {"messaging_product": "whatsapp", "to": CUSTOMER, "type": "image", "image": {"id": "1", "link": "https://x/y.jpg"}}
media_none = {"messaging_product": "whatsapp", "to": CUSTOMER, "type": "image", "image": {"caption": "c"}}
audio_caption = {"messaging_product": "whatsapp", "to": CUSTOMER, "type": "audio", "audio": {"id": "1", "caption": "c"}}
long_caption = {"messaging_product": "whatsapp", "to": CUSTOMER, "type": "image", "image": {"id": "1", "caption": "c" * 1025}}


@pytest.mark.parametrize(
    "payload, code",
    [
        (text("x" * 4097), 131009),
        (text(""), 131008),
        ({**text("hi"), "messaging_product": "sms"}, 100),
        ({k: v for k, v in text("hi").items() if k != "to"}, 100),
        ({**text("hi"), "type": "carousel"}, 100),
        (buttons("A", "B", "C", "D"), 131009),
        (buttons("x" * 21), 131009),
        (buttons("A", "B", ids=["/same", "/same"]), 131009),
        (buttons(ids=[]), 131008),
        (list_message([6, 5]), 131009),
        (list_message([11]), 131009),
        (list_message([2, 2], titled=False), 131008),
        (list_message([1], row_title="r" * 25), 131009),
        (list_message([1], description="d" * 73), 131009),
        (list_message([1], button="b" * 21), 131009),
        (list_message([1] * 11), 131009),
        (interactive({"type": "button", "action": {"buttons": []}}), 131008),
        (interactive({**buttons("A")["interactive"], "footer": {"text": "f" * 61}}), 131009),
        (interactive({**buttons("A")["interactive"], "header": {"type": "text", "text": "h" * 61}}), 131009),
        (interactive({**buttons("A")["interactive"], "body": {"text": "b" * 1025}}), 131009),
        (media_both, 131009),
        (media_none, 131008),
        (audio_caption, 131009),
        (long_caption, 131009),
        (interactive({"type": "location_request_message", "body": {"text": "Where?"}, "action": {"name": "send_it"}}), 131009),
        (interactive({"type": "location_request_message", "body": {"text": "Where?"}}), 131008),
        (template("no_such_template"), 132001),
        (template("order_update", "de"), 132001),
        (template("order_update"), 132000),
        (template("order_update", components=body_params("1", "2")), 132000),
        (template("order_status_update", components=body_params("10042")), 132000),
        (template("hello_world", components=body_params("extra")), 132000),
        (template("opt_in_reminder", components=[{"type": "button", "sub_type": "quick_reply", "index": "1",
                                                  "parameters": [{"type": "payload", "payload": "x"}]}]), 132000),
        (template("paused_promo"), 132015),
    ],
)
async def test_meta_limits_are_enforced(sim, payload, code):
    await customer_says(sim)  # window open: only the limit can be the reason
    status, body = await send(sim, payload)
    assert status == 400, body
    assert body["error"]["code"] == code, body
    assert body["error"]["error_data"]["details"]
    assert (await stats(sim))["accepted"] == 0
    conv = await conversation(sim)
    assert [m["direction"] for m in conv["messages"]] == ["in"]
    if "to" in payload:
        assert conv["rejected"][0]["code"] == code


@pytest.mark.parametrize(
    "payload",
    [
        text("x" * 4096),
        buttons("Order status", "x" * 20, "Talk to a person"),
        list_message([5, 5], row_title="r" * 24, description="d" * 72),
        list_message([3], titled=False),
        {"messaging_product": "whatsapp", "to": CUSTOMER, "type": "image", "image": {"link": "https://x/y.jpg", "caption": "c" * 1024}},
        {"messaging_product": "whatsapp", "to": "+49 151 12345678", "type": "reaction", "reaction": {"message_id": "wamid.X", "emoji": "👍"}},
        interactive({"type": "location_request_message", "body": {"text": "Where?"}, "action": {"name": "send_location"}}),
        template("hello_world"),
        template("order_update", components=body_params("10042")),
        template("order_update", "es", components=body_params("10042")),
        template("order_status_update", components=body_params("10042", "shipped")),
        template("opt_in_reminder"),
        template("opt_in_reminder", components=[{"type": "button", "sub_type": "quick_reply", "index": "0",
                                                 "parameters": [{"type": "payload", "payload": "Unsubscribe"}]}]),
    ],
)
async def test_valid_messages_are_accepted(sim, payload):
    await customer_says(sim)
    status, body = await send(sim, payload)
    assert status == 200, body
    assert body["messaging_product"] == "whatsapp"
    assert body["contacts"] == [{"input": payload["to"], "wa_id": CUSTOMER}]
    assert body["messages"][0]["id"].startswith("wamid.")
    assert (await stats(sim))["window_violations"] == 0


# --- customer messages -----------------------------------------------------------------------


async def test_customer_message_is_a_signed_meta_shaped_webhook(sim, bot):
    now = (await (await sim.get("/_sim/clock")).json())["now"]
    played = await customer_says(sim, button_reply={"id": "/order_status", "title": "Order status"})
    assert played["webhook_status"] == 200
    assert len(bot.posts) == 1
    post = bot.posts[0]
    assert post["valid"]
    assert b"\\/order_status" in post["raw"]  # Meta escapes slashes: only raw-byte verification passes
    body = post["body"]
    assert body["object"] == "whatsapp_business_account"
    change = body["entry"][0]["changes"][0]
    assert change["field"] == "messages"
    value = change["value"]
    assert value["messaging_product"] == "whatsapp"
    assert value["metadata"] == {"display_phone_number": DISPLAY, "phone_number_id": PNID}
    assert value["contacts"] == [{"profile": {"name": "Customer 5678"}, "wa_id": CUSTOMER}]
    (message,) = value["messages"]
    assert message["from"] == CUSTOMER
    assert message["id"] == played["wamid"] and message["id"].startswith("wamid.")
    assert isinstance(message["timestamp"], str) and abs(int(message["timestamp"]) - now) <= 2
    assert message["type"] == "interactive"
    assert message["interactive"] == {"type": "button_reply", "button_reply": {"id": "/order_status", "title": "Order status"}}
    conv = await conversation(sim)
    assert conv["window_open"] and conv["last_inbound_at"] == int(message["timestamp"])
    assert conv["messages"][0]["payload"] == message


async def test_message_kinds_and_username_customers(sim, bot):
    await customer_says(sim, text="hello", name="Ada", context={"id": "wamid.prev"})
    await customer_says(sim, image={"caption": "my parcel"})
    await customer_says(sim, button={"payload": "Unsubscribe", "text": "Unsubscribe"})
    await customer_says(sim, "US.13491208655302741918", text="hi", user_id="US.13491208655302741918", omit_wa_id=True, username="ada")
    text_msg, image_msg, button_msg, username_msg = bot.messages()
    assert text_msg["context"] == {"id": "wamid.prev", "from": DISPLAY}
    assert bot.values_in(bot.posts[0]["body"])[0]["contacts"][0]["profile"]["name"] == "Ada"
    assert image_msg["type"] == "image" and image_msg["image"]["caption"] == "my parcel"
    assert button_msg["button"] == {"payload": "Unsubscribe", "text": "Unsubscribe"}
    contact = bot.values_in(bot.posts[3]["body"])[0]["contacts"][0]
    assert "wa_id" not in contact and contact["user_id"] == "US.13491208655302741918"
    assert "from" not in username_msg and username_msg["from_user_id"] == "US.13491208655302741918"

    # media is fetchable the way the connector does it at Meta: GET /{media-id}, then the URL
    media = await (await sim.get(f"/v23.0/{image_msg['image']['id']}", headers={"Authorization": f"Bearer {TOKEN}"})).json()
    assert media["mime_type"] == "image/jpeg" and media["id"] == image_msg["image"]["id"]
    download = await sim.get(media["url"].replace(str(sim.make_url("")).rstrip("/"), ""), headers={"Authorization": f"Bearer {TOKEN}"})
    assert download.status == 200 and len(await download.read()) == media["file_size"]

    # replying to a username customer by business-scoped user id
    status, body = await send(sim, {"messaging_product": "whatsapp", "recipient": "US.13491208655302741918", "type": "text", "text": {"body": "hey"}})
    assert status == 200 and body["contacts"] == [{"input": "US.13491208655302741918", "user_id": "US.13491208655302741918"}]
    await bot.wait_for(lambda: len(bot.statuses()) == 3)
    assert bot.statuses()[0]["recipient_user_id"] == "US.13491208655302741918"


async def test_unreachable_bot_without_redelivery_is_502_and_not_recorded(make_sim):
    dead = await make_sim(bot_webhook_url="http://127.0.0.1:9/webhook", redeliver_delays=())
    resp = await dead.post(f"/_sim/customers/{CUSTOMER}/messages", json={"text": "hi"})
    assert resp.status == 502
    assert "not delivered" in (await resp.json())["error"]
    assert (await dead.get(f"/_sim/conversations/{CUSTOMER}")).status == 404
    assert (await stats(dead))["webhook_failures"] == 1
    status, body = await send(dead, text("hi"))
    assert (await stats(dead))["window_violations"] == 1  # the window never opened


async def test_batch_is_one_post_holding_every_message(sim, bot):
    resp = await sim.post("/_sim/batch", json={"messages": [
        {"wa_id": CUSTOMER, "text": "first"},
        {"wa_id": OTHER, "text": "other customer"},
        {"wa_id": CUSTOMER, "text": "second"},
    ]})
    assert resp.status == 200
    result = await resp.json()
    assert len(result["wamids"]) == 3 and len(set(result["wamids"])) == 3
    assert len(bot.posts) == 1 and bot.posts[0]["valid"]
    (entry,) = bot.posts[0]["body"]["entry"]
    first, second = (c["value"] for c in entry["changes"])
    assert [m["text"]["body"] for m in first["messages"]] == ["first", "second"]
    assert first["contacts"][0]["wa_id"] == CUSTOMER
    assert [m["text"]["body"] for m in second["messages"]] == ["other customer"]
    assert [m["id"] for m in bot.messages()] == [result["wamids"][i] for i in (0, 2, 1)]

    resp = await sim.post("/_sim/batch", json={"split_entries": True, "messages": [
        {"wa_id": CUSTOMER, "text": "a"}, {"wa_id": OTHER, "text": "b"}]})
    assert resp.status == 200
    assert len(bot.posts[1]["body"]["entry"]) == 2
    assert (await conversation(sim, OTHER))["window_open"]


async def test_raw_webhook_signature_modes(sim, bot):
    for mode, bot_status in (("valid", 200), ("invalid", 403), ("missing", 403)):
        resp = await sim.post("/_sim/webhook", json={"body": {"object": "whatsapp_business_account", "entry": []}, "signature": mode})
        assert (await resp.json())["status"] == bot_status
    resp = await sim.post("/_sim/webhook", json={"body": "not json at all", "signature": "valid"})
    assert (await resp.json())["status"] == 200
    assert [p["valid"] for p in bot.posts] == [True, False, False, True]
    assert bot.posts[2]["signature"] is None
    assert bot.posts[3]["raw"] == b"not json at all"
    s = await stats(sim)
    assert (s["webhooks_sent"], s["webhook_failures"]) == (0, 0)  # probes are not traffic


# --- sending, statuses, the care window ------------------------------------------------------


async def test_free_form_in_window_gets_sent_delivered_read(sim, bot):
    await customer_says(sim)
    status, body = await send(sim, text("Hello!"))
    assert status == 200
    wamid = body["messages"][0]["id"]
    await bot.wait_for(lambda: len(bot.statuses()) == 3)
    assert all(p["valid"] for p in bot.posts)
    assert [s["status"] for s in bot.statuses()] == ["sent", "delivered", "read"]
    for item in bot.statuses():
        assert item["id"] == wamid and item["recipient_id"] == CUSTOMER and isinstance(item["timestamp"], str)
        assert item["pricing"] == {"billable": False, "pricing_model": "PMP", "category": "service", "type": "free_customer_service"}
    assert "expiration_timestamp" in bot.statuses()[0]["conversation"]  # v23.0 still has `conversation`
    out = (await conversation(sim))["messages"][1]
    assert (out["direction"], out["wamid"], out["status"], out["text"]) == ("out", wamid, "read", "Hello!")
    assert out["payload"] == text("Hello!")
    assert await stats(sim) == {
        "accepted": 1, "rejected": {}, "window_violations": 0, "webhooks_sent": 4, "webhook_failures": 0,
        "redeliveries": 0, "webhooks_refused": {}, "pending_redeliveries": 0,
        "inbound_messages": 1, "statuses_sent": 3, "marked_read": 0, "faults_served": 0,
        "template_list_reads": 0, "template_list_faults": 0, "template_webhooks": 0,
    }


async def test_window_closes_at_24h_async_failed_status(sim, bot):
    await customer_says(sim)
    await sim.post("/_sim/clock", json={"advance": DAY - 5})
    assert (await send(sim, text("still inside")))[0] == 200
    await bot.wait_for(lambda: len(bot.statuses()) == 3)
    await sim.post("/_sim/clock", json={"advance": 5})
    assert not (await conversation(sim))["window_open"]

    status, body = await send(sim, text("too late"))
    assert status == 200  # accepted, like Meta: the failure comes later
    wamid = body["messages"][0]["id"]
    await bot.wait_for(lambda: len(bot.statuses()) == 4)
    failed = bot.statuses()[-1]
    assert failed["id"] == wamid and failed["status"] == "failed" and "pricing" not in failed
    (error,) = failed["errors"]
    assert error["code"] == 131047
    assert error["title"] == error["message"] == "Re-engagement message"
    assert "24 hours" in error["error_data"]["details"] and error["href"]
    out = (await conversation(sim))["messages"][-1]
    assert out["status"] == "failed" and out["errors"][0]["code"] == 131047
    assert (await stats(sim))["window_violations"] == 1

    # a template outside the window is fine, billed, and no violation
    status, _ = await send(sim, template("order_update", components=body_params("10042")))
    assert status == 200
    await bot.wait_for(lambda: len(bot.statuses()) == 7)
    assert [s["status"] for s in bot.statuses()[4:]] == ["sent", "delivered", "read"]
    assert bot.statuses()[-1]["pricing"]["category"] == "utility" and bot.statuses()[-1]["pricing"]["billable"]
    assert (await stats(sim))["window_violations"] == 1

    # the customer writing again reopens the window
    await customer_says(sim, text="back")
    assert (await send(sim, text("welcome back")))[0] == 200
    assert (await stats(sim))["window_violations"] == 1


async def test_sync_window_errors_reject_with_131047(make_sim, bot):
    sim = await make_sim(window_errors="sync")
    status, body = await send(sim, text("never wrote"))
    assert status == 400 and body["error"]["code"] == 131047
    await customer_says(sim, text="hi", timestamp=int(time.time()) - DAY - 60)  # wrote, but yesterday
    status, body = await send(sim, text("too late"))
    assert status == 400 and body["error"]["code"] == 131047
    assert (await send(sim, template("hello_world")))[0] == 200
    s = await stats(sim)
    assert (s["window_violations"], s["rejected"], s["accepted"]) == (2, {"131047": 2}, 1)
    # runtime switch back to async
    await sim.post("/_sim/config", json={"window_errors": "async"})
    assert (await send(sim, text("async now")))[0] == 200


async def test_bot_replying_inside_the_webhook_sees_an_open_window(sim, bot):
    async def reply(message):
        await send(sim, text(f"echo: {message['text']['body']}", to=message["from"]))

    bot.on_message = reply
    await customer_says(sim, text="ping")
    conv = await (await sim.get(f"/_sim/conversations/{CUSTOMER}/wait", params={"outbound": "1", "timeout": "5"})).json()
    assert conv["messages"][1]["text"] == "echo: ping"
    assert (await stats(sim))["window_violations"] == 0


async def test_configured_statuses_and_mark_read(make_sim, bot):
    sim = await make_sim(statuses=("sent",))
    played = await customer_says(sim)
    await send(sim, text("one"))
    await bot.wait_for(lambda: len(bot.statuses()) == 1)
    await sim.post("/_sim/config", json={"statuses": ""})
    await send(sim, text("two"))
    read = {"messaging_product": "whatsapp", "status": "read", "message_id": played["wamid"], "typing_indicator": {"type": "text"}}
    assert await send(sim, read) == (200, {"success": True})
    inbound = (await conversation(sim))["messages"][0]
    assert inbound["status"] == "read" and inbound["typing_indicator"]
    status, body = await send(sim, {**read, "message_id": "wamid.unknown"})
    assert status == 400 and body["error"]["code"] == 100
    # a read receipt is not a message: no window check even long after
    await sim.post("/_sim/clock", json={"advance": 2 * DAY})
    assert (await send(sim, read))[0] == 200
    assert len(bot.statuses()) == 1
    s = await stats(sim)
    assert (s["marked_read"], s["window_violations"], s["accepted"]) == (2, 0, 2)


async def test_faults_queue(sim, bot):
    await customer_says(sim)
    resp = await sim.put("/_sim/faults", json={"responses": [{"status": 429, "code": 130429}, {"status": 500}, {"async_code": 131026}]})
    assert resp.status == 200
    status, body = await send(sim, text("1"))
    assert (status, body["error"]["code"]) == (429, 130429)
    status, body = await send(sim, text("2"))
    assert (status, body["error"]["code"]) == (500, 2)
    status, body = await send(sim, {**text("3"), "biz_opaque_callback_data": "ticket-3"})
    assert status == 200
    await bot.wait_for(lambda: len(bot.statuses()) == 1)
    assert bot.statuses()[0]["status"] == "failed" and bot.statuses()[0]["errors"][0]["code"] == 131026
    assert bot.statuses()[0]["biz_opaque_callback_data"] == "ticket-3"  # echoed on failures too
    assert (await send(sim, text("4")))[0] == 200
    assert (await (await sim.get("/_sim/faults")).json())["responses"] == []
    s = await stats(sim)
    assert (s["faults_served"], s["rejected"], s["accepted"]) == (3, {"130429": 1, "2": 1}, 2)


async def send_raw(sim: TestClient, payload: Dict[str, Any], **kwargs: Any) -> aiohttp.ClientResponse:
    return await sim.post(f"/v23.0/{PNID}/messages", json=payload, headers={"Authorization": f"Bearer {TOKEN}"}, **kwargs)


async def assert_accepted_despite_lost_answer(sim: TestClient, bot: Bot, opaque: str, body: str) -> str:
    """The send whose answer was lost is in the conversation, counted, and its statuses (echoing
    `biz_opaque_callback_data`) reach the bot. Returns its wamid."""
    conv = await (await sim.get(f"/_sim/conversations/{CUSTOMER}/wait", params={"outbound": "1", "timeout": "5"})).json()
    (out,) = [m for m in conv["messages"] if m["direction"] == "out"]
    assert out["text"] == body and out["payload"]["biz_opaque_callback_data"] == opaque
    await bot.wait_for(lambda: len(bot.statuses()) == 3)
    assert [s["status"] for s in bot.statuses()] == ["sent", "delivered", "read"]
    assert all(s["id"] == out["wamid"] and s["biz_opaque_callback_data"] == opaque for s in bot.statuses())
    assert all(p["valid"] for p in bot.posts)
    s = await stats(sim)
    assert (s["accepted"], s["faults_served"], s["rejected"], s["statuses_sent"]) == (1, 1, {}, 3)
    return out["wamid"]


@pytest.mark.parametrize("handler_cancellation", [False, True])
async def test_hold_accepts_but_the_answer_comes_after_the_client_gave_up(make_sim, bot, handler_cancellation):
    # with handler_cancellation aiohttp cancels the held handler when the client leaves: nothing is lost
    sim = await make_sim(server_options={"handler_cancellation": handler_cancellation})
    await customer_says(sim)
    assert (await sim.put("/_sim/faults", json={"responses": [{"hold": 30}]})).status == 200
    with pytest.raises(asyncio.TimeoutError):
        await send_raw(sim, {**text("your order shipped"), "biz_opaque_callback_data": "order-42"},
                       timeout=aiohttp.ClientTimeout(total=0.3))
    await assert_accepted_despite_lost_answer(sim, bot, "order-42", "your order shipped")


@pytest.mark.parametrize("hold", [0, 0.2])
async def test_hold_and_drop_closes_the_connection_without_an_answer(sim, bot, hold):
    await customer_says(sim)
    assert (await sim.put("/_sim/faults", json={"responses": [{"hold": hold, "drop": True}]})).status == 200
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await send_raw(sim, {**text("your order shipped"), "biz_opaque_callback_data": "order-43"},
                       timeout=aiohttp.ClientTimeout(total=5))
    await assert_accepted_despite_lost_answer(sim, bot, "order-43", "your order shipped")


async def test_after_a_held_or_dropped_answer_the_next_send_answers_normally(sim, bot):
    await customer_says(sim)
    await sim.put("/_sim/faults", json={"responses": [{"hold": 0, "drop": True}, {"hold": 0.3}]})
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await send_raw(sim, text("dropped"))
    started = time.monotonic()
    status, body = await send(sim, text("held"))  # a patient client gets the real answer, late
    assert status == 200 and time.monotonic() - started >= 0.3
    held = body["messages"][0]["id"]
    status, body = await send(sim, text("normal"))
    assert status == 200 and body["contacts"] == [{"input": CUSTOMER, "wa_id": CUSTOMER}]
    out = [m for m in (await conversation(sim))["messages"] if m["direction"] == "out"]
    assert [m["text"] for m in out] == ["dropped", "held", "normal"]
    assert [m["wamid"] for m in out][1:] == [held, body["messages"][0]["id"]]
    assert (await (await sim.get("/_sim/faults")).json())["responses"] == []
    await bot.wait_for(lambda: len(bot.statuses()) == 9)
    s = await stats(sim)
    assert (s["accepted"], s["faults_served"]) == (3, 2)


# --- waiting, clock, reset -------------------------------------------------------------------


async def test_wait_returns_when_outbound_arrives_or_408(sim):
    await customer_says(sim)
    waiter = asyncio.create_task(sim.get(f"/_sim/conversations/{CUSTOMER}/wait", params={"outbound": "2", "timeout": "5"}))
    await send(sim, text("one"))
    done, _ = await asyncio.wait({waiter}, timeout=0.05)
    assert not done  # one outbound message is not enough
    await send(sim, text("two"))
    resp = await asyncio.wait_for(waiter, 5)
    assert resp.status == 200
    assert [m["text"] for m in (await resp.json())["messages"] if m["direction"] == "out"] == ["one", "two"]

    resp = await sim.get(f"/_sim/conversations/{CUSTOMER}/wait", params={"outbound": "3", "timeout": "0.1"})
    assert resp.status == 408
    assert len((await resp.json())["messages"]) == 3


async def test_clock_and_reset(sim, bot):
    await sim.post("/_sim/clock", json={"now": 2_000_000_000})
    clock = await (await sim.get("/_sim/clock")).json()
    assert abs(clock["now"] - 2_000_000_000) <= 1
    played = await customer_says(sim)
    assert abs(played["timestamp"] - 2_000_000_000) <= 1
    await sim.put("/_sim/faults", json={"responses": [{"status": 500}]})
    await send(sim, text("x", to=OTHER))  # consumes the fault
    await send(sim, text("never wrote", to=OTHER))

    assert (await sim.post("/_sim/reset")).status == 200
    assert (await sim.get(f"/_sim/conversations/{CUSTOMER}")).status == 404
    assert (await (await sim.get("/_sim/conversations")).json())["conversations"] == []
    assert await stats(sim) == {
        "accepted": 0, "rejected": {}, "window_violations": 0, "webhooks_sent": 0, "webhook_failures": 0,
        "redeliveries": 0, "webhooks_refused": {}, "pending_redeliveries": 0,
        "inbound_messages": 0, "statuses_sent": 0, "marked_read": 0, "faults_served": 0,
        "template_list_reads": 0, "template_list_faults": 0, "template_webhooks": 0,
    }
    assert (await (await sim.get("/_sim/clock")).json())["offset"] == 0
    assert (await sim.get("/_sim/health")).status == 200


# --- CLI -------------------------------------------------------------------------------------


def test_serve_without_required_settings_names_them(monkeypatch, capsys):
    for name in ("WHATSAPP_ACCESS_TOKEN", "WHATSAPP_PHONE_NUMBER_ID", "WHATSAPP_APP_SECRET"):
        monkeypatch.delenv(name, raising=False)
    assert cli.main(["serve", "--access-token", "t", "--phone-number-id", "1"]) == 2
    assert "app_secret" in capsys.readouterr().err
    assert cli.main([]) == 2
    assert "access_token" in capsys.readouterr().err


async def test_cli_say_and_show(sim, bot, capsys):
    async def reply(message):
        await send(sim, buttons("Order status", "Talk to a person"))

    bot.on_message = reply
    url = str(sim.make_url("")).rstrip("/")
    rc = await asyncio.to_thread(cli.main, ["say", CUSTOMER, "hello", "--name", "Ada", "--sim-url", url, "--quiet-after", "0.2"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "< bot: Pick one" in out and "[Order status] [Talk to a person]" in out
    rc = await asyncio.to_thread(cli.main, ["show", CUSTOMER, "--sim-url", url])
    out = capsys.readouterr().out
    assert rc == 0 and "Ada" in out and "> customer: hello" in out and "< bot: Pick one" in out


async def test_control_api_rejects_bad_input_without_side_effects(sim, bot):
    assert (await sim.post(f"/_sim/customers/{CUSTOMER}/messages", json={"nothing": 1})).status == 400
    assert (await sim.post(f"/_sim/customers/{CUSTOMER}/messages", data="[1]")).status == 400
    assert (await sim.post("/_sim/batch", json={"messages": [{"text": "no wa_id"}]})).status == 400
    assert (await sim.put("/_sim/faults", json={"responses": [{"status": "soon"}]})).status == 400
    for bad in ({"hold": -1}, {"hold": "long"}, {"hold": True}, {"hold": 1, "drop": "yes"}):
        resp = await sim.put("/_sim/faults", json={"responses": [bad]})
        assert resp.status == 400 and '"drop": true' in (await resp.json())["error"]
    assert (await sim.post("/_sim/clock", json={"advance": "a lot"})).status == 400
    assert (await sim.post("/_sim/config", json={"window_errors": "never"})).status == 400
    assert (await sim.get(f"/_sim/conversations/{CUSTOMER}")).status == 404
    assert (await (await sim.get("/_sim/faults")).json())["responses"] == []
    assert bot.posts == []


# --- redelivery (Meta retries a webhook until the bot answers 2xx) -----------------------------


async def test_refused_customer_message_is_redelivered_byte_identical_until_taken(make_sim, bot):
    sim = await make_sim(redeliver_delays=FAST)
    bot.answers.extend([503, 500])
    played = await customer_says(sim, text="where is my order?")
    assert played["webhook_status"] == 503 and played["redelivery"] == "queued"
    await bot.wait_for(lambda: len(bot.posts) == 3)
    assert all(p["valid"] for p in bot.posts)
    assert len({p["raw"] for p in bot.posts}) == 1  # the same bytes, re-signed
    assert [m["id"] for m in bot.messages()] == [played["wamid"]] * 3
    s = await settled(sim)
    (inbound,) = (await conversation(sim))["messages"]
    assert (inbound["webhook_status"], inbound["delivery_attempts"]) == (200, 3)
    assert (s["webhooks_sent"], s["webhook_failures"], s["redeliveries"]) == (3, 2, 2)
    assert (s["webhooks_refused"], s["inbound_messages"]) == ({"500": 1, "503": 1}, 1)
    assert len(bot.posts) == 3  # taken: no further attempt


async def test_redelivery_gives_up_after_the_last_delay(make_sim, bot):
    sim = await make_sim(redeliver_delays=(0.02, 0.02))
    bot.answers.extend([500] * 10)
    resp = await sim.post("/_sim/batch", json={"messages": [{"wa_id": CUSTOMER, "text": "a"}, {"wa_id": OTHER, "text": "b"}]})
    assert (await resp.json())["redelivery"] == "queued"
    s = await settled(sim)
    assert len(bot.posts) == 3 and len({p["raw"] for p in bot.posts}) == 1
    assert (s["redeliveries"], s["webhooks_refused"], s["webhook_failures"]) == (2, {"500": 3}, 3)
    for wa_id in (CUSTOMER, OTHER):
        (inbound,) = (await conversation(sim, wa_id))["messages"]
        assert (inbound["webhook_status"], inbound["delivery_attempts"]) == (500, 3)


async def test_unreachable_or_timed_out_bot_keeps_the_message_and_gets_it_later(make_sim, bot):
    sim = await make_sim(redeliver_delays=FAST, webhook_timeout=0.2, statuses=())
    bot.answers.extend(["stall", "stall"])
    played = await customer_says(sim)
    assert played["webhook_status"] is None and played["redelivery"] == "queued"
    conv = await conversation(sim)
    assert conv["window_open"] and conv["messages"][0]["delivery_attempts"] == 1  # Meta has it: not rolled back
    assert (await send(sim, text("we hear you")))[0] == 200
    s = await settled(sim)
    inbound = (await conversation(sim))["messages"][0]
    assert (inbound["webhook_status"], inbound["delivery_attempts"]) == (200, 3)
    assert [m["id"] for m in bot.messages()] == [played["wamid"]] * 3
    assert (s["webhooks_refused"], s["webhook_failures"], s["redeliveries"]) == ({"unreachable": 2}, 2, 2)
    assert (s["window_violations"], s["inbound_messages"]) == (0, 1)


async def test_dead_bot_with_redelivery_is_recorded_and_reset_drops_the_retries(make_sim):
    dead = await make_sim(bot_webhook_url="http://127.0.0.1:9/webhook")  # Meta's default backoff: 1 s first
    played = await customer_says(dead)
    assert played["webhook_status"] is None and played["redelivery"] == "queued"
    assert (await conversation(dead))["messages"][0]["webhook_status"] is None
    s = await stats(dead)
    assert (s["pending_redeliveries"], s["webhooks_refused"], s["inbound_messages"]) == (1, {"unreachable": 1}, 1)
    assert (await dead.post("/_sim/reset")).status == 200
    assert (await stats(dead))["pending_redeliveries"] == 0  # the retry task is gone: it can post nothing


async def test_reset_waits_for_a_redelivery_on_the_wire_and_counts_nothing_new(make_sim, bot):
    sim = await make_sim(redeliver_delays=(0.01, 0.01), webhook_timeout=2)
    bot.answers.extend([503, "stall"])
    await customer_says(sim)
    await bot.wait_for(lambda: len(bot.posts) == 2)  # the redelivery is being held by the bot
    assert (await sim.post("/_sim/reset")).status == 200
    s = await stats(sim)
    assert (s["pending_redeliveries"], s["redeliveries"], s["webhooks_sent"], s["webhooks_refused"]) == (0, 0, 0, {})
    assert len(bot.posts) == 2


async def test_status_webhooks_are_redelivered_without_holding_up_the_others(make_sim, bot):
    sim = await make_sim(redeliver_delays=(0.3,))
    await customer_says(sim)
    bot.answers.append(503)  # the "sent" status
    status, body = await send(sim, text("Hello!"))
    assert status == 200
    await bot.wait_for(lambda: len(bot.statuses()) == 4)
    assert [s["status"] for s in bot.statuses()] == ["sent", "delivered", "read", "sent"]
    assert bot.posts[1]["raw"] == bot.posts[4]["raw"] and bot.posts[4]["valid"]
    s = await settled(sim)
    assert (s["statuses_sent"], s["redeliveries"], s["webhooks_refused"], s["webhook_failures"]) == (3, 1, {"503": 1}, 1)


async def test_redeliver_delays_are_a_runtime_knob_until_reset(sim, bot):
    assert (await (await sim.get("/_sim/config")).json())["redeliver_delays"] == [1, 2, 4, 8, 15, 30, 60]
    for value, expected in (("0.5,1", [0.5, 1]), ([0.02], [0.02]), ("", []), ([], [])):
        resp = await sim.post("/_sim/config", json={"redeliver_delays": value})
        assert resp.status == 200 and (await resp.json())["redeliver_delays"] == expected
    for bad in ("soon", [-1], ["1"], [True], 5):
        assert (await sim.post("/_sim/config", json={"redeliver_delays": bad})).status == 400
    bot.answers.append(503)
    played = await customer_says(sim)  # redelivery off: refused once, and that is all
    assert played["webhook_status"] == 503 and "redelivery" not in played
    assert (await stats(sim))["pending_redeliveries"] == 0
    await sim.post("/_sim/reset")
    assert (await (await sim.get("/_sim/config")).json())["redeliver_delays"] == [1, 2, 4, 8, 15, 30, 60]


def test_cli_redelivery_and_extra_numbers_flags_and_env(monkeypatch, capsys):
    base = ["serve", "--access-token", "t", "--phone-number-id", "1", "--app-secret", "s"]
    monkeypatch.delenv("SIM_REDELIVER_DELAYS", raising=False)
    monkeypatch.delenv("SIM_EXTRA_PHONE_NUMBER_IDS", raising=False)
    settings = cli.settings_from_args(cli.parse_args(base))
    assert (settings.redeliver_delays, settings.phone_number_ids) == ((1, 2, 4, 8, 15, 30, 60), ())
    settings = cli.settings_from_args(cli.parse_args(base + ["--redeliver-delays", "0.5,1,2", "--extra-phone-number-ids", "2, 3"]))
    assert (settings.redeliver_delays, settings.phone_number_ids) == ((0.5, 1.0, 2.0), ("2", "3"))
    assert cli.settings_from_args(cli.parse_args(base + ["--redeliver-delays", ""])).redeliver_delays == ()
    monkeypatch.setenv("SIM_REDELIVER_DELAYS", "none")
    monkeypatch.setenv("SIM_EXTRA_PHONE_NUMBER_IDS", "7")
    settings = cli.settings_from_args(cli.parse_args(base))
    assert (settings.redeliver_delays, settings.phone_number_ids, settings.business_numbers) == ((), ("7",), ("1", "7"))
    assert cli.main(base + ["--redeliver-delays", "1,soon"]) == 2
    assert "redeliver_delays" in capsys.readouterr().err
    assert cli.main(base + ["--extra-phone-number-ids", "1"]) == 2
    assert "phone_number_ids" in capsys.readouterr().err


# --- several business numbers ----------------------------------------------------------------


async def test_customers_write_to_several_business_numbers(make_sim, bot):
    sim = await make_sim(phone_number_ids=(EXTRA,))
    config = await (await sim.get("/_sim/config")).json()
    assert config["phone_number_ids"] == [EXTRA]
    assert config["display_phone_numbers"] == {PNID: DISPLAY, EXTRA: EXTRA_DISPLAY}
    await customer_says(sim, text="main")
    played = await customer_says(sim, text="extra", phone_number_id=EXTRA, context={"id": "wamid.prev"})
    await customer_says(sim, OTHER, text="another bot's number", phone_number_id="999000111222")  # allowed in webhooks
    metas = [bot.values_in(p["body"])[0]["metadata"] for p in bot.posts]
    assert metas == [
        {"display_phone_number": DISPLAY, "phone_number_id": PNID},
        {"display_phone_number": EXTRA_DISPLAY, "phone_number_id": EXTRA},
        {"display_phone_number": "15550001222", "phone_number_id": "999000111222"},
    ]
    assert bot.messages()[1]["context"] == {"id": "wamid.prev", "from": EXTRA_DISPLAY}
    assert [m["to_phone_number_id"] for m in (await conversation(sim))["messages"]] == [PNID, EXTRA]

    # one batch, two numbers: one change each, with its own metadata
    resp = await sim.post("/_sim/batch", json={"messages": [
        {"wa_id": CUSTOMER, "text": "1"}, {"wa_id": CUSTOMER, "text": "2", "phone_number_id": EXTRA}]})
    assert resp.status == 200
    changes = bot.values_in(bot.posts[-1]["body"])
    assert [(c["metadata"]["phone_number_id"], [m["text"]["body"] for m in c["messages"]]) for c in changes] == [(PNID, ["1"]), (EXTRA, ["2"])]
    assert (await sim.post(f"/_sim/customers/{CUSTOMER}/messages", json={"text": "x", "phone_number_id": 5})).status == 400

    # the Cloud API sends from the main and the extra numbers only; statuses carry the sender's metadata
    assert (await send(sim, text("from extra"), pnid=EXTRA))[0] == 200
    await bot.wait_for(lambda: len(bot.statuses()) == 3)
    assert (await send(sim, text("from main")))[0] == 200
    await bot.wait_for(lambda: len(bot.statuses()) == 6)
    status_metas = [v["metadata"]["phone_number_id"] for p in bot.posts for v in bot.values_in(p["body"]) if "statuses" in v]
    assert status_metas == [EXTRA] * 3 + [PNID] * 3
    assert bot.values_in(bot.posts[-1]["body"])[0]["metadata"]["display_phone_number"] == DISPLAY
    status, body = await send(sim, text("from another bot's number"), pnid="999000111222")
    assert (status, body["error"]["code"]) == (400, 100)
    read = {"messaging_product": "whatsapp", "status": "read", "message_id": played["wamid"]}
    assert await send(sim, read, pnid=EXTRA) == (200, {"success": True})

    messages = (await conversation(sim))["messages"]
    assert [(m["text"], m["from_phone_number_id"]) for m in messages if m["direction"] == "out"] == [("from extra", EXTRA), ("from main", PNID)]
    extra_in = next(m for m in messages if m["wamid"] == played["wamid"])
    assert (extra_in["status"], extra_in["read_by_phone_number_id"]) == ("read", EXTRA)
    assert messages[0]["read_by_phone_number_id"] is None


def test_extra_numbers_must_be_new_and_unique():
    for extras in ((PNID,), (EXTRA, EXTRA), ("",)):
        with pytest.raises(SettingsError, match="phone_number_ids"):
            Settings(access_token=TOKEN, phone_number_id=PNID, app_secret=SECRET, phone_number_ids=extras)
    settings = Settings(access_token=TOKEN, phone_number_id=PNID, app_secret=SECRET, phone_number_ids=("12",))
    assert settings.display_number("12") == "15550000012"


# --- burst -----------------------------------------------------------------------------------


async def test_burst_plays_many_one_message_webhooks_with_bounded_concurrency(make_sim, bot):
    sim = await make_sim(redeliver_delays=FAST, statuses=())
    await customer_says(sim)
    bot.hold = 0.01
    bot.answers.extend([503] * 5)
    resp = await sim.post("/_sim/burst", json={"count": 200, "customers": 20, "concurrency": 50, "text": "hi {n}"})
    assert resp.status == 200
    result = await resp.json()
    wa_ids, wamids = result["wa_ids"], result["wamids"]
    assert len(set(wa_ids)) == 20 and all(w.startswith("4917") and w != CUSTOMER for w in wa_ids)
    assert len(set(wamids)) == 200 and None not in wamids
    assert result["first_answers"] == {"200": 195, "503": 5} and result["seconds"] > 0
    assert 1 < bot.max_in_flight <= 50 + 5  # the burst's own posts, and the 5 redeliveries alongside
    s = await settled(sim)
    assert (s["inbound_messages"], s["redeliveries"], s["webhooks_refused"]) == (201, 5, {"503": 5})
    first_attempts = bot.posts[1:201]
    assert all(len(bot.messages_in(p["body"])) == 1 for p in first_attempts)
    by_wamid = {m["id"]: m for m in bot.messages()}
    for n in (0, 57, 199):
        assert by_wamid[wamids[n]]["text"]["body"] == f"hi {n}" and by_wamid[wamids[n]]["from"] == wa_ids[n % 20]
    conv = await conversation(sim, wa_ids[3])
    assert [m["text"] for m in conv["messages"]] == [f"hi {n}" for n in range(3, 200, 20)]

    again = await (await sim.post("/_sim/burst", json={"count": 3})).json()
    assert len(again["wa_ids"]) == 3 and not set(again["wa_ids"]) & set(wa_ids)  # new customers every time
    assert [m["text"] for m in (await conversation(sim, again["wa_ids"][1]))["messages"]] == ["burst 1"]


async def test_big_burst_and_bad_burst_requests(make_sim, bot):
    sim = await make_sim(statuses=())
    bot.hold = 0.2  # long enough for the burst to fill its bound even on a loaded machine
    resp = await sim.post("/_sim/burst", json={"count": 2000, "customers": 200, "concurrency": 200})
    result = await resp.json()
    assert result["first_answers"] == {"200": 2000} and len(result["wa_ids"]) == 200
    assert 100 < bot.max_in_flight <= 200  # beyond aiohttp's default 100 connections, within the bound
    assert len(bot.posts) == 2000 and (await stats(sim))["inbound_messages"] == 2000
    for bad in ({}, {"count": 0}, {"count": 5, "customers": 6}, {"count": 5, "concurrency": 0}, {"count": "5"},
                {"count": 5, "text": 7}, {"count": 5, "concurrency": 5000}):
        assert (await sim.post("/_sim/burst", json=bad)).status == 400, bad
    assert len(bot.posts) == 2000


async def test_burst_against_a_dead_bot_without_redelivery_records_nothing(make_sim):
    dead = await make_sim(bot_webhook_url="http://127.0.0.1:9/webhook", redeliver_delays=())
    result = await (await dead.post("/_sim/burst", json={"count": 4, "customers": 2})).json()
    assert result["first_answers"] == {"unreachable": 4} and result["wamids"] == [None] * 4
    assert (await (await dead.get("/_sim/conversations")).json())["conversations"] == []


# --- templates: the Business Management API list, template webhooks, pricing ---------------

WABA = "102290129340398"  # Settings' default business_account_id


def graph_get(sim: TestClient, path_or_url: str, token: Optional[str] = TOKEN, **kwargs: Any):
    """GET a Graph path on the simulator, or a full `paging.next` URL as Meta hands it out."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if path_or_url.startswith("http"):
        return sim.session.get(path_or_url, headers=headers, **kwargs)
    return sim.get(path_or_url, headers=headers, **kwargs)


async def list_page(sim: TestClient, path_or_url: str = f"/v23.0/{WABA}/message_templates", **kwargs: Any):
    async with graph_get(sim, path_or_url, **kwargs) as resp:
        return resp.status, await resp.json()


def templates_file(tmp_path, count: int):
    path = tmp_path / "templates.json"
    path.write_text(json.dumps([
        {"name": f"tpl_{n:02d}", "language": "en_US", "category": "UTILITY", "status": "APPROVED",
         "components": [{"type": "BODY", "text": f"Template {n} for order {{{{1}}}}."}]}
        for n in range(count)
    ]))
    return path


def template_changes(bot: Bot) -> List[Dict[str, Any]]:
    """Every business-account change the bot got: `{"entry": ..., "field": ..., "value": ...}`."""
    return [
        {"entry": e, "field": c["field"], "value": c["value"], "post": p}
        for p in bot.posts if isinstance(p["body"], dict)
        for e in p["body"].get("entry", []) for c in e.get("changes", []) if c.get("field") != "messages"
    ]


async def change_template(sim: TestClient, name: str, language: str = "en_US", **change: Any) -> Dict[str, Any]:
    resp = await sim.post(f"/_sim/templates/{name}/{language}", json=change)
    assert resp.status == 200, await resp.text()
    return await resp.json()


async def registry_entry(sim: TestClient, name: str, language: str = "en_US") -> Dict[str, Any]:
    templates = (await (await sim.get("/_sim/templates")).json())["templates"]
    return next(t for t in templates if (t["name"], t["language"]) == (name, language))


async def test_template_list_pages_with_cursors_and_full_next_urls(make_sim, tmp_path):
    sim = await make_sim(templates_path=templates_file(tmp_path, 30))
    pages, url = [], f"/v23.0/{WABA}/message_templates?limit=10"
    while url:
        status, body = await list_page(sim, url)
        assert status == 200, body
        pages.append(body)
        url = body["paging"].get("next")
    assert [len(p["data"]) for p in pages] == [10, 10, 10]
    names = [t["name"] for p in pages for t in p["data"]]
    assert names == [f"tpl_{n:02d}" for n in range(30)]
    ids = [t["id"] for p in pages for t in p["data"]]
    assert all(isinstance(i, str) and i.isdigit() for i in ids) and len(set(ids)) == 30
    first, second, last = pages
    assert first["paging"]["next"].startswith(f"http://127.0.0.1:{sim.port}/v23.0/{WABA}/message_templates?")
    assert "limit=10" in first["paging"]["next"] and "previous" not in first["paging"]
    assert "next" not in last["paging"] and "previous" in last["paging"]
    assert set(second["paging"]["cursors"]) == {"before", "after"}
    # the `before` cursor of page 2 gives page 1 back; ids are stable from one read to the next
    status, back = await list_page(sim, second["paging"]["previous"])
    assert [t["id"] for t in back["data"]] == [t["id"] for t in first["data"]]
    # default limit 25, a larger one is capped at 100, bad ones are Graph error 100
    status, body = await list_page(sim)
    assert (len(body["data"]), "next" in body["paging"]) == (25, True)
    status, body = await list_page(sim, f"/v23.0/{WABA}/message_templates?limit=500")
    assert (len(body["data"]), "next" in body["paging"]) == (30, False)
    for query in ("limit=0", "limit=ten", "after=bm90LWEtY3Vyc29y"):
        status, body = await list_page(sim, f"/v23.0/{WABA}/message_templates?{query}")
        assert (status, body["error"]["code"]) == (400, 100), query
    assert (await stats(sim))["template_list_reads"] == 6


async def test_template_list_fields_filters_and_meta_shapes(sim):
    status, body = await list_page(sim)
    assert status == 200
    by_key = {(t["name"], t["language"]): t for t in body["data"]}
    assert len(by_key) == 6 and "next" not in body["paging"]
    assert all(set(t) == {"name", "language", "status", "category", "id", "components"} for t in body["data"])
    assert by_key[("paused_promo", "en_US")]["status"] == "PAUSED"
    assert by_key[("opt_in_reminder", "en_US")]["category"] == "MARKETING"
    assert by_key[("opt_in_reminder", "en_US")]["components"][-1] == {
        "type": "BUTTONS", "buttons": [{"type": "QUICK_REPLY", "text": "Unsubscribe"}]}
    assert by_key[("hello_world", "en_US")]["components"][0] == {"type": "HEADER", "format": "TEXT", "text": "Hello World"}
    # `fields`: just those, plus the id Graph always adds
    status, body = await list_page(sim, f"/v23.0/{WABA}/message_templates?fields=name,status")
    assert all(set(t) == {"name", "status", "id"} for t in body["data"])
    status, body = await list_page(sim, f"/v23.0/{WABA}/message_templates?fields=quality_score&limit=1")
    assert body["data"][0]["quality_score"] == {"score": "UNKNOWN"}
    status, body = await list_page(sim, f"/v23.0/{WABA}/message_templates?fields=name,bogus")
    assert (status, body["error"]["code"]) == (400, 100) and "bogus" in body["error"]["message"]
    # Meta's filters
    status, body = await list_page(sim, f"/v23.0/{WABA}/message_templates?status=PAUSED")
    assert [t["name"] for t in body["data"]] == ["paused_promo"]
    status, body = await list_page(sim, f"/v23.0/{WABA}/message_templates?language=es&name=order")
    assert [(t["name"], t["language"]) for t in body["data"]] == [("order_update", "es")]
    status, body = await list_page(sim, f"/v23.0/{WABA}/message_templates?category=AUTHENTICATION")
    assert body == {"data": []}


async def test_template_list_needs_the_token_and_the_right_business_account(sim):
    for token in ("wrong-token", None):
        status, body = await list_page(sim, token=token)
        assert (status, body["error"]["code"], body["error"]["type"]) == (401, 190, "OAuthException")
    status, body = await list_page(sim, f"/v23.0/{WABA}/message_templates?access_token={TOKEN}", token=None)
    assert status == 200 and body["data"]
    for waba in ("999999999", PNID):
        status, body = await list_page(sim, f"/v23.0/{waba}/message_templates")
        assert (status, body["error"]["code"], body["error"]["type"]) == (400, 100, "GraphMethodException")
        assert f"Object with ID '{waba}' does not exist" in body["error"]["message"]
    assert (await stats(sim))["rejected"] == {}  # template reads are not sends


async def test_template_list_faults_simulate_a_graph_outage(sim):
    resp = await sim.put("/_sim/faults/templates", json={"responses": [
        {"status": 500}, {"status": 400, "code": 4}, {"delay": 0.5}, {"drop": True}]})
    assert resp.status == 200
    await sim.put("/_sim/faults", json={"responses": [{"status": 429}]})  # the send queue is another one
    status, body = await list_page(sim)
    assert (status, body["error"]["code"]) == (500, 2)
    status, body = await list_page(sim)
    assert (status, body["error"]["code"]) == (400, 4)
    with pytest.raises(asyncio.TimeoutError):
        await list_page(sim, timeout=aiohttp.ClientTimeout(total=0.2))
    with pytest.raises(aiohttp.ClientError):  # the answer never comes: the connection is closed
        await list_page(sim)
    status, body = await list_page(sim)
    assert status == 200 and body["data"]
    assert (await (await sim.get("/_sim/faults/templates")).json()) == {"responses": []}
    assert (await (await sim.get("/_sim/faults")).json()) == {"responses": [{"status": 429}]}
    s = await stats(sim)
    assert (s["template_list_faults"], s["faults_served"]) == (4, 0)
    bad = await sim.put("/_sim/faults/templates", json={"responses": [{"async_code": 131026}]})
    assert bad.status == 400
    await sim.put("/_sim/faults/templates", json={"responses": [{"status": 503}]})
    await sim.post("/_sim/reset")
    assert (await list_page(sim))[0] == 200


async def test_pausing_and_disabling_a_template_fails_sends_and_tells_the_bot(sim, bot):
    await customer_says(sim)
    order = template("order_update", components=body_params("10042"))
    assert (await send(sim, order))[0] == 200
    tid = (await registry_entry(sim, "order_update"))["id"]
    clock = (await (await sim.get("/_sim/clock")).json())["now"]

    result = await change_template(sim, "order_update", status="PAUSED")
    assert [(w["field"], w["webhook_status"]) for w in result["webhooks"]] == [("message_template_status_update", 200)]
    assert result["template"]["status"] == "PAUSED"
    (paused,) = template_changes(bot)
    assert paused["post"]["valid"]  # signed with the app secret, like every webhook
    body = paused["post"]["body"]
    assert body["object"] == "whatsapp_business_account"
    assert paused["entry"]["id"] == WABA and abs(paused["entry"]["time"] - clock) <= 2
    assert paused["value"] == {
        "event": "PAUSED", "message_template_id": int(tid), "message_template_name": "order_update",
        "message_template_language": "en_US", "reason": "NONE", "message_template_category": "UTILITY",
        "other_info": {"title": "FIRST_PAUSE", "description": "Your WhatsApp message template has been paused because of low quality."},
    }
    status, answer = await send(sim, order)
    assert (status, answer["error"]["code"]) == (400, 132015)
    status, listed = await list_page(sim, f"/v23.0/{WABA}/message_templates?name=order_update&language=en_US")
    assert [t["status"] for t in listed["data"]] == ["PAUSED"]

    await change_template(sim, "order_update", status="DISABLED", reason="Too many blocks")
    disabled = template_changes(bot)[-1]["value"]
    assert (disabled["event"], disabled["reason"]) == ("DISABLED", "Too many blocks")
    assert abs(disabled["disable_info"]["disable_date"] - clock) <= 2
    status, answer = await send(sim, order)
    assert (status, answer["error"]["code"]) == (400, 132016)

    await change_template(sim, "order_update", status="APPROVED")
    assert (await send(sim, order))[0] == 200
    await change_template(sim, "order_update", status="PAUSED")
    assert template_changes(bot)[-1]["value"]["other_info"]["title"] == "SECOND_PAUSE"
    await change_template(sim, "order_update", status="APPROVED")
    assert template_changes(bot)[-1]["value"]["other_info"]["title"] == "UNPAUSE"

    await change_template(sim, "order_update", "es", status="REJECTED", reason="INVALID_FORMAT")
    rejected = template_changes(bot)[-1]["value"]
    assert (rejected["event"], rejected["reason"], rejected["message_template_language"]) == ("REJECTED", "INVALID_FORMAT", "es")
    status, answer = await send(sim, template("order_update", "es", components=body_params("1")))
    assert (status, answer["error"]["code"]) == (400, 132001)
    assert (await registry_entry(sim, "order_update", "es"))["rejected_reason"] == "INVALID_FORMAT"
    assert (await stats(sim))["template_webhooks"] == 6

    # reset: the registry is as loaded again
    await sim.post("/_sim/reset")
    assert (await registry_entry(sim, "order_update"))["status"] == "APPROVED"
    assert (await registry_entry(sim, "order_update", "es"))["status"] == "APPROVED"


async def test_category_and_quality_changes_send_their_webhooks(make_sim, bot):
    sim = await make_sim(redeliver_delays=FAST)
    tid = (await registry_entry(sim, "order_update"))["id"]
    result = await change_template(sim, "order_update", category="marketing")
    assert [w["field"] for w in result["webhooks"]] == ["template_category_update"]
    (moved,) = template_changes(bot)
    assert moved["entry"]["id"] == WABA and moved["post"]["valid"]
    assert moved["value"] == {
        "message_template_id": int(tid), "message_template_name": "order_update", "message_template_language": "en_US",
        "previous_category": "UTILITY", "new_category": "MARKETING",
    }
    status, listed = await list_page(sim, f"/v23.0/{WABA}/message_templates?name=order_update&language=en_US"
                                          "&fields=category,previous_category")
    assert listed["data"] == [{"category": "MARKETING", "previous_category": "UTILITY", "id": tid}]
    # now billed as marketing, even inside the window
    await customer_says(sim)
    assert (await send(sim, template("order_update", components=body_params("1"))))[0] == 200
    await bot.wait_for(lambda: len(bot.statuses()) == 3)
    assert bot.statuses()[0]["pricing"] == {"billable": True, "pricing_model": "PMP", "category": "marketing", "type": "regular"}

    bot.answers.append(503)  # refused: redelivered like any webhook
    result = await change_template(sim, "order_update", quality="RED")
    assert (result["webhooks"][0]["webhook_status"], result["webhooks"][0]["redelivery"]) == (503, "queued")
    await settled(sim)
    quality = [c for c in template_changes(bot) if c["field"] == "message_template_quality_update"]
    assert len(quality) == 2 and quality[0]["post"]["raw"] == quality[1]["post"]["raw"]
    assert quality[0]["value"] == {
        "previous_quality_score": "UNKNOWN", "new_quality_score": "RED", "message_template_id": int(tid),
        "message_template_name": "order_update", "message_template_language": "en_US",
    }
    assert (await registry_entry(sim, "order_update"))["quality"] == "RED"
    # a change to what it already is sends nothing; bad requests change nothing
    assert (await change_template(sim, "order_update", quality="RED", category="MARKETING"))["webhooks"] == []
    assert (await sim.post("/_sim/templates/nope/en_US", json={"status": "PAUSED"})).status == 404
    for bad in ({}, {"status": "SLEEPING"}, {"category": 7}, {"quality": "PURPLE"}, {"status": "PAUSED", "reason": 1}):
        assert (await sim.post("/_sim/templates/order_update/en_US", json=bad)).status == 400, bad
    assert (await registry_entry(sim, "order_update"))["status"] == "APPROVED"


async def test_status_pricing_per_message_like_meta(sim, bot):
    def pricing(n: int) -> List[Dict[str, Any]]:
        return [s["pricing"] for s in bot.statuses()[n:]]

    # outside the window a utility template is billed; so is marketing always
    assert (await send(sim, template("order_update", components=body_params("1"))))[0] == 200
    await bot.wait_for(lambda: len(bot.statuses()) == 3)
    billed_utility = {"billable": True, "pricing_model": "PMP", "category": "utility", "type": "regular"}
    assert [s["status"] for s in bot.statuses()] == ["sent", "delivered", "read"]
    assert pricing(0) == [billed_utility] * 3
    # inside the window (since July 2025): utility templates and free-form replies are free
    await customer_says(sim)
    assert (await send(sim, template("order_update", components=body_params("1"))))[0] == 200
    await bot.wait_for(lambda: len(bot.statuses()) == 6)
    assert pricing(3) == [{"billable": False, "pricing_model": "PMP", "category": "utility", "type": "free_customer_service"}] * 3
    assert (await send(sim, template("opt_in_reminder")))[0] == 200
    await bot.wait_for(lambda: len(bot.statuses()) == 9)
    assert pricing(6) == [{"billable": True, "pricing_model": "PMP", "category": "marketing", "type": "regular"}] * 3
    assert (await send(sim, text("Your order shipped."), version="v24.0"))[0] == 200
    await bot.wait_for(lambda: len(bot.statuses()) == 12)
    assert pricing(9) == [{"billable": False, "pricing_model": "PMP", "category": "service", "type": "free_customer_service"}] * 3
    assert "conversation" in bot.statuses()[0] and all("conversation" not in s for s in bot.statuses()[9:])
