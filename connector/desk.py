"""Handoff events for the desk (the human agents' tool), delivered from the shared state.

An event is stored before anything depends on it and deleted only once the desk answered 2xx,
so a desk that is down loses nothing: each customer's events wait, in order, behind the oldest,
which is retried with backoff by whichever instance holds its lease. Bodies are signed like
Meta signs its webhooks (`signature.sign`): `X-Signature-256: sha256=<HMAC-SHA256 of the body, key agent_token>`.
"""

import asyncio
import logging
import time
import uuid
from typing import Any, Awaitable, Callable, Dict, Optional, Set

import aiohttp

from connector.care_state import CareState, DeskEvent
from connector.care_state.records import dump_json
from connector.decisions import masked
from connector.signature import sign

logger = logging.getLogger(__name__)

LEASE_SECONDS = 30.0
MAX_BACKOFF_SECONDS = 60.0
REFUSED = (400, 413, 422)
"""The desk says this event itself is wrong: it is dropped (logged). Anything else (a desk being
deployed, a wrong key) is retried."""


class Desk:
    def __init__(self, url: str, key: str, state: Callable[[], CareState], now: Callable[[], Awaitable[float]],
                 backlog_limit: int, timeout: float = 10.0, idle_seconds: float = 1.0) -> None:
        self.url = url
        self.key = key
        self.state = state
        self.now = now
        self.backlog_limit = backlog_limit
        self.timeout = timeout
        self.idle_seconds = idle_seconds
        self.owner = ""
        self._wake = asyncio.Event()
        self._task: Optional["asyncio.Task[None]"] = None
        self._session: Optional[aiohttp.ClientSession] = None
        self._full: Set[str] = set()

    @property
    def enabled(self) -> bool:
        return bool(self.url)

    async def emit(self, sender_id: str, event: str, event_id: Optional[str] = None, **fields: Any) -> None:
        """Store one event for the desk (raises if the state cannot take it: the caller's work
        is then retried, and a stable `event_id` keeps the retry from storing it twice)."""
        if not self.enabled:
            return
        event_id = event_id or f"{event}:{uuid.uuid4().hex}"
        body: Dict[str, Any] = {"id": event_id, "event": event, "sender_id": sender_id, "at": await self.now(), **fields}
        record = DeskEvent(event_id, sender_id, body, time.time())
        if await self.state().add_desk_event(record, self.backlog_limit):
            self._full.discard(sender_id)
            self._wake.set()
        elif sender_id not in self._full:  # logged once per backlog that fills up
            if len(self._full) > 10_000:
                self._full.clear()
            self._full.add(sender_id)
            logger.error("Desk events for %s are dropped: %d are waiting for the desk at %s already "
                         "(desk_backlog_limit)", masked(sender_id), self.backlog_limit, self.url)

    def start(self, owner: str) -> None:
        if self.enabled and self._task is None:
            self.owner = owner
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _run(self) -> None:
        while True:
            try:
                now = time.time()
                events = await self.state().claim_desk_events(self.owner, now, now + LEASE_SECONDS, 50)
            except Exception as error:
                logger.error("Desk events unreadable: %s: %s", type(error).__name__, error)
                events = []
            if events and all(await asyncio.gather(*(self._deliver(event) for event in events))):
                continue  # each customer's next event is due now
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self.idle_seconds)
            except asyncio.TimeoutError:
                pass

    async def _deliver(self, event: DeskEvent) -> bool:
        """False if the state could not be told (the event's lease runs out; not again at once)."""
        body = dump_json(event.body).encode()
        headers = {"Content-Type": "application/json", "X-Signature-256": sign(body, self.key)}
        try:
            async with self._session.post(self.url, data=body, headers=headers) as answer:
                status = answer.status
                problem = f"the desk answered {status}"
        except (aiohttp.ClientError, asyncio.TimeoutError) as error:
            status, problem = 0, f"the desk could not be reached ({type(error).__name__})"
        state = self.state()
        try:
            if 200 <= status < 300 or status in REFUSED:
                if status in REFUSED:  # the desk cannot take this event: waiting would hold up the rest
                    logger.error("Desk refused %s event %s for %s with %d: dropped", event.body.get("event"),
                                 event.event_id, masked(event.sender_id), status)
                await state.desk_event_delivered(event.event_id)
                return True
            attempts = event.attempts + 1
            delay = min(MAX_BACKOFF_SECONDS, 2.0 ** (attempts - 1))
            logger.warning("Desk event %s for %s not delivered (attempt %d, again in %.0f s): %s",
                           event.event_id, masked(event.sender_id), attempts, delay, problem)
            await state.desk_event_failed(event.event_id, attempts, problem, time.time() + delay)
            return True
        except Exception as error:
            logger.error("Desk event %s: the state could not be updated: %s", event.event_id, error)
            return False
