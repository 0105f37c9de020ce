"""What Rasa's tracker store says about a customer, read off the event loop: their latest
message (the source of truth for the care window) and the latest value of some slots.

SQL stores answer indexed queries (the indexes are created at startup by the care-window state),
so a read costs the same for 10 events as for 10,000; other stores are read whole.
"""

import asyncio
import json
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

from rasa.core.tracker_store import SQLTrackerStore, TrackerStore
from rasa.shared.core.events import SlotSet, UserUttered

_PAGE = 200


def inbound_timestamp(event_data: Mapping[str, Any]) -> Optional[float]:
    """WhatsApp timestamp of a stored `user` event that is a real customer message, else None
    (external events such as trigger_intent and reminders are not customer messages)."""
    whatsapp = _whatsapp_metadata(event_data)
    timestamp = whatsapp.get("timestamp") if whatsapp else None
    return float(timestamp) if isinstance(timestamp, (int, float)) and not isinstance(timestamp, bool) else None


def _whatsapp_metadata(event_data: Mapping[str, Any]) -> Optional[Mapping[str, Any]]:
    metadata = event_data.get("metadata") or {}
    if metadata.get("is_external"):
        return None
    whatsapp = metadata.get("whatsapp")
    return whatsapp if isinstance(whatsapp, Mapping) else None


def _customer_message(event_data: Mapping[str, Any]) -> Optional[Tuple[float, Optional[str]]]:
    timestamp = inbound_timestamp(event_data)
    if timestamp is None:
        return None
    number = (_whatsapp_metadata(event_data) or {}).get("phone_number_id")
    return timestamp, str(number) if number else None


class TrackerReader:
    """One decision's reads of a customer's events. Blocking: call its methods in a worker thread.
    Non-SQL stores are read whole, once for both reads."""

    def __init__(self, store: TrackerStore, sender_id: str) -> None:
        self.store = store
        self.sender_id = sender_id
        self._events: Optional[List[Any]] = None

    def last_inbound(self) -> Optional[Tuple[float, Optional[str]]]:
        """(WhatsApp timestamp, phone_number_id) of the customer's latest message, across sessions."""
        if isinstance(self.store, SQLTrackerStore):
            for data in _sql_newest_first(self.store, self.sender_id, UserUttered.type_name):
                message = _customer_message(data)
                if message is not None:
                    return message
            return None
        for event in reversed(self._all_events()):
            if isinstance(event, UserUttered):
                message = _customer_message({"metadata": event.metadata})
                if message is not None:
                    return message
        return None

    def has_message(self, message_id: str) -> bool:
        """Whether Rasa saved a turn for this message (its `UserUttered` keeps the wamid)."""
        if isinstance(self.store, SQLTrackerStore):
            event = self.store.SQLEvent
            with self.store.session_scope() as session:
                rows = session.query(event.data).filter(
                    event.sender_id == self.sender_id, event.type_name == UserUttered.type_name,
                    event.data.contains(message_id, autoescape=True)).all()
            return any(json.loads(data).get("message_id") == message_id for (data,) in rows)
        return any(isinstance(event, UserUttered) and event.message_id == message_id for event in self._all_events())

    def latest_slots(self, names: Iterable[str]) -> Dict[str, Any]:
        """The latest value each slot was set to, across sessions (a session reset does not undo a
        customer's opt-in)."""
        wanted = set(names)
        found: Dict[str, Any] = {}
        if isinstance(self.store, SQLTrackerStore):
            for name in wanted:  # Rasa stores a SlotSet's slot name in the action_name column
                for data in _sql_newest_first(self.store, self.sender_id, SlotSet.type_name, action_name=name):
                    found[name] = data.get("value")
                    break
            return found
        for event in reversed(self._all_events()):
            if isinstance(event, SlotSet) and event.key in wanted and event.key not in found:
                found[event.key] = event.value
                if len(found) == len(wanted):
                    break
        return found

    def _all_events(self) -> List[Any]:
        """Non-SQL stores (in-memory, Redis, Mongo...) are synchronous underneath their async API."""
        if self._events is None:
            tracker = asyncio.run(self.store.retrieve_full_tracker(self.sender_id))
            self._events = list(tracker.events) if tracker else []
        return self._events


def _sql_newest_first(
    store: SQLTrackerStore, sender_id: str, type_name: str, action_name: Optional[str] = None
) -> Iterable[Dict[str, Any]]:
    """Stored events of one type, newest first: a row first (usually all it takes), then pages."""
    event = store.SQLEvent
    before: Optional[int] = None
    size = 1
    while True:
        with store.session_scope() as session:
            query = session.query(event.id, event.data).filter(event.sender_id == sender_id, event.type_name == type_name)
            if action_name is not None:
                query = query.filter(event.action_name == action_name)
            if before is not None:
                query = query.filter(event.id < before)
            page = query.order_by(event.id.desc()).limit(size).all()
        for _, data in page:
            yield json.loads(data)
        if len(page) < size:
            return
        before = page[-1][0]
        size = _PAGE


async def off_loop(store: TrackerStore, call: Any, saves: bool = True) -> Any:
    """Run one of the store's own async methods (`call()` makes the coroutine) in a worker
    thread: Rasa's SQL and Redis stores block inside them. A save with an event broker, whose
    client belongs to Rasa's loop, runs on the loop instead (reads never touch the broker)."""
    if saves and getattr(store, "event_broker", None) is not None:
        return await call()
    return await asyncio.to_thread(lambda: asyncio.run(call()))
