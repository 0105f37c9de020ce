"""Client-side pacing of outbound messages, so Meta's rate limits are met before they are hit.

Two limits are kept, both as token buckets (GCRA, "virtual scheduling": one timestamp per bucket):

- **Per business phone number**: `messages_per_second` (Meta's default throughput is 80/s, 20/s
  for numbers shared with the WhatsApp Business app, up to 1,000/s after Meta's upgrade), with a
  burst of one second's worth. Exceeding it at Meta gives 130429.
- **Per customer** (phone number × recipient): Meta's pair rate limit is roughly one message every
  6 s sustained, with bursts allowed (reported as up to 45 in 6 s, "borrowed" from later; error
  131056). A bucket of `customer_burst` messages (default 30, a margin under 45) refilled one per
  `customer_interval` seconds (default 6) mirrors that: a normal turn of 3–4 messages, or several
  quick turns in a row, goes out at once; only a bot that keeps talking faster than one message
  per 6 s for minutes is slowed down, which is exactly when Meta would start refusing.
  `customer_min_gap` (default 0) additionally spaces two messages to the same customer.

Slots are reserved before waiting, so concurrent senders queue in order. No single message waits
longer than `max_wait` seconds (default 10): past that it goes out anyway and Meta's answer (a
retried 131056) decides; this keeps a turn inside Rasa's 60 s conversation lock.

Pure timing logic: the clock and the sleep are injectable, so it is tested without sleeping. The
state lives in one process; several Rasa processes sharing a number each pace on their own.
"""

import asyncio
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Dict, Optional, Tuple

DEFAULT_MESSAGES_PER_SECOND = 80.0
DEFAULT_CUSTOMER_BURST = 30
DEFAULT_CUSTOMER_INTERVAL = 6.0
DEFAULT_CUSTOMER_MIN_GAP = 0.0
DEFAULT_MAX_WAIT = 10.0

_PRUNE_EVERY = 1024


class Gcra:
    """A token bucket of `burst` tokens refilled every `interval` seconds, as one timestamp (TAT,
    the theoretical arrival time). `schedule` books the earliest slot at or after `at`."""

    __slots__ = ("interval", "tolerance", "tat")

    def __init__(self, interval: float, burst: int) -> None:
        if interval < 0 or burst < 1:
            raise ValueError("interval must be >= 0 and burst >= 1")
        self.interval = interval
        self.tolerance = (burst - 1) * interval
        self.tat = float("-inf")

    def earliest(self, at: float) -> float:
        return max(at, self.tat - self.tolerance)

    def book(self, slot: float) -> None:
        self.tat = max(self.tat, slot) + self.interval

    def idle(self, now: float) -> bool:
        """Full again: forgetting this bucket changes nothing."""
        return self.tat <= now


@dataclass
class _Customer:
    bucket: Optional[Gcra]
    last: float = float("-inf")


class Pacer:
    """Decides when each outbound message may go; `wait()` sleeps until then."""

    def __init__(
        self,
        messages_per_second: Optional[float] = DEFAULT_MESSAGES_PER_SECOND,
        customer_burst: int = DEFAULT_CUSTOMER_BURST,
        customer_interval: float = DEFAULT_CUSTOMER_INTERVAL,
        customer_min_gap: float = DEFAULT_CUSTOMER_MIN_GAP,
        max_wait: float = DEFAULT_MAX_WAIT,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        """`messages_per_second` None or 0 disables the per-number limit; `customer_interval` 0
        disables the per-customer bucket (the minimum gap still applies)."""
        if messages_per_second is not None and messages_per_second < 0:
            raise ValueError("messages_per_second must be >= 0")
        if customer_burst < 1 or customer_interval < 0 or customer_min_gap < 0 or max_wait < 0:
            raise ValueError("customer_burst must be >= 1; intervals, gaps and max_wait >= 0")
        self.messages_per_second = messages_per_second or 0.0
        self.customer_burst = customer_burst
        self.customer_interval = customer_interval
        self.customer_min_gap = customer_min_gap
        self.max_wait = max_wait
        self._clock = clock
        self._sleep = sleep
        self._numbers: Dict[str, Gcra] = {}
        self._customers: Dict[Tuple[str, str], _Customer] = {}
        self._reservations = 0

    @classmethod
    def disabled(cls, **kwargs: object) -> "Pacer":
        """Never waits (tests, or a deployment that paces elsewhere)."""
        return cls(messages_per_second=0, customer_interval=0, customer_min_gap=0, **kwargs)  # type: ignore[arg-type]

    @property
    def paces(self) -> bool:
        """Whether any limit is on: a pacer without one never waits and keeps nothing."""
        return bool(self.messages_per_second or self.customer_interval or self.customer_min_gap)

    def reserve(self, phone_number_id: str, recipient: str) -> float:
        """Book the next slot for one message and return how many seconds to wait for it."""
        if not self.paces:
            return 0.0
        now = self._clock()
        customer = self._customers.get((phone_number_id, recipient))
        if customer is None:
            bucket = Gcra(self.customer_interval, self.customer_burst) if self.customer_interval > 0 else None
            customer = self._customers[(phone_number_id, recipient)] = _Customer(bucket)
        slot = max(now, customer.last + self.customer_min_gap)
        if customer.bucket is not None:
            slot = customer.bucket.earliest(slot)
        number = self._number(phone_number_id)
        if number is not None:
            # Booked at arrival, not at the customer's (possibly later) slot: one slow customer
            # must not push back every other customer's messages.
            number_slot = number.earliest(now)
            number.book(number_slot)
            slot = max(slot, number_slot)
        slot = min(slot, now + self.max_wait)
        if customer.bucket is not None:
            customer.bucket.book(slot)
        customer.last = max(customer.last, slot)
        self._reservations += 1
        if self._reservations % _PRUNE_EVERY == 0:
            self._prune(now)
        delay = slot - now
        return delay if delay > 1e-6 else 0.0

    async def wait(self, phone_number_id: str, recipient: str) -> float:
        delay = self.reserve(phone_number_id, recipient)
        if delay > 0:
            await self._sleep(delay)
        return delay

    def tracked_customers(self) -> int:
        return len(self._customers)

    def _number(self, phone_number_id: str) -> Optional[Gcra]:
        if not self.messages_per_second:
            return None
        bucket = self._numbers.get(phone_number_id)
        if bucket is None:
            burst = max(1, int(self.messages_per_second))
            bucket = self._numbers[phone_number_id] = Gcra(1.0 / self.messages_per_second, burst)
        return bucket

    def _prune(self, now: float) -> None:
        """Forget customers whose bucket is full again and whose gap has passed."""
        for key in [
            key for key, c in self._customers.items()
            if (c.bucket is None or c.bucket.idle(now)) and c.last + self.customer_min_gap <= now
        ]:
            del self._customers[key]
