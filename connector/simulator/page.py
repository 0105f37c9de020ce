"""The simulator's web page: the customer's phone, the operator's view of the care window, time
travel and an agent desk, as plain files in `page/` served at `/`.

The page reads the simulator (`/_sim/...`) and the bot. The bot's routes take tokens the browser
should not hold, so `/_sim/bot/...` forwards to the bot's conversation view and agent API with them
added (`RASA_AUTH_TOKEN`, `WHATSAPP_AGENT_TOKEN`, as `scripts/run.sh` exports them): the page
drives the real agent API, on the loopback address the simulator listens on. `/_sim/events` tells
the page when anything changed (server-sent events), so it never polls the simulator.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import aiohttp
from aiohttp import web

from .core import SIM

PAGE = Path(__file__).with_name("page")
BOT_SESSION = web.AppKey("bot_session", aiohttp.ClientSession)
STREAMS = web.AppKey("event_streams", set)
KEEPALIVE_SECONDS = 15.0
# What the page may reach on the bot, and the env var holding each one's token.
BOT_ROUTES = {"conversations": "RASA_AUTH_TOKEN", "agent": "WHATSAPP_AGENT_TOKEN"}


def bot_base_url(webhook_url: str) -> str:
    """`http://host:5005/webhooks/whatsapp` from the bot's webhook URL."""
    parts = urlsplit(webhook_url)
    path = parts.path.rsplit("/webhook", 1)[0] if parts.path.endswith("/webhook") else parts.path
    return urlunsplit((parts.scheme, parts.netloc, path.rstrip("/"), "", ""))


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(PAGE / "index.html", headers={"Cache-Control": "no-cache"})


async def events(request: web.Request) -> web.StreamResponse:
    """`data: <version>` whenever the simulator's state changes (a comment every 15 s keeps
    proxies from closing the stream)."""
    state = request.app[SIM].state
    stream = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await stream.prepare(request)
    seen = -1
    request.app[STREAMS].add(asyncio.current_task())
    try:
        while True:
            if state.version != seen:
                seen = state.version
                await stream.write(f"data: {seen}\n\n".encode())
            elif not await state.wait_until(lambda: state.version != seen, KEEPALIVE_SECONDS):
                await stream.write(b": keepalive\n\n")
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        request.app[STREAMS].discard(asyncio.current_task())
    return stream


async def to_bot(request: web.Request) -> web.Response:
    """Forwards to the bot's `conversations/...` or `agent/...` route with its token."""
    tail = request.match_info["tail"]
    route = tail.split("/", 1)[0]
    if route not in BOT_ROUTES:
        return web.json_response({"error": f"the page reaches only {', '.join(BOT_ROUTES)} on the bot"}, status=404)
    token = os.environ.get(BOT_ROUTES[route], "")
    if not token:
        return web.json_response({"error": f"the simulator was started without {BOT_ROUTES[route]}, "
                                           "so it cannot reach the bot's " + route + " routes"}, status=503)
    url = f"{bot_base_url(request.app[SIM].settings.bot_webhook_url)}/{tail}"
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    body = await request.read() if request.method == "POST" else None
    try:
        async with request.app[BOT_SESSION].request(request.method, url, data=body, headers=headers,
                                                    params=request.query) as answer:
            return web.Response(body=await answer.read(), status=answer.status,
                                content_type=answer.content_type or "application/json")
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as error:
        return web.json_response({"error": f"the bot is not up yet ({url}: {type(error).__name__})"}, status=502)


def add_routes(app: web.Application) -> None:
    async def bot_session(app: web.Application) -> AsyncIterator[None]:
        app[BOT_SESSION] = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=35))
        yield
        await app[BOT_SESSION].close()

    async def close_streams(app: web.Application) -> None:  # an open page must not hold up Ctrl-C
        for task in list(app[STREAMS]):
            task.cancel()

    app[STREAMS] = set()
    app.cleanup_ctx.append(bot_session)
    app.on_shutdown.append(close_streams)
    app.router.add_get("/", index)
    app.router.add_static("/page/", PAGE)
    app.router.add_get("/_sim/events", events)
    app.router.add_route("GET", "/_sim/bot/{tail:.+}", to_bot)
    app.router.add_route("POST", "/_sim/bot/{tail:.+}", to_bot)
