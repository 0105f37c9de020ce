"""The one care-window state per customer, shared by every Rasa instance: it lives with the
tracker store (same SQL database, same Redis, or in memory beside the in-memory store).

- `records.py`: what is kept (CustomerState, OutboundRecord, PendingTurn, Handoff, DeskEvent, TemplateState);
- `base.py`: the interface, and the async face that runs every call in a worker thread;
- `sql.py`, `redis.py`, `memory.py`: one backend per kind of tracker store.
"""

from typing import Any

from connector.care_state.base import CareState, CareStateBackend
from connector.care_state.records import (
    SENT_STATUSES, CustomerState, DeskEvent, Handoff, OutboundRecord, PendingTurn, Pricing, StatusWritten,
    TemplateState,
)

__all__ = ["CareState", "CareStateBackend", "CustomerState", "DeskEvent", "Handoff", "OutboundRecord", "PendingTurn", "Pricing", "SENT_STATUSES", "StatusWritten", "TemplateState",
           "UnsupportedTrackerStore", "backend_for", "unwrap"]


class UnsupportedTrackerStore(RuntimeError):
    pass


def unwrap(store: Any) -> Any:
    """Rasa wraps the configured store (fail-safe, awaitable); the fail-safe one hides errors
    as "no tracker", which must never read as "never wrote"."""
    while store is not None and hasattr(store, "_tracker_store"):
        store = store._tracker_store
    return store


def backend_for(tracker_store: Any) -> CareStateBackend:
    from rasa.core.tracker_store import InMemoryTrackerStore, RedisTrackerStore, SQLTrackerStore

    store = unwrap(tracker_store)
    if isinstance(store, SQLTrackerStore):
        from connector.care_state.sql import SqlBackend

        return SqlBackend(store.engine, store.SQLEvent.__table__)
    if isinstance(store, RedisTrackerStore):
        from connector.care_state.redis import RedisBackend

        return RedisBackend(store.red)
    if isinstance(store, InMemoryTrackerStore):
        from connector.care_state.memory import MemoryBackend

        return MemoryBackend()
    raise UnsupportedTrackerStore(
        f"The WhatsApp channel keeps its care-window state with the tracker store, and cannot with "
        f"{type(store).__name__}: set `tracker_store: type:` in endpoints.yml to `sql` (SQLite, "
        f"PostgreSQL, MySQL), `redis`, or leave it out for the in-memory store."
    )
