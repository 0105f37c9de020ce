"""The state for Rasa's in-memory tracker store: one process, so a lock is atomic enough."""

import threading
import time
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence, Set, Tuple

from connector.care_state.base import CareStateBackend
from connector.care_state.records import (
    STATUS_RANK, CustomerState, DeskEvent, Handoff, OutboundRecord, PendingTurn, Pricing, TemplateState,
)

_KEPT_PER_CUSTOMER = 200


@dataclass(frozen=True)
class _Entry:
    turn: PendingTurn
    owner: Optional[str]
    lease_until: float
    finished_at: Optional[float] = None


@dataclass(frozen=True)
class _Desk:
    event: DeskEvent
    owner: Optional[str] = None
    lease_until: Optional[float] = None


class MemoryBackend(CareStateBackend):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._customers: Dict[str, CustomerState] = {}
        self._reservations: Dict[Tuple[str, int], Set[str]] = {}
        self._outbound: Dict[str, OutboundRecord] = {}
        self._by_wamid: Dict[str, str] = {}
        self._by_sender: Dict[str, List[str]] = {}
        self._inbox: Dict[str, _Entry] = {}
        self._handoffs: Dict[str, Handoff] = {}
        self._desk: Dict[str, _Desk] = {}
        """Undelivered desk events by event id."""
        self._desk_queues: Dict[str, List[str]] = {}
        """A customer's undelivered event ids, in seq order (the head first)."""
        self._desk_seq = 0
        self._templates: Dict[Tuple[str, str], TemplateState] = {}
        self._marketing_stops: Dict[str, Tuple[bool, float]] = {}
        """A customer's latest word on marketing messages: (stopped, when)."""
        self._pricing: Dict[str, Pricing] = {}
        """By callback id; forgotten with its outbound record."""

    def create_schema(self) -> None:
        pass

    def customer(self, sender_id: str) -> CustomerState:
        with self._lock:
            return self._get(sender_id)

    def _get(self, sender_id: str) -> CustomerState:
        return self._customers.get(sender_id) or CustomerState(sender_id)

    def _change(self, sender_id: str, **changes) -> None:
        self._customers[sender_id] = replace(self._get(sender_id), **changes)

    def note_inbound(self, sender_id: str, timestamp: int, phone_number_id: Optional[str]) -> None:
        with self._lock:
            known = self._customers.get(sender_id)
            if known is None or known.last_inbound_at is None or known.last_inbound_at < timestamp:
                self._change(sender_id, last_inbound_at=timestamp, reply_number=phone_number_id)

    def close_window(self, sender_id: str, inbound_at: int) -> None:
        with self._lock:
            known = self._get(sender_id).closed_for_inbound
            self._change(sender_id, closed_for_inbound=max(inbound_at, known or 0))

    def set_opt_out_pending(self, sender_id: str, pending: bool) -> None:
        with self._lock:
            self._change(sender_id, opt_out_pending=pending)

    def templates_reserved(self, sender_id: str, window_of: int) -> int:
        with self._lock:
            return len(self._reservations.get((sender_id, window_of), ()))

    def reserve_template(self, record: OutboundRecord, limit: int) -> bool:
        with self._lock:
            taken = self._reservations.setdefault((record.sender_id, record.window_of), set())
            if len(taken) >= limit:
                return False
            taken.add(record.callback_id)
            self._store(record)
            return True

    def release_template(self, record: OutboundRecord) -> None:
        with self._lock:
            self._reservations.get((record.sender_id, record.window_of), set()).discard(record.callback_id)

    def add_outbound(self, record: OutboundRecord) -> None:
        with self._lock:
            self._store(record)

    def _store(self, record: OutboundRecord) -> None:
        if record.callback_id not in self._outbound:
            mine = self._by_sender.setdefault(record.sender_id, [])
            mine.append(record.callback_id)
            for old in mine[:-_KEPT_PER_CUSTOMER]:  # the view shows the latest; older ones go
                gone = self._outbound.pop(old, None)
                self._pricing.pop(old, None)
                self._by_wamid.pop(gone.wamid if gone and gone.wamid else "", None)
            del mine[:-_KEPT_PER_CUSTOMER]
        self._outbound[record.callback_id] = record
        if record.wamid:
            self._by_wamid[record.wamid] = record.callback_id

    def update_outbound(self, status, callback_id=None, wamid=None, error_code=None, reason=None):
        with self._lock:
            key = callback_id if callback_id in self._outbound else self._by_wamid.get(wamid or "")
            record = self._outbound.get(key or "")
            if record is None or record.status_rank >= STATUS_RANK[status]:
                return None
            record = replace(
                record, status=status, wamid=record.wamid or wamid,
                error_code=error_code if error_code is not None else record.error_code,
                reason=reason if reason is not None else record.reason,
            )
            self._store(record)
            return record

    def outbound(self, callback_id: str) -> Optional[OutboundRecord]:
        with self._lock:
            return self._outbound.get(callback_id)

    def recent_outbound(self, sender_id: str, limit: int) -> List[OutboundRecord]:
        with self._lock:
            mine = [self._outbound[key] for key in self._by_sender.get(sender_id, ())]
        return sorted(mine, key=lambda r: r.created_at, reverse=True)[:limit]

    # --- the inbox -----------------------------------------------------------------------------

    def accept_turns(self, turns: Sequence[PendingTurn], owner: str, lease_until: float) -> List[str]:
        accepted: List[str] = []
        with self._lock:
            for turn in turns:
                known = self._inbox.get(turn.key)
                if known is not None and known.turn.state != "failed":
                    continue
                self._inbox[turn.key] = _Entry(replace(turn, state="pending", attempts=0, error=None), owner, lease_until)
                if turn.key not in accepted:
                    accepted.append(turn.key)
        for key in accepted:
            turn = self._inbox[key].turn
            self.note_inbound(turn.sender_id, turn.timestamp, turn.phone_number_id)
        return accepted

    def renew_leases(self, keys: Sequence[str], owner: str, lease_until: float) -> None:
        with self._lock:
            for key in keys:
                entry = self._inbox.get(key)
                if entry is not None and entry.owner == owner and entry.turn.state == "pending":
                    self._inbox[key] = replace(entry, lease_until=lease_until)

    def claim_turns(self, owner, now, lease_until, limit, take_over=None):
        with self._lock:
            pending = sorted((e for e in self._inbox.values() if e.turn.state == "pending"), key=lambda e: e.turn.received_at)
            senders = {e.turn.sender_id for e in pending if e.lease_until < now or (take_over and e.owner == take_over)}
            claimed = [e.turn for e in pending if e.turn.sender_id in senders][:max(limit, 0)]
            for turn in claimed:
                self._inbox[turn.key] = replace(self._inbox[turn.key], owner=owner, lease_until=lease_until)
            return claimed

    def turn_failed(self, key: str, attempts: int, error: str, final: bool) -> None:
        with self._lock:
            entry = self._inbox[key]
            turn = replace(entry.turn, attempts=attempts, error=error, state="failed" if final else entry.turn.state)
            self._inbox[key] = replace(entry, turn=turn, finished_at=time.time() if final else None)

    def turn_done(self, key: str) -> None:
        with self._lock:
            entry = self._inbox[key]
            self._inbox[key] = replace(entry, turn=replace(entry.turn, state="done", error=None), owner=None,
                                       finished_at=time.time())

    def turns_of(self, sender_id: str, limit: int) -> List[PendingTurn]:
        with self._lock:
            mine = [e.turn for e in self._inbox.values() if e.turn.sender_id == sender_id]
        return sorted(mine, key=lambda t: t.received_at, reverse=True)[:limit]

    def forget_turns(self, finished_before: float) -> int:
        with self._lock:
            old = [k for k, e in self._inbox.items() if e.finished_at is not None and e.finished_at < finished_before]
            for key in old:
                del self._inbox[key]
            return len(old)

    # --- handoffs and the desk's events ------------------------------------------------------

    def start_handoff(self, sender_id: str, since: float, reason: Optional[str]) -> bool:
        with self._lock:
            if sender_id in self._handoffs:
                return False
            self._handoffs[sender_id] = Handoff(sender_id, since, reason)
            return True

    def end_handoff(self, sender_id: str) -> bool:
        with self._lock:
            return self._handoffs.pop(sender_id, None) is not None

    def handoffs(self, limit: int) -> List[Handoff]:
        with self._lock:
            open_ = sorted(self._handoffs.values(), key=lambda h: (h.since, h.sender_id))[:max(limit, 0)]
            return [self._with_window(h) for h in open_]

    def handoff(self, sender_id: str) -> Optional[Handoff]:
        with self._lock:
            found = self._handoffs.get(sender_id)
            return self._with_window(found) if found is not None else None

    def _with_window(self, handoff: Handoff) -> Handoff:
        return replace(handoff, last_inbound_at=self._get(handoff.sender_id).last_inbound_at)

    def mark_window_closing(self, sender_id: str, window_of: int) -> bool:
        with self._lock:
            found = self._handoffs.get(sender_id)
            if found is None or (found.closing_sent_for is not None and found.closing_sent_for >= window_of):
                return False
            self._handoffs[sender_id] = replace(found, closing_sent_for=window_of)
            return True

    def add_desk_event(self, event: DeskEvent, limit: int) -> bool:
        with self._lock:
            if event.event_id in self._desk:
                return True
            queue = self._desk_queues.setdefault(event.sender_id, [])
            if len(queue) >= limit:
                if not queue:
                    del self._desk_queues[event.sender_id]
                return False
            self._desk_seq += 1
            self._desk[event.event_id] = _Desk(replace(event, seq=self._desk_seq))
            queue.append(event.event_id)
            return True

    def claim_desk_events(self, owner: str, now: float, lease_until: float, limit: int) -> List[DeskEvent]:
        with self._lock:
            heads = (self._desk[queue[0]] for queue in self._desk_queues.values())
            due = sorted((d for d in heads if d.event.next_attempt_at <= now
                          and (d.lease_until is None or d.lease_until < now or d.owner == owner)),
                         key=lambda d: d.event.seq)[:max(limit, 0)]
            for claimed in due:
                self._desk[claimed.event.event_id] = replace(claimed, owner=owner, lease_until=lease_until)
            return [claimed.event for claimed in due]

    def desk_event_delivered(self, event_id: str) -> None:
        with self._lock:
            gone = self._desk.pop(event_id, None)
            if gone is None:
                return
            queue = self._desk_queues[gone.event.sender_id]
            queue.remove(event_id)
            if not queue:
                del self._desk_queues[gone.event.sender_id]

    def desk_event_failed(self, event_id: str, attempts: int, error: str, next_attempt_at: float) -> None:
        with self._lock:
            entry = self._desk.get(event_id)
            if entry is not None:
                event = replace(entry.event, attempts=attempts, error=error, next_attempt_at=next_attempt_at)
                self._desk[event_id] = _Desk(event)

    def desk_backlog(self, sender_id: str, limit: int) -> List[DeskEvent]:
        with self._lock:
            return [self._desk[key].event for key in self._desk_queues.get(sender_id, [])[:max(limit, 0)]]

    # --- templates as Meta knows them ---------------------------------------------------------

    def update_template(self, template: TemplateState, status: bool = True, category: bool = True) -> bool:
        key = (template.name, template.language)
        with self._lock:
            known = self._templates.get(key) or TemplateState(template.name, template.language, "", "", 0.0)
            if key in self._templates and known.updated_at > template.updated_at:
                return False
            self._templates[key] = replace(
                known, status=template.status if status else known.status,
                category=template.category if category else known.category, updated_at=float(template.updated_at))
            return True

    def templates(self) -> List[TemplateState]:
        with self._lock:
            return [self._templates[key] for key in sorted(self._templates)]

    # --- marketing stops and pricing ------------------------------------------------------------

    def set_marketing_stopped(self, sender_id: str, stopped: bool, at: float) -> bool:
        with self._lock:
            known = self._marketing_stops.get(sender_id)
            if known is not None and known[1] > at:
                return False
            self._marketing_stops[sender_id] = (bool(stopped), float(at))
            return True

    def marketing_stopped(self, sender_id: str) -> bool:
        with self._lock:
            return self._marketing_stops.get(sender_id, (False, 0.0))[0]

    def set_pricing(self, callback_id: str, pricing: Pricing) -> None:
        with self._lock:
            self._pricing[callback_id] = pricing

    def pricing_of(self, callback_ids: Sequence[str]) -> Dict[str, Pricing]:
        with self._lock:
            return {callback_id: self._pricing[callback_id] for callback_id in callback_ids
                    if callback_id in self._pricing}
