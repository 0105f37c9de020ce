"""The intake: a customer message acknowledged to Meta is kept in the shared inbox first (with the
care-window state, so in the tracker store's own database or Redis), and handed to Rasa in each
customer's order. It is done only once Rasa has saved its turn.

- `accept` runs before the webhook's 200, in one write that also opens the care window. A message
  already done, or being handled by any instance, is acknowledged and not handled again; one whose
  handling failed is taken back. Past `max_in_flight` the whole webhook is refused (503) and Meta
  redelivers it later.
- A failed turn (Rasa raised; the action server could not be reached) is retried with backoff,
  `turn_attempts` times in all, then recorded as failed.
- The instance holds a lease on what it is handling and renews it while alive. Pending turns of a
  crashed instance are claimed when their lease runs out (by any instance), or at once by the
  next start of the same instance; a claimed turn Rasa had already saved is only marked done.
- `stop` gives in-flight turns a deadline; what is left stays pending for the next claim.
"""

import asyncio
import logging
import time
from typing import Awaitable, Callable, Dict, List, Optional, Sequence, Set

from connector.care_state import CareState, PendingTurn
from connector.decisions import masked
from connector.metrics import Metrics
from connector.ordering import PerSenderQueue

logger = logging.getLogger(__name__)

DONE_KEPT_SECONDS = 8 * 24 * 3600
"""A done message is remembered longer than Meta redelivers (7 days)."""


class Busy(Exception):
    """Refused for now (full, or shutting down): answer 503 so that Meta redelivers later."""


class TurnInterrupted(BaseException):
    """Raised inside a Rasa turn to end it before Rasa saves the tracker, so the message can be
    handled again. A BaseException because Rasa catches every Exception an action raises and
    saves the turn as if the action had run."""


class Intake:
    def __init__(
        self,
        state: Callable[[], CareState],
        queue: PerSenderQueue,
        run: Callable[[PendingTurn, bool], Awaitable[None]],
        already_saved: Callable[[PendingTurn], Awaitable[bool]],
        *,
        max_in_flight: int,
        attempts: int,
        lease_seconds: float = 30.0,
        first_retry_seconds: float = 1.0,
        max_retry_seconds: float = 30.0,
        metrics: Optional[Metrics] = None,
    ) -> None:
        """`run(turn, again)` hands one turn to Rasa (`again`: an earlier attempt may have sent
        some of its replies); `already_saved(turn)` asks the tracker store whether Rasa saved it."""
        self.state = state
        self.queue = queue
        self.run = run
        self.already_saved = already_saved
        self.max_in_flight = max_in_flight
        self.attempts = attempts
        self.lease_seconds = lease_seconds
        self.first_retry_seconds = first_retry_seconds
        self.max_retry_seconds = max_retry_seconds
        self.metrics = metrics if metrics is not None else Metrics()
        """Counts each turn retry (`whatsapp_retries_total{kind="turn"}`)."""
        self.owner = ""
        """This instance's name in the inbox (host:port): the next start of it takes over at once."""
        self.stopping = False
        self.failed = 0
        """Turns given up after their last attempt, since start."""
        self._in_flight: Set[str] = set()
        self._admitting = 0
        self._sweeper: Optional["asyncio.Task[None]"] = None

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    async def accept(self, turns: Sequence[PendingTurn]) -> List[str]:
        """Keep the turns (one write) and queue those new to the inbox; their keys. Raises `Busy`,
        or the store's error: either way nothing was acknowledged."""
        if self.stopping:
            raise Busy("shutting down")
        if not turns:
            return []
        if self.in_flight + self._admitting and self.in_flight + self._admitting + len(turns) > self.max_in_flight:
            raise Busy(f"{self.in_flight} messages in flight (max_in_flight {self.max_in_flight})")
        self._admitting += len(turns)
        try:  # shielded: Meta hanging up must not leave kept turns unqueued until their lease ends
            return await asyncio.shield(self._keep(turns))
        finally:
            self._admitting -= len(turns)

    async def _keep(self, turns: Sequence[PendingTurn]) -> List[str]:
        keys = await self.state().accept_turns(turns, self.owner, time.time() + self.lease_seconds)
        taken = set(keys)
        self._queue([turn for turn in turns if turn.key in taken], recovered=False)
        return keys

    async def start(self, owner: str) -> None:
        """Take over what this instance left pending in an earlier life, then keep watch."""
        self.owner, self.stopping = owner, False
        await self._claim(take_over=owner)
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def stop(self, deadline: float) -> None:
        """Refuse new messages, give the queued ones `deadline` seconds, leave the rest pending."""
        self.stopping = True
        left = self.in_flight
        try:
            await asyncio.wait_for(self.queue.drain(), timeout=deadline)
        except asyncio.TimeoutError:
            logger.warning("Shutdown: %d WhatsApp message(s) not handled within %.0f s stay pending for the next "
                           "start or another instance", self.in_flight, deadline)
            await self.queue.cancel()
        else:
            if left:
                logger.info("Shutdown: the %d WhatsApp message(s) in flight were handled", left)
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)

    def _queue(self, turns: Sequence[PendingTurn], recovered: bool) -> None:
        for turn in turns:
            if turn.key in self._in_flight:
                continue
            self._in_flight.add(turn.key)
            self.queue.submit(turn.sender_id, lambda turn=turn: self._handle(turn, recovered))

    async def _handle(self, turn: PendingTurn, recovered: bool) -> None:
        attempt = turn.attempts
        try:
            while True:
                attempt += 1
                again = recovered or attempt > 1
                try:
                    if again and await self.already_saved(turn):
                        logger.info("Message %s of %s was already handled before the restart", turn.key, masked(turn.sender_id))
                    else:
                        await self.run(turn, again)
                    break
                except (Exception, TurnInterrupted) as error:
                    reason = f"{type(error).__name__}: {error}"
                    final = attempt >= self.attempts
                    await self._write(self.state().turn_failed(turn.key, attempt, reason, final), "record a failed attempt of", turn)
                    if final:
                        self.failed += 1
                        logger.error("Message %s of %s FAILED after %d attempt(s), not answered: %s",
                                     turn.key, masked(turn.sender_id), attempt, reason)
                        return
                    delay = min(self.first_retry_seconds * 2 ** (attempt - 1), self.max_retry_seconds)
                    self.metrics.retry("turn")
                    logger.warning("Message %s of %s: attempt %d of %d failed (%s); again in %.0f s",
                                   turn.key, masked(turn.sender_id), attempt, self.attempts, reason, delay)
                    await asyncio.sleep(delay)
            await self._write(self.state().turn_done(turn.key), "mark done", turn)
        finally:
            self._in_flight.discard(turn.key)

    async def _write(self, write: Awaitable[None], what: str, turn: PendingTurn) -> None:
        """A lost write only delays: the turn's lease runs out, it is claimed again, and the
        tracker store says whether it was handled."""
        try:
            await write
        except Exception as error:
            logger.error("Could not %s message %s of %s: %s: %s", what, turn.key, masked(turn.sender_id),
                         type(error).__name__, error)

    async def _claim(self, take_over: Optional[str] = None) -> None:
        room = self.max_in_flight - self.in_flight
        if room <= 0:
            return
        now = time.time()
        turns = await self.state().claim_turns(self.owner, now, now + self.lease_seconds, room, take_over)
        if turns:
            senders = len({turn.sender_id for turn in turns})
            logger.warning("Recovered %d pending WhatsApp message(s) of %d customer(s) left by %s", len(turns), senders,
                           "this instance's last run" if take_over else "an instance whose lease ran out")
        by_sender: Dict[str, List[PendingTurn]] = {}
        for turn in turns:
            by_sender.setdefault(turn.sender_id, []).append(turn)
        for mine in by_sender.values():
            self._queue(sorted(mine, key=lambda turn: turn.received_at), recovered=True)

    async def _sweep(self) -> None:
        """Renew this instance's leases; claim turns whose lease ran out; forget old done ones."""
        forgot_at = 0.0
        while True:
            await asyncio.sleep(self.lease_seconds / 3)
            try:
                await self.state().renew_leases(sorted(self._in_flight), self.owner, time.time() + self.lease_seconds)
                if not self.stopping:
                    await self._claim()
                if time.time() - forgot_at > 3600:
                    forgot_at = time.time()
                    await self.state().forget_turns(time.time() - DONE_KEPT_SECONDS)
            except Exception as error:
                logger.error("WhatsApp inbox upkeep failed (tried again in %.0f s): %s: %s", self.lease_seconds / 3,
                             type(error).__name__, error)
