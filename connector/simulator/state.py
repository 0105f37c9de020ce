"""What the simulator remembers: conversations, the controllable clock, counters, queued faults.

All of it lives on one event loop, so no locks; waiters are woken whenever a conversation
changes so tests can wait for a condition instead of sleeping.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, List, Optional, Set, Tuple

from .payloads import new_wamid
from .settings import Settings

log = logging.getLogger("connector.simulator")

WINDOW_SECONDS = 24 * 60 * 60


class Clock:
    """Real time plus an offset, so tests can jump past the 24-hour window without waiting."""

    def __init__(self, time_fn: Callable[[], float] = time.time):
        self._time_fn = time_fn
        self.offset = 0.0

    def now(self) -> float:
        return self._time_fn() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += float(seconds)

    def set(self, unix_ts: float) -> None:
        self.offset = float(unix_ts) - self._time_fn()

    def reset(self) -> None:
        self.offset = 0.0

    def to_json(self) -> Dict[str, Any]:
        return {"now": int(self.now()), "now_float": self.now(), "offset": self.offset}


@dataclass
class Record:
    """One message of a conversation, inbound (played customer) or outbound (sent by the bot)."""

    direction: str
    wamid: str
    timestamp: int
    type: str
    payload: Dict[str, Any]
    phone_number_id: str  # the business number: the one written to (inbound) or sending (outbound)
    text: str = ""
    status: Optional[str] = None
    errors: List[Dict[str, Any]] = field(default_factory=list)
    webhook_status: Optional[int] = None  # the bot's answer to the latest attempt; None: unreachable
    delivery_attempts: int = 0
    statuses: List[str] = field(default_factory=list)
    read_at: Optional[int] = None
    read_by_phone_number_id: Optional[str] = None
    typing_indicator: bool = False

    def to_json(self) -> Dict[str, Any]:
        out = {
            "direction": self.direction,
            "wamid": self.wamid,
            "timestamp": self.timestamp,
            "type": self.type,
            "text": self.text,
            "payload": self.payload,
            "status": self.status,
            "errors": self.errors,
        }
        if self.direction == "in":
            out["to_phone_number_id"] = self.phone_number_id
            out["webhook_status"] = self.webhook_status
            out["delivery_attempts"] = self.delivery_attempts
            out["read_at"] = self.read_at
            out["read_by_phone_number_id"] = self.read_by_phone_number_id
            out["typing_indicator"] = self.typing_indicator
        else:
            out["from_phone_number_id"] = self.phone_number_id
            out["statuses"] = list(self.statuses)
        return out


@dataclass
class Conversation:
    """One customer: identity, care-window anchor and the messages both ways."""

    wa_id: str
    user_id: Optional[str] = None
    name: Optional[str] = None
    last_inbound_at: Optional[int] = None
    messages: List[Record] = field(default_factory=list)
    rejected: List[Dict[str, Any]] = field(default_factory=list)

    @property
    def outbound(self) -> List[Record]:
        return [m for m in self.messages if m.direction == "out"]

    def window_open(self, now: float) -> bool:
        """Meta's rule: free-form replies only within 24 h of the customer's last message."""
        return self.last_inbound_at is not None and now - self.last_inbound_at < WINDOW_SECONDS

    def to_json(self, now: float) -> Dict[str, Any]:
        return {
            "wa_id": self.wa_id,
            "user_id": self.user_id,
            "name": self.name,
            "last_inbound_at": self.last_inbound_at,
            "window_open": self.window_open(now),
            "window_closes_at": None if self.last_inbound_at is None else self.last_inbound_at + WINDOW_SECONDS,
            "messages": [m.to_json() for m in self.messages],
            "rejected": list(self.rejected),
        }


@dataclass
class Stats:
    """Counters tests assert on (e.g. `window_violations == 0` after a whole conversation)."""

    accepted: int = 0
    rejected: Counter = field(default_factory=Counter)
    window_violations: int = 0
    webhooks_sent: int = 0
    webhook_failures: int = 0
    redeliveries: int = 0
    webhooks_refused: Counter = field(default_factory=Counter)  # "503" / "unreachable" → attempts
    inbound_messages: int = 0
    statuses_sent: int = 0
    marked_read: int = 0
    faults_served: int = 0
    template_list_reads: int = 0  # `GET /{waba_id}/message_templates` pages answered 200
    template_list_faults: int = 0  # faults of the template-list queue served
    template_webhooks: int = 0  # business-account template webhooks (status, category, quality) produced

    def to_json(self) -> Dict[str, Any]:
        return {
            "accepted": self.accepted,
            "rejected": {str(code): n for code, n in sorted(self.rejected.items())},
            "window_violations": self.window_violations,
            "webhooks_sent": self.webhooks_sent,
            "webhook_failures": self.webhook_failures,
            "redeliveries": self.redeliveries,
            "webhooks_refused": dict(sorted(self.webhooks_refused.items())),
            "inbound_messages": self.inbound_messages,
            "statuses_sent": self.statuses_sent,
            "marked_read": self.marked_read,
            "faults_served": self.faults_served,
            "template_list_reads": self.template_list_reads,
            "template_list_faults": self.template_list_faults,
            "template_webhooks": self.template_webhooks,
        }


class SimState:
    """The simulator's memory; `reset()` returns it to a fresh start between tests."""

    def __init__(self, settings: Settings, clock: Optional[Clock] = None):
        self.settings = settings
        self.clock = clock or Clock()
        self.conversations: Dict[str, Conversation] = {}
        self.by_wamid: Dict[str, Tuple[Conversation, Record]] = {}
        self.stats = Stats()
        self.faults: Deque[Dict[str, Any]] = deque()
        self.template_faults: Deque[Dict[str, Any]] = deque()  # for the template list only
        self.media: Dict[str, Tuple[bytes, str]] = {}
        self.window_errors = settings.window_errors
        self.statuses: Tuple[str, ...] = settings.statuses
        self.redeliver_delays: Tuple[float, ...] = settings.redeliver_delays
        self.burst_serial = 0  # numbers burst customers, so each burst plays new ones
        self.resets = 0  # how many times `reset()` ran, so a listener can tell a reset from other changes
        self._listeners: List[Callable[[], None]] = []
        self._waiters: Set[asyncio.Future] = set()
        self.version = 0
        """Counts changes, so a page can wait for the next one (`/_sim/events`)."""

    def reset(self) -> None:
        self.clock.reset()
        self.conversations.clear()
        self.by_wamid.clear()
        self.stats = Stats()
        self.faults.clear()
        self.template_faults.clear()
        self.media.clear()
        self.window_errors = self.settings.window_errors
        self.statuses = self.settings.statuses
        self.redeliver_delays = self.settings.redeliver_delays
        self.burst_serial = 0
        self.resets += 1
        self.changed()

    def now(self) -> int:
        return int(self.clock.now())

    # --- conversations -------------------------------------------------------------------

    def conversation(self, wa_id: str) -> Conversation:
        conv = self.conversations.get(wa_id)
        if conv is None:
            conv = self.conversations[wa_id] = Conversation(wa_id=wa_id)
        return conv

    def resolve(self, recipient: str) -> Conversation:
        """The conversation a send addresses: by phone number / key first, then by user id."""
        if recipient in self.conversations:
            return self.conversations[recipient]
        for conv in self.conversations.values():
            if conv.user_id and conv.user_id == recipient:
                return conv
        return self.conversation(recipient)

    def new_wamid(self, wa_id: str, outbound: bool) -> str:
        while True:
            wamid = new_wamid(wa_id, outbound)
            if wamid not in self.by_wamid:
                return wamid

    def new_customer_wa_id(self) -> str:
        """A wa_id no conversation has yet, shaped like a German mobile number: "4917" and a serial."""
        while True:
            self.burst_serial += 1
            wa_id = f"4917{self.burst_serial:09d}"
            if wa_id not in self.conversations:
                return wa_id

    def add(self, conv: Conversation, record: Record) -> None:
        conv.messages.append(record)
        self.by_wamid[record.wamid] = (conv, record)
        self.changed()

    def remove(self, conv: Conversation, record: Record) -> None:
        """Undo `add` (the bot never got the message, so it must not count as delivered)."""
        if record in conv.messages:
            conv.messages.remove(record)
        self.by_wamid.pop(record.wamid, None)
        self.changed()

    def find(self, wamid: str) -> Optional[Tuple[Conversation, Record]]:
        return self.by_wamid.get(wamid)

    # --- waiting -------------------------------------------------------------------------

    def changed(self) -> None:
        """Wake every waiter; each re-checks its own condition."""
        self.version += 1
        for fut in self._waiters:
            if not fut.done():
                fut.set_result(None)
        self._waiters.clear()
        for listener in list(self._listeners):
            try:
                listener()
            except Exception:  # a listener must never break the request that changed something
                log.exception("state listener %r failed", listener)

    def subscribe(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call `listener()` after every `changed()` (on the loop: it must be quick, e.g. set a flag
        and schedule work); returns the function that unsubscribes it."""
        self._listeners.append(listener)

        def unsubscribe() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return unsubscribe

    async def wait_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate():
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            fut = loop.create_future()
            self._waiters.add(fut)
            try:
                await asyncio.wait_for(fut, remaining)
            except asyncio.TimeoutError:
                return predicate()
            finally:
                self._waiters.discard(fut)
        return True
