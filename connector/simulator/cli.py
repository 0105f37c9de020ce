"""Command line: `serve` runs the simulator; `say` and `show` play a customer against a running one;
`agent` plays the human agent against the bot's agent API (handed-off conversations, `rasa run`).

Every serve flag defaults from the same env vars the connector reads, so one `.env` drives both.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import quote

import aiohttp

from .settings import (
    DEFAULT_BOT_WEBHOOK, DEFAULT_PORT, DEFAULT_TEMPLATES, Settings, SettingsError, comma_list, env_default,
    parse_delays, parse_statuses,
)

COMMANDS = ("serve", "say", "show", "agent")
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

    say = sub.add_parser("say", help="send a customer message and print the bot's replies")
    say.add_argument("wa_id")
    say.add_argument("text")
    say.add_argument("--name", help="customer profile name")
    say.add_argument("--at", type=int, help="message timestamp (unix seconds); default: simulator now")
    say.add_argument("--button-reply", metavar="ID", help="send a reply-button tap with this id (TEXT is its title)")
    say.add_argument("--list-reply", metavar="ID", help="send a list-row tap with this id (TEXT is its title)")
    say.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the first reply")
    say.add_argument("--quiet-after", type=float, default=1.5, help="stop after this long without a new reply")
    say.add_argument("--sim-url", default=default_sim_url())

    show = sub.add_parser("show", help="print a conversation")
    show.add_argument("wa_id")
    show.add_argument("--json", action="store_true", help="print the raw conversation JSON")
    show.add_argument("--sim-url", default=default_sim_url())

    add_agent_parser(sub)
    return parser


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS + ("-h", "--help"):
        argv.insert(0, "serve")
    return build_parser().parse_args(argv)


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


# --- say / show ------------------------------------------------------------------------------


def format_message(message: Dict[str, Any]) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(message["timestamp"]))
    who = "customer" if message["direction"] == "in" else "bot"
    arrow = ">" if message["direction"] == "in" else "<"
    text = (message.get("text") or f"<{message['type']}>").replace("\n", "\n    ")
    line = f"[{when}] {arrow} {who}: {text}"
    if message["direction"] == "out":
        line += f"  ({message.get('status')})"
        for err in message.get("errors") or []:
            line += f"\n    error {err.get('code')}: {err.get('title')} - {err.get('error_data', {}).get('details', '')}"
    return line


async def _get_conversation(session: aiohttp.ClientSession, url: str, wa_id: str) -> Optional[Dict[str, Any]]:
    async with session.get(f"{url}/_sim/conversations/{wa_id}") as resp:
        if resp.status == 404:
            return None
        resp.raise_for_status()
        return await resp.json()


async def say(args: argparse.Namespace) -> int:
    url = args.sim_url.rstrip("/")
    spec: Dict[str, Any] = {"text": args.text}
    if args.button_reply:
        spec = {"button_reply": {"id": args.button_reply, "title": args.text}}
    elif args.list_reply:
        spec = {"list_reply": {"id": args.list_reply, "title": args.text}}
    if args.name:
        spec["name"] = args.name
    if args.at is not None:
        spec["timestamp"] = args.at
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=args.timeout + 60)) as session:
            before = await _get_conversation(session, url, args.wa_id)
            seen = len([m for m in (before or {}).get("messages", []) if m["direction"] == "out"])
            async with session.post(f"{url}/_sim/customers/{args.wa_id}/messages", json=spec) as resp:
                result = await resp.json()
                if resp.status != 200:
                    print(f"simulator: {result.get('error', result)}", file=sys.stderr)
                    return 1
            status = result["webhook_status"]
            if status is None or not 200 <= status < 300:
                answer = "was unreachable" if status is None else f"answered HTTP {status}"
                queued = "; redelivery queued" if result.get("redelivery") == "queued" else ""
                print(f"simulator: the bot {answer}{queued}", file=sys.stderr)
            wait = args.timeout
            replies = 0
            while True:
                params = {"outbound": str(seen + 1), "timeout": str(wait)}
                async with session.get(f"{url}/_sim/conversations/{args.wa_id}/wait", params=params) as resp:
                    conv = await resp.json()
                    timed_out = resp.status == 408
                outbound = [m for m in conv["messages"] if m["direction"] == "out"]
                for message in outbound[seen:]:
                    print(format_message(message), flush=True)
                    replies += 1
                seen = len(outbound)
                if timed_out:
                    break
                wait = args.quiet_after
            if not replies:
                print(f"(no reply within {args.timeout:g} s)", file=sys.stderr)
    except aiohttp.ClientError as exc:
        print(f"simulator not reachable at {url}: {exc}", file=sys.stderr)
        return 1
    return 0


async def show(args: argparse.Namespace) -> int:
    url = args.sim_url.rstrip("/")
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            conv = await _get_conversation(session, url, args.wa_id)
    except aiohttp.ClientError as exc:
        print(f"simulator not reachable at {url}: {exc}", file=sys.stderr)
        return 1
    if conv is None:
        print(f"no conversation with {args.wa_id}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(conv, indent=2, ensure_ascii=False))
        return 0
    state = "open" if conv["window_open"] else "closed"
    print(f"{conv.get('name') or ''} ({conv['wa_id']}) - care window {state}")
    for message in conv["messages"]:
        print(format_message(message))
    for rejected in conv.get("rejected", []):
        print(f"rejected: ({rejected['code']}) {rejected['details']}")
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
        print(f"agent: the bot is not up at {url} (start it with `rasa run`, or pass --rasa-url / set RASA_URL)",
              file=sys.stderr)
        return 1
    except asyncio.TimeoutError:
        print(f"agent: the bot at {url} did not answer within {args.timeout:g} s{check}", file=sys.stderr)
        return 1
    except (aiohttp.ClientError, ValueError) as exc:  # ValueError: a malformed --rasa-url
        print(f"agent: talking to the bot at {url} failed: {exc!r}{check}", file=sys.stderr)
        return 1
