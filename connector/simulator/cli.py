"""Command line: `serve` runs the simulator; `say` and `show` play a customer against a running one.

Every serve flag defaults from the same env vars the connector reads, so one `.env` drives both.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import aiohttp

from .settings import (
    DEFAULT_BOT_WEBHOOK, DEFAULT_PORT, DEFAULT_TEMPLATES, Settings, SettingsError, comma_list, env_default,
    parse_delays, parse_statuses,
)

COMMANDS = ("serve", "say", "show")
ENV_HINTS = {
    "access_token": "--access-token or WHATSAPP_ACCESS_TOKEN",
    "phone_number_id": "--phone-number-id or WHATSAPP_PHONE_NUMBER_ID",
    "app_secret": "--app-secret or WHATSAPP_APP_SECRET",
}


def default_sim_url() -> str:
    return env_default("SIM_URL") or f"http://127.0.0.1:{env_default('SIM_PORT', str(DEFAULT_PORT))}"


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
