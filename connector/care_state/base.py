"""The care-window state's interface: one backend per kind of tracker store, every call run in a
worker thread so that a slow database never stalls Rasa's event loop."""

import asyncio
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, Awaitable, Callable, Dict, List, Optional, Sequence, TypeVar

from connector.care_state.records import (
    CustomerState, DeskEvent, Handoff, OutboundRecord, PendingTurn, Pricing, StatusWritten, TemplateState,
)

T = TypeVar("T")


class CareStateBackend(ABC):
    """Synchronous and atomic: each method is one conditional write or one read, so two
    instances (or threads) racing on one customer cannot both win a reservation."""

    @abstractmethod
    def create_schema(self) -> None:
        """Create what is missing (at startup, never on a request path); raises if it cannot."""

    @abstractmethod
    def customer(self, sender_id: str) -> CustomerState: ...

    @abstractmethod
    def note_inbound(self, sender_id: str, timestamp: int, phone_number_id: Optional[str]) -> None:
        """Raise the customer's last message time (never lower it) and remember the number."""

    @abstractmethod
    def close_window(self, sender_id: str, inbound_at: int) -> None:
        """Meta says the window opened at `inbound_at` has closed."""

    @abstractmethod
    def set_opt_out_pending(self, sender_id: str, pending: bool) -> None: ...

    @abstractmethod
    def templates_reserved(self, sender_id: str, window_of: int) -> int: ...

    @abstractmethod
    def reserve_template(self, record: OutboundRecord, limit: int) -> bool:
        """Take one of the `limit` template slots of `record.window_of` and store the record, in
        one atomic step; False when every slot is taken."""

    @abstractmethod
    def release_template(self, record: OutboundRecord) -> None:
        """Meta proved it did not take the template: its slot is free again."""

    @abstractmethod
    def add_outbound(self, record: OutboundRecord) -> None: ...

    @abstractmethod
    def update_outbound(
        self, status: str, callback_id: Optional[str] = None, wamid: Optional[str] = None,
        error_code: Optional[int] = None, reason: Optional[str] = None,
    ) -> Optional[OutboundRecord]:
        """Move a record's status forward (found by callback id, else by wamid) and set what is
        given; returns the record if THIS call changed it, so exactly one caller acts on it."""

    def queued(self, name: str) -> Optional[Callable[..., Optional[Awaitable[Any]]]]:
        """For a backend that queues some calls itself (SQLite: one writer thread committing the
        writes that queued meanwhile together, one reader thread reading the customers asked
        for meanwhile together): a function, called on the event loop, that queues a call of
        the method `name` and returns what to await (None for a call it does not queue), so
        that no worker thread waits for it. None: every call of `name` runs in a worker thread."""
        return None

    def close(self) -> None:
        """Let go of threads and connections of its own (the state is closing)."""

    def record_status(
        self, status: str, callback_id: Optional[str] = None, wamid: Optional[str] = None,
        error_code: Optional[int] = None, reason: Optional[str] = None, pricing: Optional[Pricing] = None,
        fetch: bool = True,
    ) -> StatusWritten:
        """A status webhook's writes in one call: the message's pricing (when the status carries
        one and a callback id), then `update_outbound`. The record is returned only with `fetch`
        (a `failed` status needs it; the others only move the record forward). A backend may do
        it in one transaction (the SQL one does)."""
        first = False
        if pricing is not None and callback_id:
            first = callback_id not in self.pricing_of([callback_id])
            self.set_pricing(callback_id, pricing)
        record = self.update_outbound(status, callback_id, wamid, error_code, reason)
        return StatusWritten(record is not None, record if fetch else None, first)

    @abstractmethod
    def outbound(self, callback_id: str) -> Optional[OutboundRecord]: ...

    @abstractmethod
    def recent_outbound(self, sender_id: str, limit: int) -> List[OutboundRecord]:
        """The customer's latest records, newest first."""

    # --- the inbox: customer messages acknowledged to Meta, until Rasa saved their turn -----

    @abstractmethod
    def accept_turns(self, turns: Sequence[PendingTurn], owner: str, lease_until: float) -> List[str]:
        """Keep the turns not seen before (and take back those whose handling failed), leased to
        `owner`, and raise each customer's last message time, in one atomic step. Returns the
        keys this call made pending: the caller runs those; the rest are done or being handled."""

    @abstractmethod
    def renew_leases(self, keys: Sequence[str], owner: str, lease_until: float) -> None:
        """The owner is alive and still working on these (those of its pending turns that it is
        not working on, e.g. a done-write that failed, run out and are claimed again)."""

    @abstractmethod
    def claim_turns(self, owner: str, now: float, lease_until: float, limit: int,
                    take_over: Optional[str] = None) -> List[PendingTurn]:
        """Pending turns whose lease ran out (or, with `take_over`, that this name owned in an
        earlier life), taken with ALL of each customer's pending turns so that one instance runs
        a customer's messages in order. Oldest first."""

    @abstractmethod
    def turn_failed(self, key: str, attempts: int, error: str, final: bool) -> None:
        """An attempt failed: counted, and with `final` the turn is given up (`failed`)."""

    @abstractmethod
    def turn_done(self, key: str) -> None:
        """Rasa saved the turn; a redelivery of it is dropped from now on."""

    @abstractmethod
    def turns_of(self, sender_id: str, limit: int) -> List[PendingTurn]:
        """The customer's latest inbox entries, newest first (the conversation view)."""

    @abstractmethod
    def forget_turns(self, finished_before: float) -> int:
        """Drop done and failed entries older than Meta's redelivery period."""

    # --- handoffs: conversations with a person, and the events the desk receives -----------

    @abstractmethod
    def start_handoff(self, sender_id: str, since: float, reason: Optional[str]) -> bool:
        """Register the handoff; True only for the call that started it (one `handoff` event)."""

    @abstractmethod
    def end_handoff(self, sender_id: str) -> bool:
        """True only for the call that ended it (one `resumed` event)."""

    @abstractmethod
    def handoffs(self, limit: int) -> List[Handoff]:
        """The open handoffs, oldest first, each with its customer's `last_inbound_at`."""

    @abstractmethod
    def handoff(self, sender_id: str) -> Optional[Handoff]: ...

    @abstractmethod
    def mark_window_closing(self, sender_id: str, window_of: int) -> bool:
        """True only for the call that marked this window of an open handoff as warned about."""

    @abstractmethod
    def add_desk_event(self, event: DeskEvent, limit: int) -> bool:
        """Store the event (an `event_id` already stored is kept once), unless the customer
        already has `limit` undelivered events: then False and nothing is stored."""

    @abstractmethod
    def claim_desk_events(self, owner: str, now: float, lease_until: float, limit: int) -> List[DeskEvent]:
        """The oldest undelivered event of each customer, if it is due and not leased by
        another owner, leased to `owner`: one at a time per customer keeps their order."""

    @abstractmethod
    def desk_event_delivered(self, event_id: str) -> None:
        """The desk took it: forgotten."""

    @abstractmethod
    def desk_event_failed(self, event_id: str, attempts: int, error: str, next_attempt_at: float) -> None:
        """Released for a later attempt (the customer's later events wait behind it)."""

    @abstractmethod
    def desk_backlog(self, sender_id: str, limit: int) -> List[DeskEvent]:
        """The customer's undelivered events, oldest first."""


    # --- templates as Meta knows them ---------------------------------------------------------

    @abstractmethod
    def update_template(self, template: TemplateState, status: bool = True, category: bool = True) -> bool:
        """Store what Meta says of one template unless the stored word is later (`updated_at`);
        `status` / `category` False keeps that field as stored (a webhook says one of them).
        A template not stored yet is created (with "" for a field not given). True if stored."""

    @abstractmethod
    def templates(self) -> List[TemplateState]:
        """Every template stored, by name and language."""


    @abstractmethod
    def set_marketing_stopped(self, sender_id: str, stopped: bool, at: float) -> bool:
        """The customer stopped (or resumed) marketing messages at `at` (Meta's timestamp);
        a later word wins. True if stored."""

    @abstractmethod
    def marketing_stopped(self, sender_id: str) -> bool: ...

    @abstractmethod
    def set_pricing(self, callback_id: str, pricing: Pricing) -> None:
        """Meta's pricing of one outbound message (by its record's callback id); the latest status wins."""

    @abstractmethod
    def pricing_of(self, callback_ids: Sequence[str]) -> Dict[str, Pricing]: ...


class CareState:
    """The async face of a backend. Calls run on a small thread pool of their own, so a stalled
    database holds up only these threads, never the webhook's acknowledgement."""

    def __init__(self, backend: CareStateBackend, threads: int = 8, intake_threads: int = 16) -> None:
        self.backend = backend
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="care-state")
        self._intake_pool = ThreadPoolExecutor(max_workers=intake_threads, thread_name_prefix="care-state-intake")
        """The webhook's acknowledgement waits for its inbox write: never behind the outbound path's calls."""

    async def run(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Any blocking function on the state's threads, e.g. several backend calls in one hop."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, partial(function, *args, **kwargs))

    async def _queued(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """A call the backend queues itself (awaited, no worker thread held), else one run in a
        worker thread. Only the backend's own class is asked: a wrapper around it
        (a test's, a benchmark's) gets every call in a worker thread, as before."""
        queued = getattr(type(self.backend), "queued", None)
        queue = queued(self.backend, name) if queued is not None else None
        waiting = queue(*args, **kwargs) if queue is not None else None
        if waiting is not None:
            return await waiting
        return await self.run(getattr(self.backend, name), *args, **kwargs)

    async def create_schema(self) -> None:
        await self.run(self.backend.create_schema)

    async def customer(self, sender_id: str) -> CustomerState:
        return await self._queued("customer", sender_id)

    async def note_inbound(self, sender_id: str, timestamp: int, phone_number_id: Optional[str]) -> None:
        await self._queued("note_inbound", sender_id, timestamp, phone_number_id)

    async def close_window(self, sender_id: str, inbound_at: int) -> None:
        await self._queued("close_window", sender_id, inbound_at)

    async def set_opt_out_pending(self, sender_id: str, pending: bool) -> None:
        await self._queued("set_opt_out_pending", sender_id, pending)

    async def templates_reserved(self, sender_id: str, window_of: int) -> int:
        return await self.run(self.backend.templates_reserved, sender_id, window_of)

    async def reserve_template(self, record: OutboundRecord, limit: int) -> bool:
        return await self.run(self.backend.reserve_template, record, limit)

    async def release_template(self, record: OutboundRecord) -> None:
        await self._queued("release_template", record)

    async def add_outbound(self, record: OutboundRecord) -> None:
        await self._queued("add_outbound", record)

    async def update_outbound(self, status: str, **fields: Any) -> Optional[OutboundRecord]:
        return await self._queued("update_outbound", status, **fields)

    async def record_status(self, status: str, **fields: Any) -> StatusWritten:
        return await self._queued("record_status", status, **fields)

    async def outbound(self, callback_id: str) -> Optional[OutboundRecord]:
        return await self.run(self.backend.outbound, callback_id)

    async def recent_outbound(self, sender_id: str, limit: int = 50) -> List[OutboundRecord]:
        return await self.run(self.backend.recent_outbound, sender_id, limit)

    async def accept_turns(self, turns: Sequence[PendingTurn], owner: str, lease_until: float) -> List[str]:
        return await asyncio.get_running_loop().run_in_executor(
            self._intake_pool, self.backend.accept_turns, turns, owner, lease_until)

    async def renew_leases(self, keys: Sequence[str], owner: str, lease_until: float) -> None:
        await self.run(self.backend.renew_leases, keys, owner, lease_until)

    async def claim_turns(self, owner: str, now: float, lease_until: float, limit: int,
                          take_over: Optional[str] = None) -> List[PendingTurn]:
        return await self.run(self.backend.claim_turns, owner, now, lease_until, limit, take_over)

    async def turn_failed(self, key: str, attempts: int, error: str, final: bool) -> None:
        await self.run(self.backend.turn_failed, key, attempts, error, final)

    async def turn_done(self, key: str) -> None:
        await self._queued("turn_done", key)

    async def turns_of(self, sender_id: str, limit: int = 20) -> List[PendingTurn]:
        return await self.run(self.backend.turns_of, sender_id, limit)

    async def forget_turns(self, finished_before: float) -> int:
        return await self.run(self.backend.forget_turns, finished_before)

    async def start_handoff(self, sender_id: str, since: float, reason: Optional[str]) -> bool:
        return await self.run(self.backend.start_handoff, sender_id, since, reason)

    async def end_handoff(self, sender_id: str) -> bool:
        return await self.run(self.backend.end_handoff, sender_id)

    async def handoffs(self, limit: int = 500) -> List[Handoff]:
        return await self.run(self.backend.handoffs, limit)

    async def handoff(self, sender_id: str) -> Optional[Handoff]:
        return await self.run(self.backend.handoff, sender_id)

    async def mark_window_closing(self, sender_id: str, window_of: int) -> bool:
        return await self.run(self.backend.mark_window_closing, sender_id, window_of)

    async def add_desk_event(self, event: DeskEvent, limit: int) -> bool:
        return await self.run(self.backend.add_desk_event, event, limit)

    async def claim_desk_events(self, owner: str, now: float, lease_until: float, limit: int) -> List[DeskEvent]:
        return await self.run(self.backend.claim_desk_events, owner, now, lease_until, limit)

    async def desk_event_delivered(self, event_id: str) -> None:
        await self.run(self.backend.desk_event_delivered, event_id)

    async def desk_event_failed(self, event_id: str, attempts: int, error: str, next_attempt_at: float) -> None:
        await self.run(self.backend.desk_event_failed, event_id, attempts, error, next_attempt_at)

    async def desk_backlog(self, sender_id: str, limit: int = 100) -> List[DeskEvent]:
        return await self.run(self.backend.desk_backlog, sender_id, limit)

    async def update_template(self, template: TemplateState, status: bool = True, category: bool = True) -> bool:
        return await self.run(self.backend.update_template, template, status, category)

    async def templates(self) -> List[TemplateState]:
        return await self.run(self.backend.templates)

    async def set_marketing_stopped(self, sender_id: str, stopped: bool, at: float) -> bool:
        return await self.run(self.backend.set_marketing_stopped, sender_id, stopped, at)

    async def marketing_stopped(self, sender_id: str) -> bool:
        return await self.run(self.backend.marketing_stopped, sender_id)

    async def set_pricing(self, callback_id: str, pricing: Pricing) -> None:
        await self._queued("set_pricing", callback_id, pricing)

    async def pricing_of(self, callback_ids: Sequence[str]) -> Dict[str, Pricing]:
        return await self.run(self.backend.pricing_of, callback_ids)

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        self._intake_pool.shutdown(wait=False)
        close = getattr(type(self.backend), "close", None)
        if close is not None:
            close(self.backend)
