"""Outbound webhooks to the bot: signed like Meta's, through one shared aiohttp session.

Customer messages are posted inline (the caller wants the bot's HTTP status); statuses go
through a single background worker so they reach the bot in the order they were produced.
A body the bot does not take (non-2xx, unreachable, timeout) is redelivered like Meta does:
the same bytes again after each of `redeliver_delays`, each body in a task of its own.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Callable, Dict, Optional, Set, Tuple

import aiohttp

from connector.signature import sign

from .settings import Settings
from .state import SimState, Stats

log = logging.getLogger("connector.simulator")

SIGNATURE_HEADER = "X-Hub-Signature-256"
SIGNATURE_MODES = ("valid", "invalid", "missing")
MAX_CONNECTIONS = 1000  # to the bot at once: bursts and redeliveries must not run out of sockets


class BotUnreachable(Exception):
    """The bot's webhook could not be reached at all (connection refused, timeout)."""


def taken(status: Optional[int]) -> bool:
    """Meta's rule: only a 2xx answer delivers a webhook; anything else (None: no answer) is retried."""
    return status is not None and 200 <= status < 300


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
        self._redeliveries: Set[asyncio.Task] = set()
        self._sleeping: Set[asyncio.Task] = set()  # redeliveries between attempts, which a reset may cancel

    @property
    def pending_redeliveries(self) -> int:
        return len(self._redeliveries)

    async def start(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self.settings.webhook_timeout)
        self.session = aiohttp.ClientSession(
            timeout=timeout, headers={"User-Agent": "facebookexternalua"},
            connector=aiohttp.TCPConnector(limit=MAX_CONNECTIONS),
        )
        self._idle = asyncio.Event()
        self._idle.set()
        self._worker = asyncio.create_task(self._run_statuses(), name="sim-status-worker")

    async def close(self) -> None:
        tasks = [t for t in (self._worker, *self._redeliveries) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.session is not None:
            await self.session.close()

    async def forget_pending(self) -> None:
        """On reset: statuses queued and redeliveries pending for the old run must not leak into
        the next test, so drop them and let a webhook already on the wire finish before the reset
        answers."""
        self.generation += 1
        while not self._queue.empty():
            self._queue.get_nowait()
        for task in self._sleeping:
            task.cancel()
        if self._idle is not None:
            try:
                await asyncio.wait_for(self._idle.wait(), self.settings.webhook_timeout)
            except asyncio.TimeoutError:
                log.warning("reset: a status webhook is still in flight")
        if self._redeliveries:
            _, late = await asyncio.wait(self._redeliveries, timeout=self.settings.webhook_timeout)
            if late:
                log.warning("reset: %d redelivered webhooks are still in flight", len(late))

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
            stats.webhooks_refused["unreachable"] += 1
            raise BotUnreachable(f"bot webhook {self.settings.bot_webhook_url} unreachable: {exc!r}") from exc
        stats.webhooks_sent += 1
        if not taken(status):
            stats.webhook_failures += 1
            stats.webhooks_refused[str(status)] += 1
            log.warning("bot answered %s to a webhook: %s", status, text[:200])
        return status, text

    def redeliver(
        self, raw: bytes, generation: int, on_attempt: Callable[[Optional[int]], None] = lambda status: None,
    ) -> bool:
        """Queue Meta-like redelivery of a body the bot did not take; False when redelivery is off or
        the body's run (`generation`) was reset meanwhile. `on_attempt(status)` hears each later
        attempt's answer (None: unreachable)."""
        delays = self.state.redeliver_delays
        if not delays or generation != self.generation:
            return False
        task = asyncio.create_task(self._redeliver(raw, delays, generation, on_attempt), name="sim-redelivery")
        self._redeliveries.add(task)
        task.add_done_callback(self._redeliveries.discard)
        return True

    async def _redeliver(
        self, raw: bytes, delays: Tuple[float, ...], generation: int, on_attempt: Callable[[Optional[int]], None],
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        for attempt, delay in enumerate(delays, start=2):
            self._sleeping.add(task)
            try:
                await asyncio.sleep(delay)
            finally:
                self._sleeping.discard(task)
            if generation != self.generation:
                return
            stats = self.state.stats  # a reset while on the wire must not count into the fresh stats
            try:
                status: Optional[int] = (await self.post(raw))[0]
            except BotUnreachable as exc:
                log.warning("redelivery %d not delivered: %s", attempt, exc)
                status = None
            stats.redeliveries += 1
            if generation != self.generation:
                return
            on_attempt(status)
            if taken(status):
                return
        log.warning("webhook given up after %d attempts", len(delays) + 1)

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
            raw = encode(body)
            try:
                status, _ = await self.post(raw)
                stats.statuses_sent += 1
            except BotUnreachable as exc:
                log.warning("status webhook not delivered: %s", exc)
                status = None
            if not taken(status):
                self.redeliver(raw, generation)
        except Exception:  # the worker must survive anything one status does
            log.exception("status webhook failed")
