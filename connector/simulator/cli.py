"""Command line: `serve` runs the simulator; `say` and `show` play a customer against a running one;
`agent` plays the human agent against the bot's agent API (handed-off conversations, `rasa run`).

Every serve flag defaults from the same env vars the connector reads, so one `.env` drives both.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import logging
import math
import mimetypes
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Set, Tuple
from urllib.parse import quote

import aiohttp

from .settings import (
    DEFAULT_BOT_WEBHOOK, DEFAULT_PORT, DEFAULT_TEMPLATES, Settings, SettingsError, comma_list, env_default,
    parse_delays, parse_statuses,
)

COMMANDS = ("serve", "say", "show", "agent")
LAT_LON = re.compile(r"\s*-?\d+(\.\d+)?\s*,\s*-?\d+(\.\d+)?\s*")
ENV_HINTS = {
    "access_token": "--access-token or WHATSAPP_ACCESS_TOKEN",
    "phone_number_id": "--phone-number-id or WHATSAPP_PHONE_NUMBER_ID",
    "app_secret": "--app-secret or WHATSAPP_APP_SECRET",
}


def default_sim_url() -> str:
    return env_default("SIM_URL") or f"http://127.0.0.1:{env_default('SIM_PORT', str(DEFAULT_PORT))}"


def default_rasa_url() -> str:
    return env_default("RASA_URL") or "http://127.0.0.1:5005"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m connector.simulator", description=__doc__)
    sub = parser.add_subparsers(dest="command")

    serve = sub.add_parser("serve", help="run the simulated Cloud API (default)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=int(env_default("SIM_PORT", str(DEFAULT_PORT))))
    serve.add_argument("--access-token", default=env_default("WHATSAPP_ACCESS_TOKEN"))
    serve.add_argument("--phone-number-id", default=env_default("WHATSAPP_PHONE_NUMBER_ID"))
    serve.add_argument("--display-phone-number", default=env_default("SIM_DISPLAY_PHONE_NUMBER", "15550001234"))
    serve.add_argument("--business-account-id", default=env_default("WHATSAPP_BUSINESS_ACCOUNT_ID", "102290129340398"))
    serve.add_argument("--app-secret", default=env_default("WHATSAPP_APP_SECRET"))
    serve.add_argument("--bot-webhook", default=env_default("SIM_BOT_WEBHOOK_URL", DEFAULT_BOT_WEBHOOK))
    serve.add_argument("--templates", type=Path, default=Path(env_default("SIM_TEMPLATES", str(DEFAULT_TEMPLATES))))
    serve.add_argument("--window-errors", choices=("async", "sync"), default=env_default("SIM_WINDOW_ERRORS", "async"))
    serve.add_argument("--statuses", default=env_default("SIM_STATUSES", "sent,delivered,read"),
                       help="comma list of statuses reported after a send (empty: none)")
    serve.add_argument("--status-delay", type=float, default=0.0, help="seconds before each status webhook")
    serve.add_argument("--redeliver-delays", default=env_default("SIM_REDELIVER_DELAYS"),
                       help='seconds between redeliveries of a webhook the bot did not take, e.g. 0.5,1,2 '
                            '(default 1,2,4,8,15,30,60; "" or none: never)')
    serve.add_argument("--extra-phone-number-ids", default=env_default("SIM_EXTRA_PHONE_NUMBER_IDS", ""),
                       help="comma list of further business phone number ids the Cloud API accepts")
    serve.add_argument("--log-level", default=env_default("SIM_LOG_LEVEL", "INFO"))
    serve.add_argument("--state-file", default=env_default("SIM_STATE_FILE", ""),
                       help="JSON file keeping conversations and the clock across restarts (default: none kept)")

    say = sub.add_parser(
        "say", help="send a customer message and print the bot's replies",
        description="Send a customer message through the simulator and print the bot's replies. TEXT is the "
                    "message; with --button-reply/--list-reply the tapped title, with --image/--document the "
                    "caption, with --location the place's name (optional then).")
    say.add_argument("wa_id")
    say.add_argument("text", nargs="?", metavar="TEXT")
    say.add_argument("--name", help="customer profile name")
    say.add_argument("--at", type=int, help="message timestamp (unix seconds); default: simulator now")
    kind = say.add_mutually_exclusive_group()
    kind.add_argument("--button-reply", metavar="ID", help="send a reply-button tap with this id (TEXT is its title)")
    kind.add_argument("--list-reply", metavar="ID", help="send a list-row tap with this id (TEXT is its title)")
    kind.add_argument("--image", metavar="PATH_OR_URL", help="send a photo (JPEG or PNG; TEXT is its caption)")
    kind.add_argument("--document", metavar="PATH_OR_URL", help="send a file (TEXT is its caption)")
    kind.add_argument("--location", metavar="LAT,LON", help="send a location pin (TEXT is the place's name)")
    kind.add_argument("--contacts", metavar="NAME:PHONE", action="append",
                      help='send a contact card, e.g. "Ada Lovelace:+4915112345678" (repeat for more cards)')
    say.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the first reply")
    say.add_argument("--quiet-after", type=float, default=1.5, help="stop after this long without a new reply")
    say.add_argument("--access-token", default=env_default("WHATSAPP_ACCESS_TOKEN", "sim-access-token"),
                     help="the simulator's access token, for uploading --image/--document "
                          "(default: $WHATSAPP_ACCESS_TOKEN or run.sh's sim-access-token)")
    say.add_argument("--sim-url", default=default_sim_url())
    _bot_view_options(say)

    show = sub.add_parser("show", help="print a conversation: what reached the phone, and what the bot held back")
    show.add_argument("wa_id")
    show.add_argument("--json", action="store_true",
                      help="print the raw conversation JSON (the bot's view under \"bot\", when it can be read)")
    show.add_argument("--sim-url", default=default_sim_url())
    _bot_view_options(show)

    add_agent_parser(sub)
    return parser


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS + ("-h", "--help"):
        argv.insert(0, "serve")
    if argv[0] == "say":  # `--location -33.86,151.21`: a southern latitude is not an option
        for i in range(len(argv) - 2, 0, -1):
            if argv[i] == "--location" and LAT_LON.fullmatch(argv[i + 1]):
                argv[i:i + 2] = [f"--location={argv[i + 1]}"]
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse fills an optional positional (say's TEXT) with nothing when an option follows WA_ID:
    # `say 155... --button-reply /opt_in "Order updates"` leaves the title over; it is TEXT
    if args.command == "say" and args.text is None and len(extra) == 1 and not extra[0].startswith("-"):
        args.text, extra = extra[0], []
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.command == "serve":
        return serve(args)
    if args.command == "say":
        return asyncio.run(say(args))
    if args.command == "agent":
        return asyncio.run(agent(args))
    return asyncio.run(show(args))


# --- serve -----------------------------------------------------------------------------------


def settings_from_args(args: argparse.Namespace) -> Settings:
    return Settings(
        access_token=args.access_token or "",
        phone_number_id=args.phone_number_id or "",
        app_secret=args.app_secret or "",
        display_phone_number=args.display_phone_number,
        business_account_id=args.business_account_id,
        bot_webhook_url=args.bot_webhook,
        templates_path=args.templates,
        window_errors=args.window_errors,
        statuses=parse_statuses(args.statuses),
        host=args.host,
        port=args.port,
        status_delay=args.status_delay,
        redeliver_delays=parse_delays(args.redeliver_delays),
        phone_number_ids=comma_list(args.extra_phone_number_ids),
        state_file=Path(args.state_file) if getattr(args, "state_file", "") else None,
    )


def serve(args: argparse.Namespace) -> int:
    from aiohttp import web

    from .server import create_app

    try:
        settings = settings_from_args(args)
    except SettingsError as exc:
        hint = next((h for name, h in ENV_HINTS.items() if name in str(exc)), "")
        print(f"simulator: {exc}" + (f" (set {hint})" if hint else ""), file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiohttp.access").addFilter(quiet_reads)
    try:
        app = create_app(settings)
    except (OSError, ValueError, KeyError) as exc:
        print(f"simulator: cannot load templates from {settings.templates_path}: {exc}", file=sys.stderr)
        return 2
    web.run_app(
        app, host=settings.host, port=settings.port,
        print=lambda _: print(f"WhatsApp Cloud API simulator on http://{settings.host}:{settings.port}", flush=True),
    )
    return 0


def quiet_reads(record: logging.LogRecord) -> bool:
    """Leaves out of the access log what the page and the bot's clock read twice a second."""
    return not any(f'"GET {path}' in record.getMessage() for path in ("/_sim/", "/page/", "/ HTTP"))


# --- say / show ------------------------------------------------------------------------------

GRAPH_VERSION = "v23.0"
CONVERSATION_VIEW = "/webhooks/whatsapp/conversations"
HELD_BACK = ("suppressed", "failed", "unknown")
"""Record kinds of the bot's conversation view that never reached the phone as sent."""
PHOTO_TYPES = ("image/jpeg", "image/png")
MAX_UPLOAD = {"image": 5 * 1024 * 1024, "document": 100 * 1024 * 1024}  # Meta's limits
WINDOW_SECONDS = 24 * 60 * 60


class CliTrouble(Exception):
    """Something the command cannot go on from; the message is for the person at the terminal."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def _bot_view_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rasa-url", default=default_rasa_url(),
                        help="the bot, for its conversation view (default: $RASA_URL or http://127.0.0.1:5005)")
    parser.add_argument("--token", default=env_default("RASA_AUTH_TOKEN"),
                        help="the bot's api_token (run.sh: $RASA_AUTH_TOKEN), to show what the bot held back")


def sim_not_running(url: str) -> str:
    return f"the simulator is not running at {url} (start it with bash scripts/run.sh)"


def bot_not_up(webhook_url: str) -> str:
    return f'the bot is not up yet ({webhook_url} did not answer); run.sh prints "ready" when it is'


def _stamp(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts))


def _tap(message: Dict[str, Any]) -> Optional[str]:
    """A customer's tap on a reply button, a list row or a template quick reply, with its id."""
    payload = message.get("payload") or {}
    inter = payload.get("interactive") or {}
    if inter.get("type") == "button_reply":
        reply = inter.get("button_reply") or {}
        return f"[button {reply.get('id')}] {reply.get('title', '')}".rstrip()
    if inter.get("type") == "list_reply":
        reply = inter.get("list_reply") or {}
        return f"[row {reply.get('id')}] {reply.get('title', '')}".rstrip()
    if message.get("type") == "button":
        button = payload.get("button") or {}
        return f"[button {button.get('payload')}] {button.get('text', '')}".rstrip()
    return None


def _options(payload: Dict[str, Any]) -> List[str]:
    """The reply buttons and list rows of a bot message, with the ids a tap sends back."""
    inter = (payload.get("interactive") or {}) if payload.get("type") == "interactive" else {}
    action = inter.get("action") or {}
    if inter.get("type") == "button":
        return [f"[button {b.get('reply', {}).get('id')}] {b.get('reply', {}).get('title', '')}"
                for b in action.get("buttons") or []]
    if inter.get("type") == "list":
        return [f"[row {r.get('id')}] {r.get('title', '')}" + (f" - {r['description']}" if r.get("description") else "")
                for section in action.get("sections") or [] for r in section.get("rows") or []]
    return []


def _failure(code: Any, reason: Optional[str]) -> str:
    return f"[failed {code}: {reason or 'no reason given'}]" if code else f"[failed: {reason or 'no reason given'}]"


def format_message(message: Dict[str, Any], record: Optional[Dict[str, Any]] = None) -> str:
    """One message as the phone has it (UTC): templates by name, taps and options with their ids;
    `record` is the bot's record of the same message, when its conversation view was read."""
    inbound = message["direction"] == "in"
    payload = message.get("payload") or {}
    text = message.get("text") or f"<{message['type']}>"
    if message["type"] == "template":
        rendered = "" if text.startswith("<template") else text
        text = f"[template {(payload.get('template') or {}).get('name')}] {rendered}".rstrip()
    elif inbound:
        text = _tap(message) or text
    text = text.replace("\n", "\n    ")
    line = f"[{_stamp(message['timestamp'])}] {'>' if inbound else '<'} {'customer' if inbound else 'bot'}: {text}"
    if inbound:
        return line
    line += f"  ({message.get('status')})"
    errors = message.get("errors") or []
    if record is not None and record.get("kind") == "failed":
        line += "\n    " + _failure(record.get("code") or (errors[0].get("code") if errors else None), record.get("reason"))
    else:
        for err in errors:
            details = (err.get("error_data") or {}).get("details")
            line += "\n    " + _failure(err.get("code"), " - ".join(str(p) for p in (err.get("title"), details) if p))
    for option in _options(payload):
        line += f"\n    {option}"
    return line


def format_record(record: Dict[str, Any]) -> str:
    """A bot message that did not reach the phone, from the bot's conversation view."""
    kind, reason = record.get("kind"), record.get("reason")
    if kind == "suppressed":
        mark = f"[suppressed: {reason or 'no reason given'}]"
    elif kind == "failed":
        mark = _failure(record.get("code"), reason)
    else:
        mark = f"[{kind}: {reason or 'WhatsApp never answered the send'}]"
    what = [f"template {record['template']}" if record.get("template") else record.get("response") or ""]
    text = " ".join(str(record.get("text") or "").split())
    if text:
        what.append(json.dumps(text if len(text) <= 80 else text[:77] + "...", ensure_ascii=False))
    return f"[{_stamp(record.get('at') or 0)}] x bot: {mark} {' '.join(w for w in what if w) or 'a message'}"


def _held_back(view: Optional[Dict[str, Any]], shown: Set[str]) -> List[Dict[str, Any]]:
    """The view's records that the phone does not have as a message of its own, oldest first."""
    records = (view or {}).get("records") or []
    held = [r for r in records if r.get("kind") in HELD_BACK and r.get("wamid") not in shown]
    return sorted(held, key=lambda r: r.get("at") or 0)


def _window_line(view: Dict[str, Any]) -> str:
    """The care window, opt-in and templates left, as the bot's conversation view has them."""
    now = view.get("now") or time.time()
    last = view.get("last_inbound_at")
    if view.get("unknown"):
        state = f"unknown ({view['unknown']}): only what is provably allowed goes out"
    elif last is None:
        state = "never opened"
    elif view.get("window_open"):
        expires = view.get("expires_at")
        state = f"open, closes in {_span(expires - now)}" if expires is not None else "open"
    elif view.get("closed_by_meta_for") is not None and view["closed_by_meta_for"] >= last:
        state = f"closed by WhatsApp (131047) for the customer's message of {_stamp(last)} UTC"
    else:
        closed = last + WINDOW_SECONDS - (view.get("margin_seconds") or 0)
        state = f"closed since {time.strftime('%Y-%m-%d %H:%M', time.gmtime(closed))} UTC ({_ago(closed, now)})"
    opt_in = {True: "yes", False: "no"}.get(view.get("opt_in"), "not given")
    left = view.get("templates_left")
    facts = [f"window: {state}", f"opt-in: {opt_in}"]
    if left is not None:
        facts.append(f"templates left: {left}" + (" (once it lapses)" if view.get("window_open") else ""))
    if view.get("marketing_stopped"):
        facts.append("marketing messages stopped")
    return "; ".join(facts)


def _sim_window_line(conv: Dict[str, Any], now: Optional[float]) -> str:
    """The window as the simulator (WhatsApp) has it, when the bot's view cannot be read."""
    closes = conv.get("window_closes_at")
    if closes is None:
        return "window: never opened (as WhatsApp has it)"
    if now is None:
        return f"window: {'open' if conv.get('window_open') else 'closed'} (as WhatsApp has it)"
    if conv.get("window_open"):
        return f"window: open, closes in {_span(closes - now)} (as WhatsApp has it)"
    return f"window: closed since {time.strftime('%Y-%m-%d %H:%M', time.gmtime(closes))} UTC ({_ago(closes, now)}; as WhatsApp has it)"


async def _read(resp: aiohttp.ClientResponse) -> Any:
    raw = await resp.text()
    try:
        return json.loads(raw) if raw.strip() else {}
    except ValueError:
        return {"error": raw.strip()[:300]}


def _error_of(body: Any) -> str:
    return str(body.get("error", body)) if isinstance(body, dict) else str(body)


async def _get_conversation(session: aiohttp.ClientSession, url: str, wa_id: str) -> Optional[Dict[str, Any]]:
    async with session.get(f"{url}/_sim/conversations/{quote(wa_id, safe='')}") as resp:
        if resp.status == 404:
            return None
        resp.raise_for_status()
        return await resp.json()


async def _sim_config(session: aiohttp.ClientSession, url: str) -> Dict[str, Any]:
    async with session.get(f"{url}/_sim/config") as resp:
        return await resp.json() if resp.status == 200 else {}


async def _sim_now(session: aiohttp.ClientSession, url: str) -> Optional[float]:
    try:
        async with session.get(f"{url}/_sim/clock") as resp:
            return float((await resp.json())["now_float"]) if resp.status == 200 else None
    except (aiohttp.ClientError, KeyError, TypeError, ValueError):
        return None


async def _bot_not_up(session: aiohttp.ClientSession, url: str, kept: bool) -> str:
    """The bot's webhook did not answer; with `kept`, how long the simulator keeps trying."""
    try:
        config = await _sim_config(session, url)
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
        config = {}
    text = bot_not_up(config.get("bot_webhook_url") or "the bot's webhook")
    if not kept:
        return text + "\n  the message was not delivered"
    delays = config.get("redeliver_delays") or []
    return text + f"\n  the simulator delivers the message again for {_span(sum(delays))}" if delays else text


async def bot_view(args: argparse.Namespace, wa_id: str) -> Tuple[Optional[Dict[str, Any]], str]:
    """The bot's conversation view of the customer (`GET /webhooks/whatsapp/conversations/{id}`), or
    None and one line saying why it is not shown."""
    rasa = args.rasa_url.rstrip("/")
    if not args.token:
        return None, "(set RASA_AUTH_TOKEN, or pass --token, to see suppressed replies and the window as the bot has it)"
    url = f"{rasa}{CONVERSATION_VIEW}/{quote(wa_id, safe='')}"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            async with session.get(url, headers={"Authorization": f"Bearer {args.token}"}) as resp:
                status, body = resp.status, await _read(resp)
    except aiohttp.ClientConnectorError:
        return None, f'(the bot is not up at {rasa}, so its suppressed replies are not shown; run.sh prints "ready" when it is)'
    except asyncio.TimeoutError:
        return None, f"(the bot at {rasa} did not answer within 10 s, so its suppressed replies are not shown)"
    except (aiohttp.ClientError, ValueError) as exc:  # ValueError: a malformed --rasa-url
        return None, f"(the bot's conversation view at {url} could not be read: {exc!r})"
    if status == 200 and isinstance(body, dict) and "records" in body:
        return body, ""
    if status == 401:
        return None, "(the bot refused the token (401): RASA_AUTH_TOKEN / --token must be the bot's api_token, as run.sh printed it)"
    if status == 404:
        return None, f"(the bot has no conversation view at {rasa}: {_error_of(body)})"
    return None, f"(the bot's conversation view answered HTTP {status}: {_error_of(body)}; its suppressed replies are not shown)"


def _parse_location(value: str, name: Optional[str]) -> Dict[str, Any]:
    try:
        lat, lon = (float(part) for part in value.split(","))
    except ValueError:
        raise CliTrouble(f"--location wants LAT,LON in degrees, e.g. 52.52,13.405; got {value!r}", 2) from None
    if not (-90 <= lat <= 90 and -180 <= lon <= 180):
        raise CliTrouble(f"--location {value}: latitude is -90..90 and longitude -180..180", 2)
    location: Dict[str, Any] = {"latitude": lat, "longitude": lon}
    if name:
        location["name"] = name
    return location


def _parse_contact(value: str) -> Dict[str, Any]:
    name, sep, phone = value.rpartition(":")
    digits = "".join(ch for ch in phone if ch.isdigit())
    if not sep or not name.strip() or not digits:
        raise CliTrouble(f'--contacts wants NAME:PHONE, e.g. "Ada Lovelace:+4915112345678"; got {value!r}', 2)
    name = name.strip()
    first, _, last = name.partition(" ")
    names: Dict[str, str] = {"formatted_name": name, "first_name": first}
    if last:
        names["last_name"] = last
    return {"name": names, "phones": [{"phone": phone.strip(), "wa_id": digits, "type": "MOBILE"}]}


def say_spec(args: argparse.Namespace) -> Dict[str, Any]:
    """The simulator's customer-message spec for the options given (media is uploaded later)."""
    text = args.text
    if args.contacts:
        if text:
            raise CliTrouble("a contact card has no text: leave TEXT out with --contacts", 2)
        spec: Dict[str, Any] = {"contacts": [_parse_contact(c) for c in args.contacts]}
    elif args.location:
        spec = {"location": _parse_location(args.location, text)}
    elif args.image or args.document:
        spec = {}  # filled in by the upload
    elif args.button_reply or args.list_reply:
        if not text:
            raise CliTrouble("TEXT is the tapped title: say WA_ID --button-reply ID TITLE", 2)
        kind = "button_reply" if args.button_reply else "list_reply"
        spec = {kind: {"id": args.button_reply or args.list_reply, "title": text}}
    else:
        if not text:
            raise CliTrouble("nothing to say: give TEXT, or one of --image, --document, --location, --contacts", 2)
        spec = {"text": text}
    if args.name:
        spec["name"] = args.name
    if args.at is not None:
        spec["timestamp"] = args.at
    return spec


async def _media_bytes(session: aiohttp.ClientSession, source: str, kind: str) -> Tuple[bytes, str, str]:
    """(content, MIME type, file name) of a local file or a URL."""
    if source.startswith(("http://", "https://")):
        try:
            async with session.get(source) as resp:
                if resp.status != 200:
                    raise CliTrouble(f"could not fetch {source}: HTTP {resp.status}")
                data = await resp.read()
                mime = resp.content_type if resp.content_type != "application/octet-stream" else ""
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise CliTrouble(f"could not fetch {source}: {exc!r}") from None
        name = Path(source.split("?", 1)[0]).name or f"{kind}.bin"
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise CliTrouble(f"no such file: {source}", 2)
        data, mime, name = path.read_bytes(), "", path.name
    mime = mime or mimetypes.guess_type(name)[0] or ("image/jpeg" if kind == "image" else "application/octet-stream")
    if kind == "image" and mime not in PHOTO_TYPES:
        raise CliTrouble(f"a WhatsApp photo is JPEG or PNG, {source} is {mime}: send it with --document", 2)
    if len(data) > MAX_UPLOAD[kind]:
        raise CliTrouble(f"{source} is {len(data)} bytes: WhatsApp takes at most {MAX_UPLOAD[kind] // 2**20} MB "
                         f"for a{'' if kind == 'image' else ' '}{'n image' if kind == 'image' else 'document'}", 2)
    return data, mime, name


async def _upload(session: aiohttp.ClientSession, url: str, args: argparse.Namespace, spec: Dict[str, Any]) -> None:
    """Upload --image / --document to the simulator's media store (as a business would to Meta),
    so the bot fetches the real bytes; the message then carries the media id."""
    kind = "image" if args.image else "document"
    data, mime, name = await _media_bytes(session, args.image or args.document, kind)
    phone_number_id = (await _sim_config(session, url)).get("phone_number_id")
    form = aiohttp.FormData()
    form.add_field("messaging_product", "whatsapp")
    form.add_field("type", mime)
    form.add_field("file", data, filename=name, content_type=mime)
    headers = {"Authorization": f"Bearer {args.access_token}"}
    async with session.post(f"{url}/{GRAPH_VERSION}/{phone_number_id}/media", data=form, headers=headers) as resp:
        body = await _read(resp)
    if resp.status != 200 or not isinstance(body, dict) or not body.get("id"):
        error = body.get("error", {}) if isinstance(body, dict) else {}
        why = error.get("message", body) if isinstance(error, dict) else error
        hint = ": pass --access-token (the simulator's WHATSAPP_ACCESS_TOKEN)" if resp.status == 401 else ""
        raise CliTrouble(f"the simulator refused the upload of {name} (HTTP {resp.status}: {why}){hint}")
    media: Dict[str, Any] = {"id": str(body["id"]), "mime_type": mime,
                             "sha256": base64.b64encode(hashlib.sha256(data).digest()).decode()}
    if args.text:
        media["caption"] = args.text
    if kind == "document":
        media["filename"] = name
    spec[kind] = media


def _record_ids(view: Optional[Dict[str, Any]]) -> Set[str]:
    return {str(r.get("callback_id") or r.get("at")) for r in (view or {}).get("records") or []}


async def say(args: argparse.Namespace) -> int:
    url = args.sim_url.rstrip("/")
    try:
        spec = say_spec(args)
        return await _say(args, url, spec)
    except CliTrouble as trouble:
        print(f"say: {trouble}", file=sys.stderr)
        return trouble.code
    except aiohttp.ClientConnectorError:
        print(f"say: {sim_not_running(url)}", file=sys.stderr)
        return 1
    except asyncio.TimeoutError:
        print(f"say: the simulator at {url} did not answer in time", file=sys.stderr)
        return 1
    except (aiohttp.ClientError, ValueError) as exc:  # ValueError: a malformed --sim-url
        print(f"say: talking to the simulator at {url} failed: {exc!r}", file=sys.stderr)
        return 1


async def _say(args: argparse.Namespace, url: str, spec: Dict[str, Any]) -> int:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=args.timeout + 60)) as session:
        before = await _get_conversation(session, url, args.wa_id)
        if args.image or args.document:
            await _upload(session, url, args, spec)
        view_before, _ = await bot_view(args, args.wa_id) if args.token else (None, "")
        known = _record_ids(view_before)
        seen = len([m for m in (before or {}).get("messages", []) if m["direction"] == "out"])
        async with session.post(f"{url}/_sim/customers/{quote(args.wa_id, safe='')}/messages", json=spec) as resp:
            result = await _read(resp)
            status = resp.status
        if status == 502:  # no redelivery configured: the message was not kept
            raise CliTrouble(await _bot_not_up(session, url, kept=False))
        if status != 200:
            raise CliTrouble(f"the simulator refused the message (HTTP {status}): {_error_of(result)}")
        answer = result.get("webhook_status")
        queued = result.get("redelivery") == "queued"
        if answer is None:
            raise CliTrouble(await _bot_not_up(session, url, kept=queued))
        if answer in (401, 403):
            raise CliTrouble(f"the bot refused the webhook's signature (HTTP {answer}): the simulator's "
                             "WHATSAPP_APP_SECRET must be the bot's app_secret")
        if not 200 <= answer < 300:
            print(f"simulator: the bot answered HTTP {answer}" + ("; redelivery queued" if queued else ""),
                  file=sys.stderr)
        wait = args.timeout
        shown: Set[str] = set()
        while True:
            params = {"outbound": str(seen + 1), "timeout": str(wait)}
            async with session.get(f"{url}/_sim/conversations/{quote(args.wa_id, safe='')}/wait", params=params) as resp:
                conv = await resp.json()
                timed_out = resp.status == 408
            outbound = [m for m in conv["messages"] if m["direction"] == "out"]
            for message in outbound[seen:]:
                print(format_message(message), flush=True)
                shown.add(message["wamid"])
            seen = len(outbound)
            if timed_out:
                break
            wait = args.quiet_after
    view, why = await bot_view(args, args.wa_id)
    phone = {m["wamid"] for m in conv["messages"]}
    held = [r for r in _held_back(view, phone) if str(r.get("callback_id") or r.get("at")) not in known]
    for record in held:
        print(format_record(record), flush=True)
    if shown or held:
        return 0
    turn = next((t for t in (view or {}).get("inbox") or [] if t.get("message_id") == result.get("wamid")), None)
    note = f"(no reply within {args.timeout:g} s"
    if turn is not None and turn.get("state") != "done":
        attempts = f", {turn['attempts']} attempt(s)" if turn.get("attempts") else ""
        error = f": {turn['error']}" if turn.get("error") else ""
        note += f"; the bot's turn for it is {turn.get('state')}{attempts}{error}"
    print(note + ")", file=sys.stderr)
    if why:
        print(why, file=sys.stderr)
    return 0


async def show(args: argparse.Namespace) -> int:
    url = args.sim_url.rstrip("/")
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            conv = await _get_conversation(session, url, args.wa_id)
            now = await _sim_now(session, url)
    except aiohttp.ClientConnectorError:
        print(f"show: {sim_not_running(url)}", file=sys.stderr)
        return 1
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
        print(f"show: talking to the simulator at {url} failed: {exc!r}", file=sys.stderr)
        return 1
    view, why = await bot_view(args, args.wa_id)
    if conv is None and not (view and (view.get("records") or view.get("inbox") or view.get("last_inbound_at"))):
        print(f"no conversation with {args.wa_id}" + (f" {why}" if why else ""), file=sys.stderr)
        return 1
    conv = conv or {"wa_id": args.wa_id, "name": None, "messages": [], "rejected": [], "window_open": False}
    if args.json:
        print(json.dumps({**conv, "bot": view} if view is not None else conv, indent=2, ensure_ascii=False))
        return 0
    print(f"{conv.get('name') or 'customer'} ({conv['wa_id']}), times UTC")
    print(_window_line(view) if view is not None else _sim_window_line(conv, now))
    if why:
        print(why)
    messages = conv["messages"]
    records = {r["wamid"]: r for r in (view or {}).get("records") or [] if r.get("wamid")}
    pending: List[Tuple[float, str]] = [(r.get("at") or 0, format_record(r))
                                        for r in _held_back(view, {m["wamid"] for m in messages})]
    if view is None:  # the bot's failed records would say the same; without them, the simulator's refusals
        pending += [(r["timestamp"], f"[{_stamp(r['timestamp'])}] x bot: [rejected {r.get('code')}: {r.get('details')}]")
                    for r in conv.get("rejected") or []]
    pending.sort(key=lambda item: item[0])
    for message in messages:  # in the order the phone has them; the bot's records by time between
        while pending and math.floor(pending[0][0]) < message["timestamp"]:
            print(pending.pop(0)[1])
        print(format_message(message, records.get(message["wamid"]) if message["direction"] == "out" else None))
    for _, line in pending:
        print(line)
    return 0


# --- agent -----------------------------------------------------------------------------------

AGENT_PATH = "/webhooks/whatsapp/agent"
AGENT_PROG = "python -m connector.simulator agent"
AGENT_DESCRIPTION = """\
Act as the human agent from a terminal, against the bot's agent API (`rasa run`, routes under
/webhooks/whatsapp/agent/). The bearer token is the channel's agent_token. Times are UTC.
Exit status: 0 done; 1 refused, failed or the bot is not up; 2 no token, wrong token or agent API off."""


def _agent_options(parser: argparse.ArgumentParser, defaults: bool) -> None:
    """The same options before and after the action; only the `agent` level carries the defaults."""
    def default(value: Any) -> Any:
        return value if defaults else argparse.SUPPRESS

    parser.add_argument("--rasa-url", default=default(default_rasa_url()),
                        help="the bot (default: $RASA_URL or http://127.0.0.1:5005)")
    parser.add_argument("--token", default=default(env_default("WHATSAPP_AGENT_TOKEN")),
                        help="the channel's agent_token (default: $WHATSAPP_AGENT_TOKEN)")
    parser.add_argument("--timeout", type=float, default=default(30.0), help="seconds to wait for the bot (30)")


def add_agent_parser(sub: Any) -> None:
    agent = sub.add_parser("agent", help="act as the human agent on handed-off conversations (talks to rasa run)",
                           description=AGENT_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    _agent_options(agent, defaults=True)
    actions = agent.add_subparsers(dest="action", metavar="ACTION")

    def action(name: str, help: str) -> argparse.ArgumentParser:
        parser = actions.add_parser(name, help=help, description=help)
        _agent_options(parser, defaults=False)
        return parser

    listing = action("list", "the handed-off conversations: since when, why, the care window")
    listing.add_argument("--json", action="store_true", help="print the raw JSON")
    show = action("show", "one conversation: paused, care window, opt-in, templates, desk backlog, messages")
    show.add_argument("sender_id")
    show.add_argument("--json", action="store_true", help="print the raw JSON")
    handoff = action("handoff", "take a conversation over: the bot stays quiet until `resume`")
    handoff.add_argument("sender_id")
    handoff.add_argument("--reason", help="why (shown in `list`)")
    reply = action("reply", "send a free-form text as the agent (only inside the care window)")
    reply.add_argument("sender_id")
    reply.add_argument("text", nargs="+", help="the words are joined with spaces; put -- before a text starting with -")
    template = action("template", "send an approved template as the agent (also outside the care window)")
    template.add_argument("sender_id")
    template.add_argument("name")
    template.add_argument("--language", default="en_US")
    template.add_argument("--body", nargs="+", action="extend", default=[], metavar="P",
                          help="body parameters {{1}} {{2}} ... in order")
    resume = action("resume", "hand the conversation back to the bot")
    resume.add_argument("sender_id")
    agent.set_defaults(agent_parser=agent)


class AgentTrouble(Exception):
    """An answer the action cannot go on from; the message is for the person at the terminal."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def _utc(ts: Optional[float], now: float) -> str:
    """HH:MM (UTC) today, with the date on other days."""
    if ts is None:
        return "--:--"
    when = time.gmtime(ts)
    return time.strftime("%H:%M" if when[:3] == time.gmtime(now)[:3] else "%Y-%m-%d %H:%M", when)


def _span(seconds: float) -> str:
    total = max(int(seconds), 0)
    if total < 60:
        return f"{total} s"
    minutes = total // 60
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h" if hours else f"{days} d"


def _ago(ts: Optional[float], now: float) -> str:
    if ts is None:
        return "at an unknown time"
    return "just now" if now - ts < 1 else f"{_span(now - ts)} ago"


def _yes_no(flag: Optional[bool]) -> str:
    return "unknown" if flag is None else ("yes" if flag else "no")


def _window(window_open: Optional[bool], expires_at: Optional[float], now: float) -> str:
    if window_open is None:
        window_open = expires_at is not None and expires_at > now
    if window_open:
        return f"open, closes in {_span(expires_at - now)}" if expires_at is not None else "open"
    if expires_at is None:
        return "closed (no customer message on record)"
    return f"closed since {_utc(expires_at, now)} UTC"


def _template_hint(sender_id: str) -> str:
    return f"{AGENT_PROG} template {shlex.quote(sender_id)} <name> [--body P ...]"


def format_agent_message(message: Dict[str, Any], now: float) -> str:
    """One line of `agent show`; like `format_message`, with who sent it and what became of it."""
    inbound = message.get("direction") == "in"
    arrow = ">" if inbound else "<"
    who = message.get("by") or ("customer" if inbound else "bot")
    text = message.get("text") or ""
    if message.get("template"):
        text = f"[template {message['template']}] {text}".rstrip()
    text = (text or f"<{message.get('type') or 'message'}>").replace("\n", "\n    ")
    line = f"[{_utc(message.get('at'), now)}] {arrow} {who}: {text}"
    if inbound:
        return line
    decision, status, reason = message.get("decision"), message.get("status"), message.get("reason")
    if decision == "suppressed":
        return line + f"  [suppressed: {reason or 'no reason given'}]"
    if status in ("failed", "unknown") or decision in ("failed", "unknown"):
        code = f" {message['code']}" if message.get("code") else ""
        return line + f"  [{status or decision}{code}: {reason or 'no reason given'}]"
    notes = [n for n in (status, reason) if n]
    return line + (f"  ({'; '.join(notes)})" if notes else "")


def format_refusal(sender_id: str, answer: Dict[str, Any], now: float) -> str:
    """A 409 from the messages route: why nothing was sent, and what can be sent instead."""
    if answer.get("error") != "care_window_closed":
        return f"refused: {answer.get('error')}" + (f" ({answer['reason']})" if answer.get("reason") else "")
    expired, left = answer.get("expired_at"), answer.get("templates_left")
    templates = [str(t) for t in answer.get("templates") or []]
    facts = [f"closed at {_utc(expired, now)} UTC" if expired is not None else "the customer never wrote",
             f"opt-in {_yes_no(answer.get('opt_in'))}"]
    if left is not None:
        facts.append(f"{left} template(s) left")
    text = f"refused: the care window is closed ({'; '.join(facts)})"
    if templates and left != 0:
        text += f" — send one of these templates instead: {', '.join(templates)}: {_template_hint(sender_id)}"
    else:
        text += " — no template can be sent either" + (" (none left)" if left == 0 else " (none available)")
    text += "\n  nothing was sent" + (f"; the bot says: {answer['reason']}" if answer.get("reason") else "")
    return text


async def _agent_call(args: argparse.Namespace, method: str, path: str,
                      body: Optional[Dict[str, Any]] = None) -> Tuple[int, Dict[str, Any]]:
    url = f"{args.rasa_url.rstrip('/')}{AGENT_PATH}/{path}"
    headers = {"Authorization": f"Bearer {args.token}"}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=args.timeout)) as session:
        async with session.request(method, url, json=body, headers=headers) as resp:
            raw = await resp.text()
            try:
                answer = json.loads(raw) if raw.strip() else {}
            except ValueError:
                answer = {"error": raw.strip()[:300]}
            if not isinstance(answer, dict):
                answer = {"error": raw.strip()[:300]}
            status = resp.status
    if status == 401:
        raise AgentTrouble(f"the bot wants an agent token (401: {answer.get('error', 'unauthorized')}): "
                           "set WHATSAPP_AGENT_TOKEN or pass --token", 2)
    if status == 403:
        raise AgentTrouble(f"the bot refused the agent token (403: {answer.get('error', 'forbidden')}): "
                           "WHATSAPP_AGENT_TOKEN / --token must be the channel's agent_token", 2)
    if status == 404:
        said = f" (the bot says: {answer['error']})" if answer.get("error") else ""
        raise AgentTrouble(f"the agent API is off at {args.rasa_url}{said}: set agent_token in the whatsapp "
                           "channel's credentials and restart rasa run", 2)
    return status, answer


def _expect_ok(status: int, answer: Dict[str, Any]) -> Dict[str, Any]:
    if status == 503 and answer.get("error") == "the channel is starting":
        raise AgentTrouble('the bot is starting (503): try again in a few seconds; run.sh prints "ready" when it is up')
    if status != 200:
        raise AgentTrouble(f"the bot answered HTTP {status}: {answer.get('error', answer)}")
    return answer


def _sender_path(sender_id: str, tail: str = "") -> str:
    return f"conversations/{quote(sender_id, safe='')}" + (f"/{tail}" if tail else "")


async def agent_list(args: argparse.Namespace) -> int:
    answer = _expect_ok(*await _agent_call(args, "GET", "conversations"))
    if args.json:
        print(json.dumps(answer, indent=2, ensure_ascii=False))
        return 0
    now = answer.get("now") or time.time()
    conversations = answer.get("conversations") or []
    if not conversations:
        print("no conversation is handed off")
        return 0
    width = max(len(str(c.get("sender_id"))) for c in conversations)
    for conv in conversations:
        why = f" ({conv['reason']})" if conv.get("reason") else ""
        window = _window(conv.get("window_open"), conv.get("window_expires_at"), now)
        print(f"{str(conv.get('sender_id')):<{width}}  handed off {_ago(conv.get('since'), now)}{why}; window {window}")
    return 0


async def agent_show(args: argparse.Namespace) -> int:
    answer = _expect_ok(*await _agent_call(args, "GET", _sender_path(args.sender_id)))
    if args.json:
        print(json.dumps(answer, indent=2, ensure_ascii=False))
        return 0
    now = answer.get("now") or time.time()
    handoff = answer.get("handoff")
    if handoff:
        why = f" ({handoff['reason']})" if handoff.get("reason") else ""
        bot = f"handed off {_ago(handoff.get('since'), now)}{why}"
        bot = ("paused, " if answer.get("paused") else "not paused, ") + bot
    else:
        bot = "paused (not handed off)" if answer.get("paused") else "answering (not handed off)"
    templates = ", ".join(str(t) for t in answer.get("templates") or []) or "none"
    backlog = answer.get("desk_backlog") or []
    print(f"conversation {answer.get('sender_id', args.sender_id)}")
    print(f"  bot:           {bot}")
    ends = answer.get("expires_at") if answer.get("window_open") else answer.get("expired_at", answer.get("expires_at"))
    print(f"  care window:   {_window(answer.get('window_open'), ends, now)}")
    print(f"  opt-in:        {_yes_no(answer.get('opt_in'))}")
    print(f"  templates:     {answer.get('templates_left', '?')} left; available: {templates}")
    print(f"  desk backlog:  {len(backlog)} event(s) not yet delivered to the desk")
    for item in backlog:
        error = f": {item['error']}" if item.get("error") else ""
        print(f"    {item.get('event')} at {_utc(item.get('at'), now)}, {item.get('attempts', 0)} attempt(s){error}")
    messages = answer.get("messages") or []
    print(f"messages ({len(messages)}, oldest first, UTC):" if messages else "no messages")
    for message in messages:
        print(format_agent_message(message, now))
    return 0


async def agent_handoff(args: argparse.Namespace) -> int:
    body = {"reason": args.reason} if args.reason else {}
    answer = _expect_ok(*await _agent_call(args, "POST", _sender_path(args.sender_id, "handoff"), body))
    sender = answer.get("sender_id", args.sender_id)
    if not answer.get("paused", True):
        print(f"{sender}: the bot answered that it is NOT paused", file=sys.stderr)
        return 1
    already = " (it was handed off already)" if answer.get("changed") is False else ""
    print(f"{sender}: handed off to you{already}; the bot is paused until "
          f"`{AGENT_PROG} resume {shlex.quote(str(sender))}`")
    return 0


async def _agent_send(args: argparse.Namespace, body: Dict[str, Any]) -> int:
    status, answer = await _agent_call(args, "POST", _sender_path(args.sender_id, "messages"), body)
    if status == 200:
        print(f"sent ({answer.get('decision')}, wamid {answer.get('wamid')})")
        return 0
    if status == 409:
        print(format_refusal(args.sender_id, answer, time.time()), file=sys.stderr)
    elif status == 400:
        print(f"the bot refused the request (400): {answer.get('error', answer)}; nothing was sent", file=sys.stderr)
    elif status == 502:
        print(f"send failed: WhatsApp error {answer.get('code')}: {answer.get('reason') or answer.get('error')}",
              file=sys.stderr)
    elif status == 503 and answer.get("error") == "the channel is starting":
        print('the bot is starting (503): nothing was sent; try again in a few seconds (run.sh prints "ready" '
              "when it is up)", file=sys.stderr)
    else:
        print(f"the bot answered HTTP {status}: {answer.get('error', answer)}", file=sys.stderr)
    return 1


async def agent_reply(args: argparse.Namespace) -> int:
    return await _agent_send(args, {"text": " ".join(args.text)})


async def agent_template(args: argparse.Namespace) -> int:
    return await _agent_send(args, {"template": {"name": args.name, "language": args.language, "body": args.body}})


async def agent_resume(args: argparse.Namespace) -> int:
    answer = _expect_ok(*await _agent_call(args, "POST", _sender_path(args.sender_id, "resume")))
    sender = answer.get("sender_id", args.sender_id)
    paused = answer.get("paused", False)
    print(f"{sender}: handed back to the bot" + ("; it is STILL paused" if paused else "; it answers again"))
    return 0 if not paused else 1


AGENT_ACTIONS = {
    "list": agent_list, "show": agent_show, "handoff": agent_handoff,
    "reply": agent_reply, "template": agent_template, "resume": agent_resume,
}


async def agent(args: argparse.Namespace) -> int:
    if not args.action:
        args.agent_parser.print_help(sys.stderr)
        return 2
    if not args.token:
        print("agent: no agent token: set WHATSAPP_AGENT_TOKEN (the whatsapp channel's agent_token) "
              "or pass --token", file=sys.stderr)
        return 2
    url = args.rasa_url.rstrip("/")
    sending = args.action in ("handoff", "reply", "template", "resume")
    check = ""
    if sending:
        check = f"; it may have gone through: check with `{AGENT_PROG} show {shlex.quote(args.sender_id)}`"
    try:
        return await AGENT_ACTIONS[args.action](args)
    except AgentTrouble as trouble:
        print(f"agent: {trouble}", file=sys.stderr)
        return trouble.code
    except aiohttp.ClientConnectorError:
        print(f'agent: the bot is not up at {url} (start it with bash scripts/run.sh, which prints "ready" when it '
              "is; or pass --rasa-url / set RASA_URL)", file=sys.stderr)
        return 1
    except asyncio.TimeoutError:
        print(f"agent: the bot at {url} did not answer within {args.timeout:g} s{check}", file=sys.stderr)
        return 1
    except (aiohttp.ClientError, ValueError) as exc:  # ValueError: a malformed --rasa-url
        print(f"agent: talking to the bot at {url} failed: {exc!r}{check}", file=sys.stderr)
        return 1
