"""The state for Rasa's in-memory tracker store: one process, so a lock is atomic enough."""

import threading
from dataclasses import replace
from typing import Dict, List, Optional, Set, Tuple

from connector.care_state.base import CareStateBackend
from connector.care_state.records import STATUS_RANK, CustomerState, OutboundRecord

_KEPT_PER_CUSTOMER = 200


class MemoryBackend(CareStateBackend):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._customers: Dict[str, CustomerState] = {}
        self._reservations: Dict[Tuple[str, int], Set[str]] = {}
        self._outbound: Dict[str, OutboundRecord] = {}
        self._by_wamid: Dict[str, str] = {}
        self._by_sender: Dict[str, List[str]] = {}

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
