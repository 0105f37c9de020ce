"""Where the channel's "now" comes from: the system clock, or the simulator's controllable clock
so that tests and demos can let 30 hours pass in a second.

Time travel moves "now" for the simulator and the channel together; Rasa's reminders run on the
real clock (APScheduler), so when the simulator's clock jumps, `SimulatorClock.follow` moves every
pending reminder by the same amount: a reminder due in the skipped interval fires at once, and one
due later keeps its distance to the new "now". Production uses `SystemClock`, which costs nothing.
"""

import asyncio
import logging
import time
from datetime import datetime, timedelta, timezone
from typing import Any, Awaitable, Callable, Optional

import aiohttp

logger = logging.getLogger(__name__)

FOLLOW_INTERVAL_SECONDS = 0.5


class SystemClock:
    async def now(self) -> float:
        return time.time()


async def rasa_scheduler() -> Any:
    from rasa.core import jobs

    return await jobs.scheduler()


def shift_reminders(scheduler: Any, seconds: float) -> int:
    """Moves every pending one-off job (Rasa's reminders) `seconds` earlier, never into the past."""
    from apscheduler.triggers.date import DateTrigger

    moved = 0
    real_now = datetime.now(timezone.utc)
    for job in scheduler.get_jobs():
        if not isinstance(job.trigger, DateTrigger) or job.next_run_time is None:
            continue
        due = max(job.next_run_time - timedelta(seconds=seconds), real_now)
        job.modify(next_run_time=due)
        moved += 1
    return moved


class SimulatorClock:
    def __init__(self, url: str, scheduler: Callable[[], Awaitable[Any]] = rasa_scheduler) -> None:
        self._url = url.rstrip("/") + "/_sim/clock"
        self._session: Optional[aiohttp.ClientSession] = None
        self._scheduler = scheduler
        self._offset: Optional[float] = None
        """The simulator's offset from real time as last seen; None until first read."""
        self._unreadable = False

    async def now(self) -> float:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        try:
            async with self._session.get(self._url) as response:
                response.raise_for_status()
                clock = await response.json()
                now, offset = float(clock["now_float"]), float(clock["offset"])
        except (aiohttp.ClientError, OSError, ValueError, KeyError) as error:
            if not self._unreadable:  # once per outage: `follow` asks twice a second
                logger.warning("Simulator clock at %s unreadable (%s); using the system clock", self._url, error)
            self._unreadable = True
            return time.time()
        self._unreadable = False
        await self._observe(offset)
        return now

    async def _observe(self, offset: float) -> None:
        if self._offset is None or offset == self._offset:
            self._offset = offset
            return
        jump, self._offset = offset - self._offset, offset
        moved = shift_reminders(await self._scheduler(), jump)
        logger.info("Simulator clock moved %+.0f s: %d pending reminder(s) moved with it", jump, moved)

    async def follow(self) -> None:
        """Reads the simulator's clock every half second so that reminders follow its jumps even
        while no message is handled. Runs until cancelled."""
        while True:
            await self.now()
            await asyncio.sleep(FOLLOW_INTERVAL_SECONDS)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
