"""Where the channel's "now" comes from: the system clock, or the simulator's controllable clock
so that tests and demos can let 30 hours pass in a second."""

import logging
import time
from typing import Optional

import aiohttp

logger = logging.getLogger(__name__)


class SystemClock:
    async def now(self) -> float:
        return time.time()


class SimulatorClock:
    def __init__(self, url: str) -> None:
        self._url = url.rstrip("/") + "/_sim/clock"
        self._session: Optional[aiohttp.ClientSession] = None

    async def now(self) -> float:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        try:
            async with self._session.get(self._url) as response:
                response.raise_for_status()
                return float((await response.json())["now_float"])
        except (aiohttp.ClientError, OSError, ValueError, KeyError) as error:
            logger.warning("Simulator clock at %s unreadable (%s); using the system clock", self._url, error)
            return time.time()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
