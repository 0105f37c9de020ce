"""Background work per customer, in arrival order, with every task kept and drained on shutdown.

The webhook answers Meta at once (a slow answer makes Meta redeliver); the turns then run here,
one customer's messages strictly in order, different customers concurrently.
"""

import asyncio
import logging
from collections import deque
from typing import Awaitable, Callable, Deque, Dict, Set

logger = logging.getLogger(__name__)

Job = Callable[[], Awaitable[None]]


class PerSenderQueue:
    def __init__(self) -> None:
        self._pending: Dict[str, Deque[Job]] = {}
        self._workers: Set["asyncio.Task[None]"] = set()

    def submit(self, sender_id: str, job: Job) -> None:
        queue = self._pending.get(sender_id)
        if queue is not None:
            queue.append(job)
            return
        self._pending[sender_id] = deque([job])
        worker = asyncio.get_running_loop().create_task(self._work(sender_id))
        self._workers.add(worker)
        worker.add_done_callback(self._workers.discard)

    async def drain(self) -> None:
        """Wait until every submitted job has run (server shutdown)."""
        while self._workers:
            await asyncio.gather(*list(self._workers), return_exceptions=True)

    async def cancel(self) -> None:
        """Stop every job now (shutdown past its deadline)."""
        for worker in list(self._workers):
            worker.cancel()
        await asyncio.gather(*list(self._workers), return_exceptions=True)

    @property
    def busy(self) -> int:
        return len(self._workers)

    async def _work(self, sender_id: str) -> None:
        queue = self._pending[sender_id]
        try:
            while queue:
                job = queue[0]
                try:
                    await job()
                except Exception:
                    logger.exception("A background WhatsApp job failed")
                finally:
                    queue.popleft()
        finally:
            del self._pending[sender_id]
