"""Process each webhook item once, although Meta delivers at least once.

Meta retries a webhook it thinks failed (for up to 7 days), and a slow 200 or a restart makes
that happen in practice: without this the customer gets answered twice. Ids are remembered in
a bounded in-process LRU and, with a Redis URL, across every `rasa run` instance with
`SET key 1 NX EX ttl`. Redis being down never drops a message: the LRU's answer stands.
"""

import asyncio
import logging
import time
from collections import OrderedDict
from typing import Any, Callable, Optional, Union

from redis.exceptions import RedisError

from connector.payloads import CallEvent, InboundMessage, StatusUpdate, SystemChange, UserPreference

logger = logging.getLogger(__name__)

DEFAULT_CAPACITY = 10_000
DEFAULT_TTL_SECONDS = 8 * 24 * 3600  # longer than Meta's 7 days of retries
DEFAULT_PREFIX = "whatsapp:dedup:"
REDIS_TIMEOUT_SECONDS = 1.0
REDIS_RETRY_AFTER_SECONDS = 10.0

Item = Union[InboundMessage, StatusUpdate, SystemChange, CallEvent, UserPreference]


def dedup_key(item: Item) -> str:
    """The identity of one webhook item. Statuses repeat per wamid (sent, delivered, read),
    so they are keyed by (wamid, status); call events by (call id, event, status)."""
    if isinstance(item, (InboundMessage, SystemChange)):
        return f"message:{item.wamid}"
    if isinstance(item, StatusUpdate):
        return f"status:{item.wamid}:{item.status}"
    if isinstance(item, CallEvent):
        return f"call:{item.call_id}:{item.event}:{item.status or ''}"
    if isinstance(item, UserPreference):
        return f"preference:{item.sender_id}:{item.category}:{item.value}:{item.timestamp}"
    raise TypeError(f"no dedup key for {type(item).__name__}")


class Deduplicator:
    """`await first_time(key)` is True once per key; every later call (in this process, or in
    any process sharing the Redis) is False."""

    def __init__(
        self,
        redis_url: Optional[str] = None,
        *,
        capacity: int = DEFAULT_CAPACITY,
        ttl_seconds: int = DEFAULT_TTL_SECONDS,
        prefix: str = DEFAULT_PREFIX,
        retry_after_seconds: float = REDIS_RETRY_AFTER_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if capacity < 1 or ttl_seconds < 1:
            raise ValueError("dedup capacity and ttl_seconds must be positive")
        self.capacity = capacity
        self.ttl_seconds = ttl_seconds
        self.prefix = prefix
        self._seen: "OrderedDict[str, None]" = OrderedDict()
        self._redis: Any = None
        if redis_url:
            import redis.asyncio

            self._redis = redis.asyncio.from_url(
                redis_url,
                socket_connect_timeout=REDIS_TIMEOUT_SECONDS,
                socket_timeout=REDIS_TIMEOUT_SECONDS,
            )
        self._retry_after = retry_after_seconds
        self._clock = clock
        self._redis_down_since: Optional[float] = None

    async def first_time(self, key: str) -> bool:
        if key in self._seen:
            self._seen.move_to_end(key)
            return False
        # Remember before awaiting Redis, so a concurrent duplicate in this process is caught.
        self._seen[key] = None
        if len(self._seen) > self.capacity:
            self._seen.popitem(last=False)
        if self._redis is None or self._redis_resting():
            return True
        try:
            created = await self._redis.set(self.prefix + key, 1, nx=True, ex=self.ttl_seconds)
        except (RedisError, OSError, asyncio.TimeoutError) as problem:
            if self._redis_down_since is None:
                logger.warning(
                    "Dedup Redis unreachable (%s); using this process's memory only, retrying in %ss",
                    problem, self._retry_after,
                )
            self._redis_down_since = self._clock()
            return True
        if self._redis_down_since is not None:
            logger.info("Dedup Redis reachable again")
            self._redis_down_since = None
        return bool(created)

    def _redis_resting(self) -> bool:
        """After a failure, skip Redis for a while: each try can cost the timeout, and Meta
        wants its 200 fast."""
        return self._redis_down_since is not None and self._clock() - self._redis_down_since < self._retry_after

    async def close(self) -> None:
        if self._redis is not None:
            redis, self._redis = self._redis, None
            try:
                await redis.close()
            except (RedisError, OSError) as problem:
                logger.debug("Closing the dedup Redis client: %s", problem)
