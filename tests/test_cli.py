"""`python -m connector.simulator say | show` (and the agent's "not up" answers) against the real
simulator app on a loopback port and a small fake bot: its webhook and its conversation view
(`GET /webhooks/whatsapp/conversations/{id}`). The CLI runs `main([...])` in a thread, with its own
event loop, as from a terminal. One end-to-end check drives the real stack (marker e2e)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import socket
import time
from typing import Any, Callable, Dict, List, Optional

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from connector.signature import is_valid
from connector.simulator import Settings, cli, create_app

ACCESS_TOKEN = "cli-access-token"
APP_SECRET = "cli-app-secret"
PNID = "106540352242922"
VIEW_TOKEN = "view-token"
CUSTOMER = "4915112345678"
HOUR = 3600


def closed_port() -> int:
    with socket.socket() as probe:  # nobody listens on it once closed
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class FakeBot:
    """The bot's webhook (records what the simulator delivers, runs `on_message`) and its
    conversation view (answers `view`, a dict the test fills; Bearer VIEW_TOKEN)."""

    def __init__(self) -> None:
        self.messages: List[Dict[str, Any]] = []
        self.on_message: Optional[Callable[[Dict[str, Any]], Any]] = None
        self.view: Dict[str, Any] = {}
        self.view_status = 200
        self.url = ""

    async def webhook(self, request: web.Request) -> web.Response:
        raw = await request.read()
        assert is_valid(raw, request.headers["X-Hub-Signature-256"], APP_SECRET)
        for entry in json.loads(raw)["entry"]:
            for change in entry["changes"]:
                for message in change["value"].get("messages", []):
                    self.messages.append(message)
                    if self.on_message:
                        await self.on_message(message)
        return web.Response(text="EVENT_RECEIVED")

    async def conversation(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {VIEW_TOKEN}":
            return web.json_response({"error": "unauthorized"}, status=401)
        view = {"sender_id": request.match_info["sender_id"], "now": time.time(), "window_open": True,
                "last_inbound_at": None, "expires_at": None, "margin_seconds": 60.0, "closed_by_meta_for": None,
                "opt_in": None, "marketing_stopped": False, "templates_sent": 0, "templates_left": 1,
                "unknown": None, "records": [], "inbox": [], **self.view}
        return web.json_response(view, status=self.view_status)


@pytest.fixture
async def bot():
    fake = FakeBot()
    app = web.Application()
    app.router.add_post("/webhooks/whatsapp/webhook", fake.webhook)
    app.router.add_get("/webhooks/whatsapp/conversations/{sender_id}", fake.conversation)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    fake.url = str(server.make_url("")).rstrip("/")
    yield fake
    await server.close()


@pytest.fixture
async def make_sim(bot):
    servers: List[TestServer] = []

    async def make(**overrides: Any) -> str:
        settings = Settings(access_token=ACCESS_TOKEN, phone_number_id=PNID, app_secret=APP_SECRET,
                            bot_webhook_url=overrides.pop("bot_webhook_url", f"{bot.url}/webhooks/whatsapp/webhook"),
                            **overrides)
        server = TestServer(create_app(settings), host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return str(server.make_url("")).rstrip("/")

    yield make
    for server in servers:
        await server.close()


@pytest.fixture
async def sim(make_sim):
    return await make_sim()


@pytest.fixture(autouse=True)
def no_tokens_from_the_shell(monkeypatch):
    for name in ("RASA_AUTH_TOKEN", "RASA_URL", "SIM_URL", "WHATSAPP_ACCESS_TOKEN"):
        monkeypatch.delenv(name, raising=False)


async def run(*argv: str) -> int:
    return await asyncio.to_thread(cli.main, list(argv))


def with_bot(bot: FakeBot, sim: str) -> List[str]:
    return ["--sim-url", sim, "--rasa-url", bot.url, "--token", VIEW_TOKEN]


async def call(method: str, url: str, **kwargs: Any) -> Any:
    async with aiohttp.ClientSession() as session:
        async with session.request(method, url, **kwargs) as resp:
            assert resp.status < 300, await resp.text()
            return await resp.json() if resp.content_type == "application/json" else await resp.read()


async def bot_sends(sim: str, message: Dict[str, Any]) -> str:
    """The bot's send through the simulator's Cloud API; the wamid."""
    body = {"messaging_product": "whatsapp", "to": CUSTOMER, **message}
    answer = await call("POST", f"{sim}/v23.0/{PNID}/messages", json=body,
                        headers={"Authorization": f"Bearer {ACCESS_TOKEN}"})
    return answer["messages"][0]["id"]


def buttons(*pairs: tuple) -> Dict[str, Any]:
    return {"type": "interactive", "interactive": {
        "type": "button", "body": {"text": "How can I help?"},
        "action": {"buttons": [{"type": "reply", "reply": {"id": i, "title": t}} for i, t in pairs]}}}


def template(order: str, status: str) -> Dict[str, Any]:
    return {"type": "template", "template": {
        "name": "order_status_update", "language": {"code": "en_US"},
        "components": [{"type": "body", "parameters": [{"type": "text", "text": order}, {"type": "text", "text": status}]}]}}


def stamp(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts))


# --- the simulator or the bot is not up ----------------------------------------------------------


async def test_say_and_show_when_the_simulator_is_not_running(capsys):
    url = f"http://127.0.0.1:{closed_port()}"
    assert await run("say", CUSTOMER, "hi", "--sim-url", url) == 1
    err = capsys.readouterr().err
    assert f"the simulator is not running at {url} (start it with bash scripts/run.sh)" in err
    assert "Traceback" not in err and "ClientConnectorError" not in err
    assert await run("show", CUSTOMER, "--sim-url", url) == 1
    assert f"the simulator is not running at {url}" in capsys.readouterr().err


async def test_say_when_the_bot_is_not_up_and_the_simulator_does_not_keep_the_message(make_sim, capsys):
    webhook = f"http://127.0.0.1:{closed_port()}/webhooks/whatsapp/webhook"
    sim = await make_sim(bot_webhook_url=webhook, redeliver_delays=())  # 502: message not delivered
    assert await run("say", CUSTOMER, "hi", "--sim-url", sim) == 1
    err = capsys.readouterr().err
    assert f'the bot is not up yet ({webhook} did not answer); run.sh prints "ready" when it is' in err
    assert "the message was not delivered" in err and "502" not in err and "Traceback" not in err


async def test_say_when_the_bot_is_not_up_and_the_simulator_delivers_it_again(make_sim, capsys):
    webhook = f"http://127.0.0.1:{closed_port()}/webhooks/whatsapp/webhook"
    sim = await make_sim(bot_webhook_url=webhook, redeliver_delays=(20.0, 40.0))  # run.sh's kind: queued
    assert await run("say", CUSTOMER, "hi", "--sim-url", sim, "--timeout", "0.2") == 1
    err = capsys.readouterr().err
    assert f"the bot is not up yet ({webhook} did not answer)" in err
    assert "the simulator delivers the message again for 1 min" in err


async def test_agent_says_how_to_start_the_bot_and_when_it_is_still_starting(capsys, monkeypatch):
    url = f"http://127.0.0.1:{closed_port()}"
    assert await run("agent", "list", "--rasa-url", url, "--token", "t") == 1
    assert f'the bot is not up at {url} (start it with bash scripts/run.sh, which prints "ready"' in capsys.readouterr().err

    app = web.Application()
    app.router.add_get("/webhooks/whatsapp/agent/conversations",
                       lambda _: web.json_response({"error": "the channel is starting"}, status=503))
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        assert await run("agent", "list", "--rasa-url", str(server.make_url("")), "--token", "t") == 1
    finally:
        await server.close()
    assert "the bot is starting (503): try again in a few seconds" in capsys.readouterr().err


# --- show: what the phone has, and what the bot held back ----------------------------------------


async def test_show_marks_templates_buttons_and_the_replies_the_bot_held_back(sim, bot, capsys):
    await call("POST", f"{sim}/_sim/customers/{CUSTOMER}/messages", json={"text": "hi", "name": "Ada"})
    start = (await call("GET", f"{sim}/_sim/clock"))["now_float"]
    menu = await bot_sends(sim, buttons(("/order_status", "Order status"), ("/opt_in", "Order updates")))
    await call("POST", f"{sim}/_sim/customers/{CUSTOMER}/messages",
               json={"button_reply": {"id": "/opt_in", "title": "Order updates"}})
    await call("POST", f"{sim}/_sim/clock", json={"advance": 30 * HOUR})
    update = await bot_sends(sim, template("10042", "shipped"))
    now = start + 30 * HOUR
    bot.view = {
        "now": now, "window_open": False, "last_inbound_at": start, "margin_seconds": 0.0,
        "opt_in": True, "templates_sent": 1, "templates_left": 0,
        "records": [
            {"kind": "free_form", "at": start + 0.1, "wamid": menu, "response": "utter_greet", "reason": None},
            {"kind": "suppressed", "at": start + 29 * HOUR, "wamid": None, "response": "utter_chatty_update",
             "text": "A quick update: your order has shipped", "template": None,
             "reason": "outside the care window and no template is mapped for utter_chatty_update"},
            {"kind": "template", "at": now - 1, "wamid": update, "template": "order_status_update", "reason": None},
            {"kind": "failed", "at": now, "wamid": None, "code": 131026, "response": "utter_order_update",
             "template": "order_status_update",
             "reason": "undeliverable: no WhatsApp account, an old app, or terms not accepted"},
        ],
    }
    assert await run("show", CUSTOMER, *with_bot(bot, sim)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"Ada ({CUSTOMER}), times UTC"
    closed = time.strftime("%Y-%m-%d %H:%M", time.gmtime(start + 24 * HOUR))
    assert lines[1] == f"window: closed since {closed} UTC (6 h ago); opt-in: yes; templates left: 0"
    body = [line.strip() for line in lines[2:]]
    assert body[0] == f"[{stamp(start)}] > customer: hi"
    assert body[1] == f"[{stamp(start)}] < bot: How can I help?"
    assert body[3:5] == ["[button /order_status] Order status", "[button /opt_in] Order updates"]
    assert body[5] == f"[{stamp(start)}] > customer: [button /opt_in] Order updates"
    assert body[6] == (f"[{stamp(start + 29 * HOUR)}] x bot: [suppressed: outside the care window and no template "
                       'is mapped for utter_chatty_update] utter_chatty_update "A quick update: your order has shipped"')
    assert body[7].startswith(f"[{stamp(now)}] < bot: [template order_status_update] "
                              "Update on your order 10042: it is now shipped.")
    failed = [line for line in body if "[failed 131026:" in line]
    assert failed == [f"[{stamp(now)}] x bot: [failed 131026: undeliverable: no WhatsApp account, an old app, or "
                      "terms not accepted] template order_status_update"]


async def test_show_open_and_never_opened_windows(sim, bot, capsys):
    await call("POST", f"{sim}/_sim/customers/{CUSTOMER}/messages", json={"text": "hi"})
    now = time.time()
    bot.view = {"now": now, "window_open": True, "last_inbound_at": now - 19 * 60,
                "expires_at": now + 23 * HOUR + 41 * 60 + 30, "opt_in": False, "templates_left": 1}
    assert await run("show", CUSTOMER, *with_bot(bot, sim)) == 0
    assert "window: open, closes in 23 h 41 min; opt-in: no; templates left: 1 (once it lapses)" in capsys.readouterr().out
    bot.view = {"last_inbound_at": None, "window_open": False}
    assert await run("show", CUSTOMER, *with_bot(bot, sim)) == 0
    assert "window: never opened; opt-in: not given" in capsys.readouterr().out


async def test_show_without_the_bots_view_says_why_and_prints_the_phone(sim, bot, capsys):
    await call("POST", f"{sim}/_sim/customers/{CUSTOMER}/messages", json={"text": "hi"})
    assert await run("show", CUSTOMER, "--sim-url", sim, "--rasa-url", bot.url) == 0
    out = capsys.readouterr().out
    assert "(set RASA_AUTH_TOKEN, or pass --token, to see suppressed replies" in out and "> customer: hi" in out
    assert "window: open, closes in 23 h 59 min (as WhatsApp has it)" in out

    down = f"http://127.0.0.1:{closed_port()}"
    assert await run("show", CUSTOMER, "--sim-url", sim, "--rasa-url", down, "--token", VIEW_TOKEN) == 0
    out = capsys.readouterr().out
    assert f"(the bot is not up at {down}, so its suppressed replies are not shown" in out and "> customer: hi" in out

    assert await run("show", CUSTOMER, "--sim-url", sim, "--rasa-url", bot.url, "--token", "wrong") == 0
    assert "(the bot refused the token (401)" in capsys.readouterr().out


async def test_show_json_carries_the_bots_view(sim, bot, capsys):
    await call("POST", f"{sim}/_sim/customers/{CUSTOMER}/messages", json={"text": "hi"})
    bot.view = {"templates_left": 1}
    assert await run("show", CUSTOMER, "--json", *with_bot(bot, sim)) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["messages"][0]["text"] == "hi" and shown["bot"]["templates_left"] == 1


# --- say: replies, and the ones the bot held back ------------------------------------------------


async def test_say_prints_the_replies_with_button_ids(sim, bot, capsys):
    async def reply(_):
        await bot_sends(sim, buttons(("/opt_in", "Order updates")))

    bot.on_message = reply
    assert await run("say", CUSTOMER, "hi", "--quiet-after", "0.2", *with_bot(bot, sim)) == 0
    out = capsys.readouterr().out
    assert "< bot: How can I help?" in out and "    [button /opt_in] Order updates" in out


async def test_say_without_a_reply_prints_what_the_bot_suppressed_for_it(sim, bot, capsys):
    old = {"kind": "suppressed", "at": time.time() - 60, "callback_id": "old", "response": "utter_old",
           "reason": "an older suppression"}
    bot.view = {"records": [old]}

    async def suppress(message):
        bot.view = {"records": [old, {
            "kind": "suppressed", "at": time.time(), "callback_id": "new", "response": "utter_greet", "text": "Hi!",
            "reason": "outside the care window and no template is mapped for utter_greet"}]}

    bot.on_message = suppress
    assert await run("say", CUSTOMER, "hi", "--timeout", "0.3", *with_bot(bot, sim)) == 0
    captured = capsys.readouterr()
    assert ("x bot: [suppressed: outside the care window and no template is mapped for utter_greet] "
            'utter_greet "Hi!"') in captured.out
    assert "an older suppression" not in captured.out and "no reply within" not in captured.err


async def test_say_without_a_reply_says_what_became_of_the_turn_or_how_to_see_more(sim, bot, capsys):
    assert await run("say", CUSTOMER, "hi", "--timeout", "0.3", "--sim-url", sim) == 0
    err = capsys.readouterr().err
    assert "(no reply within 0.3 s)" in err and "set RASA_AUTH_TOKEN" in err

    async def stuck(message):
        bot.view = {"inbox": [{"message_id": message["id"], "state": "pending", "attempts": 2,
                               "error": "the action server could not be reached"}]}

    bot.on_message = stuck
    assert await run("say", CUSTOMER, "hi", "--timeout", "0.3", *with_bot(bot, sim)) == 0
    err = capsys.readouterr().err
    assert ("(no reply within 0.3 s; the bot's turn for it is pending, 2 attempt(s): "
            "the action server could not be reached)") in err


# --- say: other message types --------------------------------------------------------------------


async def test_a_tapped_title_may_follow_the_option(sim, bot):
    assert await run("say", CUSTOMER, "--button-reply", "/opt_in", "Order updates", "--timeout", "0.1",
                     "--sim-url", sim) == 0
    assert await run("say", CUSTOMER, "--list-reply", "row-2", "Tomorrow", "--timeout", "0.1", "--sim-url", sim) == 0
    tap, row = bot.messages
    assert tap["interactive"] == {"type": "button_reply", "button_reply": {"id": "/opt_in", "title": "Order updates"}}
    assert row["interactive"]["list_reply"] == {"id": "row-2", "title": "Tomorrow"}


async def test_say_image_uploads_the_file_and_the_bot_can_fetch_it(sim, bot, tmp_path):
    photo = tmp_path / "parcel.jpg"
    photo.write_bytes(b"\xff\xd8\xff\xe0 a damaged box")
    argv = ("--timeout", "0.1", "--access-token", ACCESS_TOKEN, "--sim-url", sim)
    assert await run("say", CUSTOMER, "--image", str(photo), "the box arrived like this", *argv) == 0
    (message,) = bot.messages
    assert message["type"] == "image"
    image = message["image"]
    assert image["caption"] == "the box arrived like this" and image["mime_type"] == "image/jpeg"
    assert image["sha256"] == base64.b64encode(hashlib.sha256(photo.read_bytes()).digest()).decode()
    auth = {"Authorization": f"Bearer {ACCESS_TOKEN}"}
    media = await call("GET", f"{sim}/v23.0/{image['id']}", headers=auth)
    assert await call("GET", media["url"], headers=auth) == photo.read_bytes()
    conversation = await call("GET", f"{sim}/_sim/conversations/{CUSTOMER}")
    assert conversation["messages"][0]["type"] == "image"


async def test_say_image_from_a_url_and_a_document_with_its_file_name(sim, bot, tmp_path):
    files = web.Application()
    files.router.add_get("/shot.png", lambda _: web.Response(body=b"\x89PNG fake", content_type="image/png"))
    server = TestServer(files, host="127.0.0.1")
    await server.start_server()
    argv = ("--timeout", "0.1", "--access-token", ACCESS_TOKEN, "--sim-url", sim)
    try:
        assert await run("say", CUSTOMER, "--image", str(server.make_url("/shot.png")), *argv) == 0
    finally:
        await server.close()
    invoice = tmp_path / "invoice-4711.pdf"
    invoice.write_bytes(b"%PDF-1.4 invoice")
    assert await run("say", CUSTOMER, "--document", str(invoice), "my invoice", *argv) == 0
    image, document = bot.messages
    assert image["type"] == "image" and image["image"]["mime_type"] == "image/png" and "caption" not in image["image"]
    assert document["type"] == "document"
    assert document["document"]["filename"] == "invoice-4711.pdf" and document["document"]["caption"] == "my invoice"
    assert document["document"]["mime_type"] == "application/pdf"


async def test_say_location_and_contacts(sim, bot):
    argv = ("--timeout", "0.1", "--sim-url", sim)
    assert await run("say", CUSTOMER, "--location", "52.5219,13.4132", "Alexanderplatz", *argv) == 0
    assert await run("say", CUSTOMER, "--location", "-33.86,151.21", *argv) == 0
    assert await run("say", CUSTOMER, "--contacts", "Ada Lovelace:+49 151 1234567", "--contacts", "Bob:+15550100",
                     *argv) == 0
    named, bare, cards = bot.messages
    assert named["type"] == "location"
    assert named["location"] == {"latitude": 52.5219, "longitude": 13.4132, "name": "Alexanderplatz"}
    assert bare["location"] == {"latitude": -33.86, "longitude": 151.21}
    assert cards["type"] == "contacts"
    ada, bob = cards["contacts"]
    assert ada["name"] == {"formatted_name": "Ada Lovelace", "first_name": "Ada", "last_name": "Lovelace"}
    assert ada["phones"] == [{"phone": "+49 151 1234567", "wa_id": "491511234567", "type": "MOBILE"}]
    assert bob["name"] == {"formatted_name": "Bob", "first_name": "Bob"}
    kinds = [m["type"] for m in (await call("GET", f"{sim}/_sim/conversations/{CUSTOMER}"))["messages"]]
    assert kinds == ["location", "location", "contacts"]


@pytest.mark.parametrize("argv, expected", [
    ((), "nothing to say: give TEXT, or one of --image, --document, --location, --contacts"),
    (("--button-reply", "/opt_in"), "TEXT is the tapped title"),
    (("--contacts", "Ada:+4915112345678", "hello"), "a contact card has no text"),
    (("--contacts", "no phone here"), "--contacts wants NAME:PHONE"),
    (("--location", "north"), "--location wants LAT,LON"),
    (("--location", "91,0"), "latitude is -90..90"),
    (("--image", "/nonexistent/photo.jpg"), "no such file: /nonexistent/photo.jpg"),
])
async def test_say_explains_what_it_cannot_send_and_sends_nothing(sim, bot, capsys, argv, expected):
    assert await run("say", CUSTOMER, *argv, "--sim-url", sim) == 2
    assert expected in capsys.readouterr().err
    assert bot.messages == []


async def test_say_refuses_a_photo_that_is_not_jpeg_or_png(sim, bot, tmp_path, capsys):
    gif = tmp_path / "funny.gif"
    gif.write_bytes(b"GIF89a")
    assert await run("say", CUSTOMER, "--image", str(gif), "--sim-url", sim) == 2
    assert "a WhatsApp photo is JPEG or PNG" in capsys.readouterr().err and bot.messages == []


async def test_say_image_with_the_wrong_access_token_says_which_one_to_pass(sim, bot, tmp_path, capsys):
    photo = tmp_path / "p.jpg"
    photo.write_bytes(b"\xff\xd8")
    assert await run("say", CUSTOMER, "--image", str(photo), "--access-token", "wrong", "--sim-url", sim) == 1
    err = capsys.readouterr().err
    assert "the simulator refused the upload of p.jpg (HTTP 401" in err and "--access-token" in err
    assert bot.messages == []


# --- end to end ----------------------------------------------------------------------------------


@pytest.mark.e2e
def test_say_and_show_mark_a_reply_suppressed_by_the_real_bot(stack, wa_id, capsys):
    """A message stamped 25 h ago opens no window: the bot's greeting is suppressed, `say` shows it
    from the bot's view, and `show` marks it between the phone's messages."""
    options = ["--sim-url", stack.sim_url, "--rasa-url", stack.rasa_url, "--token", stack.auth_token]
    old = int(stack.sim_now()) - 25 * HOUR
    assert cli.main(["say", wa_id, "hi", "--at", str(old), "--timeout", "5", *options]) == 0
    out = capsys.readouterr().out
    assert "x bot: [suppressed: outside the care window and no template is mapped for utter_greet] utter_greet" in out
    assert cli.main(["say", wa_id, "where is order 10042", "--timeout", "15", *options]) == 0
    assert "< bot: Order 10042" in capsys.readouterr().out
    assert cli.main(["show", wa_id, *options]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("window: open, closes in 23 h 5") and "templates left: 1 (once it lapses)" in lines[1]
    suppressed = next(i for i, line in enumerate(lines) if "[suppressed:" in line)
    assert "> customer: hi" in lines[suppressed - 1]
    assert any("> customer: where is order 10042" in line for line in lines[suppressed + 1:])
