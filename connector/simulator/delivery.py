"""Outbound webhooks to the bot: signed like Meta's, through one shared aiohttp session.

Customer messages are posted inline (the caller wants the bot's HTTP status); statuses go
through a single background worker so they reach the bot in the order they were produced.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Callable, Dict, Optional, Tuple

import aiohttp

from connector.signature import sign

from .settings import Settings
from .state import SimState, Stats

log = logging.getLogger("connector.simulator")

SIGNATURE_HEADER = "X-Hub-Signature-256"
SIGNATURE_MODES = ("valid", "invalid", "missing")


class BotUnreachable(Exception):
    """The bot's webhook could not be reached at all (connection refused, timeout)."""


def encode(body: Any) -> bytes:
    """Serialise like Meta: compact, ASCII-escaped unicode and escaped slashes. A connector that
    verifies a re-serialised body instead of the raw bytes fails on exactly these."""
    if isinstance(body, (bytes, bytearray)):
        return bytes(body)
    if isinstance(body, str):
        return body.encode("utf-8")
    return json.dumps(body, separators=(",", ":"), ensure_ascii=True).replace("/", "\\/").encode("ascii")


class WebhookDelivery:
    """Posts webhooks to `settings.bot_webhook_url`; `start()`/`close()` bracket the app's life."""

    def __init__(self, settings: Settings, state: SimState):
        self.settings = settings
        self.state = state
        self.session: Optional[aiohttp.ClientSession] = None
        self._queue: "asyncio.Queue[Tuple[int, Callable[[], Optional[Dict[str, Any]]]]]" = asyncio.Queue()
        self._worker: Optional[asyncio.Task] = None
        self._idle: Optional[asyncio.Event] = None
        self.generation = 0

    async def start(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self.settings.webhook_timeout)
        self.session = aiohttp.ClientSession(timeout=timeout, headers={"User-Agent": "facebookexternalua"})
        self._idle = asyncio.Event()
        self._idle.set()
        self._worker = asyncio.create_task(self._run_statuses(), name="sim-status-worker")

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
        if self.session is not None:
            await self.session.close()

    async def forget_pending(self) -> None:
        """On reset: statuses queued for the old run must not leak into the next test, so drop
        the queue and let a status already on the wire finish before the reset answers."""
        self.generation += 1
        while not self._queue.empty():
            self._queue.get_nowait()
        if self._idle is not None:
            try:
                await asyncio.wait_for(self._idle.wait(), self.settings.webhook_timeout)
            except asyncio.TimeoutError:
                log.warning("reset: a status webhook is still in flight")

    async def post(self, body: Any, signature: str = "valid", *, counted: bool = True) -> Tuple[int, str]:
        """POST one webhook; returns the bot's (status, body). Raises `BotUnreachable`.

        `counted=False` keeps deliberate probes (forged or malformed bodies) out of the
        `webhooks_sent` / `webhook_failures` counters, which describe real traffic only.
        """
        assert self.session is not None, "WebhookDelivery.start() was not awaited"
        # a reset mid-flight must not leak counts into the fresh stats
        stats = self.state.stats if counted else Stats()
        raw = encode(body)
        headers = {"Content-Type": "application/json"}
        if signature == "valid":
            headers[SIGNATURE_HEADER] = sign(raw, self.settings.app_secret)
        elif signature == "invalid":
            headers[SIGNATURE_HEADER] = sign(raw, self.settings.app_secret + "-wrong")
        try:
            async with self.session.post(self.settings.bot_webhook_url, data=raw, headers=headers) as resp:
                text = await resp.text()
                status = resp.status
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            stats.webhook_failures += 1
            raise BotUnreachable(f"bot webhook {self.settings.bot_webhook_url} unreachable: {exc!r}") from exc
        stats.webhooks_sent += 1
        if not 200 <= status < 300:
            stats.webhook_failures += 1
            log.warning("bot answered %s to a webhook: %s", status, text[:200])
        return status, text

    def enqueue_status(self, build: Callable[[], Optional[Dict[str, Any]]]) -> None:
        """Queue a status webhook; `build` runs just before sending so timestamps are current."""
        self._queue.put_nowait((self.generation, build))

    async def _run_statuses(self) -> None:
        assert self._idle is not None
        while True:
            generation, build = await self._queue.get()
            self._idle.clear()
            try:
                await self._deliver_status(generation, build)
            finally:
                self._idle.set()

    async def _deliver_status(self, generation: int, build: Callable[[], Optional[Dict[str, Any]]]) -> None:
        if generation != self.generation:
            return
        if self.settings.status_delay:
            await asyncio.sleep(self.settings.status_delay)
            if generation != self.generation:
                return
        stats = self.state.stats
        try:
            body = build()
            if body is None:
                return
            await self.post(body)
            stats.statuses_sent += 1
        except BotUnreachable as exc:
            log.warning("status webhook not delivered: %s", exc)
        except Exception:  # the worker must survive anything one status does
            log.exception("status webhook failed")
