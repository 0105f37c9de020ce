"""How long the event loop was blocked: a task sleeps `tick` seconds in a loop, and whatever it
oversleeps is a stall (a blocking call, a full garbage collection, a CPU-bound stretch of a turn).
Everything on Rasa's loop waits out a stall, the webhook's 200 included, so the longest one is
worth a number: `whatsapp_event_loop_stall_seconds_max` and `/webhooks/whatsapp/intake`'s
`longest_loop_stall_ms` (`?stall_since=<epoch seconds>` for the longest since a moment)."""

import asyncio
import bisect
import time
from collections import deque
from typing import Deque, Optional, Tuple

KEPT = 4096
"""Stalls remembered for `longest_since`; older ones only count in the all-time maximum."""


class LoopWatch:
    def __init__(self, tick: float = 0.01, threshold: float = 0.005) -> None:
        """Oversleeping by less than `threshold` is scheduling noise, not a stall."""
        self.tick = tick
        self.threshold = threshold
        self.longest = 0.0
        self._stalls: Deque[Tuple[float, float]] = deque(maxlen=KEPT)
        """(wall time the stall ended, seconds), oldest first."""
        self._task: Optional["asyncio.Task[None]"] = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._watch())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def longest_since(self, since: Optional[float] = None) -> float:
        """Seconds of the longest stall that ended at or after `since` (wall time); all-time without it."""
        if since is None:
            return self.longest
        stalls = list(self._stalls)
        start = bisect.bisect_left(stalls, (since, 0.0))
        return max((seconds for _, seconds in stalls[start:]), default=0.0)

    def record(self, seconds: float, ended_at: float) -> None:
        if seconds < self.threshold:
            return
        self.longest = max(self.longest, seconds)
        self._stalls.append((ended_at, seconds))

    async def _watch(self) -> None:
        while True:
            before = time.perf_counter()
            await asyncio.sleep(self.tick)
            self.record(time.perf_counter() - before - self.tick, time.time())
