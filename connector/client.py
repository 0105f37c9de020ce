"""The one Cloud API client: owns the aiohttp session, timeouts and retries.

Retries are bounded so that a turn's sending stays well inside Rasa's 60 s ticket lock.
"""

import asyncio
import logging
import random
from typing import Any, Awaitable, Callable, Dict, Mapping, Optional

import aiohttp

from connector.config import ChannelConfig
from connector.errors import GraphError, TransientError

logger = logging.getLogger(__name__)


class CloudApiClient:
    def __init__(
        self,
        config: ChannelConfig,
        max_attempts: int = 3,
        backoff_seconds: float = 0.5,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._config = config
        self._max_attempts = max_attempts
        self._backoff_seconds = backoff_seconds
        self._sleep = sleep
        self._session: Optional[aiohttp.ClientSession] = None

    async def send_message(self, to: str, message: Mapping[str, Any]) -> str:
        """Send one message object (`type` plus its body) to a customer; returns its wamid."""
        payload = {"messaging_product": "whatsapp", "recipient_type": "individual", "to": to, **message}
        answer = await self._post(self._config.messages_url, payload)
        try:
            return str(answer["messages"][0]["id"])
        except (KeyError, IndexError, TypeError):
            raise GraphError(None, f"send answer without a message id: {str(answer)[:200]}") from None

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None

    def _get_session(self) -> aiohttp.ClientSession:
        """Created on first use so that it belongs to the loop that runs the server."""
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self._config.request_timeout),
                headers={"Authorization": f"Bearer {self._config.access_token}"},
            )
        return self._session

    async def _post(self, url: str, payload: Dict[str, Any]) -> Any:
        attempt = 1
        while True:
            try:
                return await self._post_once(url, payload)
            except GraphError as error:
                if not error.retryable or attempt >= self._max_attempts:
                    raise
                delay = self._backoff_seconds * 2 ** (attempt - 1) * (0.5 + random.random())
                logger.info("Cloud API error %s, retry %d in %.2fs", error.code, attempt, delay)
                await self._sleep(delay)
                attempt += 1

    async def _post_once(self, url: str, payload: Dict[str, Any]) -> Any:
        try:
            async with self._get_session().post(url, json=payload) as response:
                try:
                    body = await response.json(content_type=None)
                except ValueError:
                    body = await response.text()
                if response.status >= 400:
                    raise GraphError.from_response(response.status, body)
                return body
        except (aiohttp.ClientError, asyncio.TimeoutError) as error:
            raise TransientError(None, f"{type(error).__name__}: {error}") from error
