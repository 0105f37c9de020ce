"""The one Cloud API client: owns the aiohttp session, timeouts, retries and pacing.

Retry policy (Graph codes, never titles; see errors.py):
- retried: 130429, 131056, 131057 (rate limits, maintenance), 131000, 131016, 1, 2 (transient),
  any HTTP 5xx, timeouts and connection failures;
- not retried: 131026, 131047, 132xxx, 190, 4, 80007 and every other 4xx.
- Backoff: `backoff_seconds * 2**(n-1)` capped at `max_backoff_seconds`, with "equal jitter"
  (a random point in the upper half), so 0.25–0.5, 0.5–1, 1–2, 2–4 s with the defaults.
- Budget: the time spent retrying (sleeps plus the retried requests, whose timeouts are cut to
  what is left) for one recipient within any `retry_window_seconds` (60, Rasa's lock lifetime)
  is at most `retry_budget_seconds` (15). So a whole turn, however many messages it has, never
  spends more than 15 s retrying; a retry that cannot fit is not started.
- No Retry-After header is honoured: Meta does not send one (nor does the simulator).
- A message send whose request went out but whose answer never came (timeout, dropped
  connection) is never retried here: Meta may have taken it, and the Cloud API has no
  idempotency key. It raises `OutcomeUnknown`; the outbound path resolves it by the callback id
  echoed in status webhooks. Only a connection that was never made is retried as transient.

Pacing (pacing.py) happens before every attempt of a message send, per phone number and customer.

Metrics (metrics.py): every attempt's duration by operation (send, mark_read, templates, media),
every error answer by Graph code (`none` without one, `transport` when no answer came), and
every retry (`whatsapp_retries_total{kind="send"}`, whatever the request).
"""

import asyncio
import logging
import random as _random
import re
import time
from collections import deque
from typing import Any, Awaitable, Callable, Deque, Dict, List, Mapping, Optional, Tuple

import aiohttp

from connector.config import ChannelConfig
from connector.errors import GraphError, OutcomeUnknown, TransientError
from connector.metrics import Metrics
from connector.pacing import Pacer

logger = logging.getLogger(__name__)

# Meta's business-scoped user ids (customers with a username and no wa_id) are addressed with
# `recipient` instead of `to`.
_BSUID = re.compile(r"^[A-Z]{2}\.")
# A retried request needs at least this long to be worth starting.
_MIN_ATTEMPT_SECONDS = 0.5


class CloudApiClient:
    def __init__(
        self,
        config: ChannelConfig,
        max_attempts: int = 5,
        backoff_seconds: float = 0.5,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        *,
        max_backoff_seconds: float = 4.0,
        retry_budget_seconds: float = 15.0,
        retry_window_seconds: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        random: Callable[[], float] = _random.random,
        pacer: Optional[Pacer] = None,
        metrics: Optional[Metrics] = None,
    ) -> None:
        """`pacer` None: a `Pacer()` with Meta's defaults (80 msg/s per number, customer bucket of
        30 refilled every 6 s) on the same clock and sleep; `Pacer.disabled()` turns pacing off."""
        if max_attempts < 1 or backoff_seconds < 0 or retry_budget_seconds < 0:
            raise ValueError("max_attempts >= 1, backoff and budget >= 0")
        self._config = config
        self._max_attempts = max_attempts
        self._backoff_seconds = backoff_seconds
        self._max_backoff_seconds = max_backoff_seconds
        self._retry_budget = retry_budget_seconds
        self._retry_window = retry_window_seconds
        self._sleep = sleep
        self._clock = clock
        self._random = random
        self.pacer = pacer if pacer is not None else Pacer(clock=clock, sleep=sleep)
        self.metrics = metrics if metrics is not None else Metrics()
        self._session: Optional[aiohttp.ClientSession] = None
        self._session_loop: Optional[asyncio.AbstractEventLoop] = None
        # recipient -> (when, seconds) spent retrying, for the sliding-window budget
        self._retry_spent: Dict[str, Deque[Tuple[float, float]]] = {}

    # --- public API ------------------------------------------------------------------------

    async def send_message(
        self, to: str, message: Mapping[str, Any], phone_number_id: Optional[str] = None,
        callback_id: Optional[str] = None,
    ) -> str:
        """Send one message object (`type` plus its body, optionally `context`) to a customer from
        `phone_number_id` (default: the configured number); returns its wamid. `callback_id` goes
        out as `biz_opaque_callback_data`, which Meta echoes in every status of the message."""
        number = phone_number_id or self._config.phone_number_id
        address = {"recipient": to} if _BSUID.match(to) else {"to": to}
        envelope = {"messaging_product": "whatsapp", "recipient_type": "individual"}
        body = {key: value for key, value in message.items() if key not in ("to", "recipient")}
        payload = {**envelope, **body, **address, "messaging_product": "whatsapp"}
        if callback_id:
            payload["biz_opaque_callback_data"] = callback_id
        pacer = self.pacer
        answer = await self._request(
            "POST", self.messages_url(number), json=payload, idempotent=False, budget_key=f"{number}:{to}",
            before_attempt=(lambda: pacer.wait(number, to)) if pacer.paces else None, operation="send",
        )
        try:
            return str(answer["messages"][0]["id"])
        except (KeyError, IndexError, TypeError):
            raise GraphError(None, f"send answer without a message id: {str(answer)[:200]}") from None

    async def mark_read(self, wamid: str, typing_indicator: bool = True, phone_number_id: Optional[str] = None) -> None:
        """Mark a customer's message read (blue ticks) and, by default, show "typing…" until the
        reply or 25 s. One attempt, no retries: a late read receipt is worth nothing. Raises
        GraphError; whether that matters is the caller's call."""
        payload: Dict[str, Any] = {"messaging_product": "whatsapp", "status": "read", "message_id": wamid}
        if typing_indicator:
            payload["typing_indicator"] = {"type": "text"}
        url = self.messages_url(phone_number_id or self._config.phone_number_id)
        await self._request_once("POST", url, payload, False, min(5.0, self._config.request_timeout), idempotent=True,
                                 operation="mark_read")

    async def download_media(self, media_id: str) -> Tuple[bytes, str]:
        """An inbound media's bytes and MIME type: `GET /{version}/{media-id}` gives a short-lived
        URL, which needs the same bearer token."""
        info = await self._request("GET", f"{self._config.api_url}/{self._config.api_version}/{media_id}",
                                   operation="media")
        url = info.get("url") if isinstance(info, Mapping) else None
        if not isinstance(url, str) or not url:
            raise GraphError(None, f"media {media_id} answer without a url: {str(info)[:200]}")
        data, content_type = await self._request("GET", url, raw=True, operation="media")
        mime = info.get("mime_type") or content_type or "application/octet-stream"
        return data, str(mime)

    async def message_templates(self, waba_id: str, max_pages: int = 100) -> List[Dict[str, Any]]:
        """Every template of the business account (each language one entry), page by page. The
        token needs `whatsapp_business_management` for this read."""
        url: Optional[str] = (f"{self._config.api_url}/{self._config.api_version}/{waba_id}/message_templates"
                              "?fields=name,language,status,category,components&limit=100")
        templates: List[Dict[str, Any]] = []
        for _ in range(max_pages):
            page = await self._request("GET", url, operation="templates")
            templates += [t for t in (page.get("data") or []) if isinstance(t, dict)] if isinstance(page, Mapping) else []
            url = ((page.get("paging") or {}).get("next") if isinstance(page, Mapping) else None) or None
            if url is None:
                break
        return templates

    def messages_url(self, phone_number_id: Optional[str] = None) -> str:
        number = phone_number_id or self._config.phone_number_id
        return f"{self._config.api_url}/{self._config.api_version}/{number}/messages"

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None
        self._session_loop = None

    # --- internals -------------------------------------------------------------------------

    def _get_session(self) -> aiohttp.ClientSession:
        """Created on first use so that it belongs to the loop that runs the server (and again
        if a different loop uses the client, e.g. across test event loops)."""
        loop = asyncio.get_running_loop()
        if self._session is None or self._session.closed or self._session_loop is not loop:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self._config.request_timeout),
                headers={"Authorization": f"Bearer {self._config.access_token}"},
            )
            self._session_loop = loop
        return self._session

    def _budget_left(self, key: Optional[str], now: float) -> float:
        if key is None:
            return self._retry_budget
        spent = self._retry_spent.get(key)
        if not spent:
            return self._retry_budget
        while spent and spent[0][0] <= now - self._retry_window:
            spent.popleft()
        if not spent:
            del self._retry_spent[key]
            return self._retry_budget
        return self._retry_budget - sum(seconds for _, seconds in spent)

    def _spend(self, key: Optional[str], since: float) -> float:
        """Charge the time since `since` to the key's retry budget; returns the seconds spent."""
        now = self._clock()
        spent = max(0.0, now - since)
        if key is not None and spent:
            self._retry_spent.setdefault(key, deque()).append((now, spent))
            if len(self._retry_spent) > 1000:
                for stale in [k for k, v in self._retry_spent.items() if v[-1][0] <= now - self._retry_window]:
                    del self._retry_spent[stale]
        return spent

    def _backoff(self, retry: int) -> float:
        delay = min(self._max_backoff_seconds, self._backoff_seconds * 2 ** (retry - 1))
        return delay / 2 + delay / 2 * self._random()

    async def _request(
        self,
        method: str,
        url: str,
        *,
        json: Any = None,
        raw: bool = False,
        idempotent: bool = True,
        budget_key: Optional[str] = None,
        before_attempt: Optional[Callable[[], Awaitable[Any]]] = None,
        operation: str = "other",
    ) -> Any:
        attempt = 1
        timeout = self._config.request_timeout
        retry_started: Optional[float] = None
        spent_here = 0.0
        while True:
            if before_attempt is not None:
                await before_attempt()
            try:
                result = await self._request_once(method, url, json, raw, timeout, idempotent, operation)
            except GraphError as error:
                if retry_started is not None:
                    spent_here += self._spend(budget_key, retry_started)
                if not error.retryable:
                    raise
                if attempt >= self._max_attempts:
                    logger.warning("Cloud API error %s: giving up after %d attempts", error.code, attempt)
                    raise
                left = min(self._retry_budget - spent_here, self._budget_left(budget_key, self._clock()))
                delay = self._backoff(attempt)
                if delay + _MIN_ATTEMPT_SECONDS > left:
                    logger.warning(
                        "Cloud API error %s: giving up after %d attempts, %.1fs of the retry budget left",
                        error.code, attempt, max(left, 0.0),
                    )
                    raise
                logger.info(
                    "Cloud API error %s (HTTP %s), retry %d of %d in %.2fs",
                    error.code, error.http_status, attempt, self._max_attempts - 1, delay,
                )
                self.metrics.retry("send")
                retry_started = self._clock()
                await self._sleep(delay)
                timeout = min(self._config.request_timeout, max(_MIN_ATTEMPT_SECONDS, left - delay))
                attempt += 1
                continue
            if retry_started is not None:
                self._spend(budget_key, retry_started)
            return result

    async def _request_once(
        self, method: str, url: str, json: Any, raw: bool, timeout: float, idempotent: bool,
        operation: str = "other",
    ) -> Any:
        """One attempt, timed and its error counted."""
        started = time.perf_counter()
        try:
            return await self._attempt(method, url, json, raw, timeout, idempotent)
        except GraphError as error:
            self.metrics.graph_error(error.code, answered=error.http_status is not None)
            raise
        finally:
            self.metrics.graph_request(operation, time.perf_counter() - started)

    async def _attempt(
        self, method: str, url: str, json: Any, raw: bool, timeout: float, idempotent: bool,
    ) -> Any:
        try:
            async with self._get_session().request(
                method, url, json=json, timeout=aiohttp.ClientTimeout(total=timeout)
            ) as response:
                if raw and response.status < 400:
                    return await response.read(), response.headers.get("Content-Type", "").split(";")[0].strip()
                try:
                    body = await response.json(content_type=None)
                except ValueError:
                    body = await response.text()
                if response.status >= 400:
                    if response.status >= 500 and not idempotent and not _has_graph_error(body):
                        # a proxy's or gateway's error page: Meta may have taken the message
                        raise OutcomeUnknown(None, f"HTTP {response.status} without a Graph error",
                                             http_status=response.status)
                    raise GraphError.from_response(response.status, body)
                return body
        except aiohttp.ClientConnectorError as error:  # never connected: nothing was sent
            raise TransientError(None, f"{type(error).__name__}: {error}") from error
        except (aiohttp.ClientError, asyncio.TimeoutError) as error:
            what = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
            if idempotent:
                raise TransientError(None, what) from error
            raise OutcomeUnknown(None, f"no answer, Meta may have taken it ({what})") from error


def _has_graph_error(body: Any) -> bool:
    return isinstance(body, Mapping) and isinstance(body.get("error"), Mapping)
