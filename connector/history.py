"""The care window's memory, kept in Rasa's tracker store so it survives restarts and session
expiry and is shared by every Rasa instance using the same store.

- The customer's last message time comes from the `UserUttered` events Rasa stored (their
  `metadata.whatsapp.timestamp`), across all sessions; external events (trigger_intent,
  reminders) are not customer messages.
- Opt-in and template parameters come from the latest value each slot was set to.
- What the channel itself decided outside the window (templates sent, replies suppressed,
  Meta's 131047) is appended to a ledger: a tracker of its own, `whatsapp-care-window:<sender_id>`,
  one `ActionExecuted` per record, a new ledger session per customer window. The customer's own
  tracker is never written here: Rasa saves the turn's events after `send_response`, and a
  concurrent save would lose events.

Writers hold the customer's Rasa lock (every bot-message path in Rasa runs under it), so ledger
updates for one customer are serialised across instances. SQL stores are read with indexed
queries, so a decision costs the same for 10 events as for 10,000; other stores are read whole.
"""

import json
import logging
from collections import OrderedDict
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple

from rasa.core.tracker_store import SQLTrackerStore, TrackerStore
from rasa.shared.core.events import ActionExecuted, SessionStarted, SlotSet, UserUttered
from rasa.shared.core.trackers import DialogueStateTracker

from connector.window import CareWindowPolicy, WindowFacts

logger = logging.getLogger(__name__)

LEDGER_PREFIX = "whatsapp-care-window:"
RECORD_ACTION = "whatsapp_care_window"
_PAGE = 200


def inbound_timestamp(event_data: Mapping[str, Any]) -> Optional[float]:
    """WhatsApp timestamp of a stored `user` event that is a real customer message, else None."""
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


class CareWindowHistory:
    def __init__(
        self,
        tracker_store: Callable[[], Optional[TrackerStore]],
        opt_in_slot: str,
        cache_size: int = 10_000,
    ) -> None:
        self._tracker_store = tracker_store
        self._opt_in_slot = opt_in_slot
        self._cache_size = cache_size
        self._last_inbound: "OrderedDict[str, Tuple[float, Optional[str]]]" = OrderedDict()

    def saw_inbound(self, sender_id: str, timestamp: float, phone_number_id: Optional[str] = None) -> None:
        """Remember a customer message (time, and the business number it was written to); it may
        only answer "open": a newer message can exist."""
        known = self._last_inbound.pop(sender_id, None)
        if known is not None and known[0] > timestamp:
            timestamp, phone_number_id = known
        self._last_inbound[sender_id] = (timestamp, phone_number_id)
        while len(self._last_inbound) > self._cache_size:
            self._last_inbound.popitem(last=False)

    def reply_number(self, sender_id: str) -> Optional[str]:
        """The business number the customer last wrote to, as far as this process has seen."""
        known = self._last_inbound.get(sender_id)
        return known[1] if known else None

    async def facts(
        self,
        sender_id: str,
        now: float,
        policy: CareWindowPolicy,
        in_flight_inbound_at: Optional[float] = None,
        slots: Iterable[str] = (),
        read_slots_when_open: bool = False,
    ) -> Tuple[WindowFacts, Dict[str, Any]]:
        """The window facts and the requested slots' values (read only when the window is closed,
        unless asked: the opt-in does not matter inside the window)."""
        store = _unwrap(self._tracker_store())
        if store is None:
            return WindowFacts(None, unknown="no tracker store"), {}
        try:
            records = await self._ledger_records(store, sender_id)
            cached = self._last_inbound.get(sender_id)
            candidates = [in_flight_inbound_at, cached[0] if cached else None]
            known = max((c for c in candidates if c is not None), default=None)
            facts = _facts(known, records)
            if facts.is_open(now, policy) and not read_slots_when_open:
                return facts, {}
            reader = _StoreReader(store, sender_id)
            stored_message = await reader.last_inbound()  # "closed" must come from the store
            stored = stored_message[0] if stored_message else None
            if stored_message is not None:
                self.saw_inbound(sender_id, *stored_message)
            last = max((c for c in (known, stored) if c is not None), default=None)
            facts = _facts(last, records)
            if facts.is_open(now, policy) and not read_slots_when_open:
                return facts, {}
            values = await reader.latest_slots([self._opt_in_slot, *slots])
        except Exception as error:  # the store is down: nothing is provably allowed
            logger.error("Care window state for %s unreadable: %s", sender_id[-4:], error)
            return WindowFacts(None, unknown=f"tracker store unavailable ({type(error).__name__})"), {}
        opt_in = values.pop(self._opt_in_slot, None)
        return _with_opt_in(facts, opt_in), values

    async def record(self, sender_id: str, record: Dict[str, Any]) -> None:
        """Append one record to the customer's ledger. The caller holds the customer's lock."""
        store = _unwrap(self._tracker_store())
        if store is None:
            return
        ledger_id = LEDGER_PREFIX + sender_id
        ledger = await store.retrieve(ledger_id) or DialogueStateTracker(ledger_id, slots=[])
        previous = _records(ledger.events)
        if previous and previous[-1].get("window_of") != record.get("window_of"):
            ledger.update(SessionStarted())  # a new customer window: older records drop out of reads
        ledger.update(ActionExecuted(RECORD_ACTION, metadata={"whatsapp": record}))
        await store.save(ledger)

    async def records(self, sender_id: str) -> List[Dict[str, Any]]:
        store = _unwrap(self._tracker_store())
        return await self._ledger_records(store, sender_id) if store is not None else []

    @staticmethod
    async def _ledger_records(store: TrackerStore, sender_id: str) -> List[Dict[str, Any]]:
        ledger = await store.retrieve(LEDGER_PREFIX + sender_id)
        return _records(ledger.events) if ledger is not None else []


def _facts(last_inbound_at: Optional[float], records: List[Dict[str, Any]]) -> WindowFacts:
    closed = [r["at"] for r in records if r.get("kind") == "closed"]
    templates = [r for r in records if r.get("kind") == "template" and r.get("window_of") == last_inbound_at]
    return WindowFacts(
        last_inbound_at=last_inbound_at,
        closed_at=max(closed) if closed else None,
        templates_sent=len(templates),
    )


def _with_opt_in(facts: WindowFacts, opt_in: Any) -> WindowFacts:
    return WindowFacts(
        last_inbound_at=facts.last_inbound_at,
        closed_at=facts.closed_at,
        templates_sent=facts.templates_sent,
        opt_in=opt_in if isinstance(opt_in, bool) else None,
    )


def _records(events: Iterable[Any]) -> List[Dict[str, Any]]:
    """The current window's records (some stores return every ledger session)."""
    records: List[Dict[str, Any]] = []
    for event in events:
        if isinstance(event, SessionStarted):
            records = []
        elif isinstance(event, ActionExecuted) and event.action_name == RECORD_ACTION:
            records.append((event.metadata or {}).get("whatsapp") or {})
    return records


def _unwrap(store: Optional[TrackerStore]) -> Optional[TrackerStore]:
    """Rasa wraps the configured store (fail-safe, awaitable); the fail-safe one hides errors
    as "no tracker", which must not read as "never wrote"."""
    while store is not None and hasattr(store, "_tracker_store"):
        store = store._tracker_store
    return store


class _StoreReader:
    """One decision's reads of a customer's events. SQL stores answer indexed queries; any
    other store is read whole, once per decision."""

    def __init__(self, store: TrackerStore, sender_id: str) -> None:
        self.store = store
        self.sender_id = sender_id
        self._events: Optional[List[Any]] = None

    async def last_inbound(self) -> Optional[Tuple[float, Optional[str]]]:
        """(WhatsApp timestamp, phone_number_id) of the customer's latest message, across sessions."""
        if isinstance(self.store, SQLTrackerStore):
            for data in _sql_newest_first(self.store, self.sender_id, UserUttered.type_name):
                message = _customer_message(data)
                if message is not None:
                    return message
            return None
        for event in reversed(await self._all_events()):
            if isinstance(event, UserUttered):
                message = _customer_message({"metadata": event.metadata})
                if message is not None:
                    return message
        return None

    async def latest_slots(self, names: List[str]) -> Dict[str, Any]:
        """The latest value each slot was set to, across sessions (a session reset does not
        undo a customer's opt-in)."""
        wanted = set(names)
        found: Dict[str, Any] = {}
        if isinstance(self.store, SQLTrackerStore):
            for name in wanted:  # Rasa stores a SlotSet's slot name in the action_name column
                for data in _sql_newest_first(self.store, self.sender_id, SlotSet.type_name, action_name=name):
                    found[name] = data.get("value")
                    break
            return found
        for event in reversed(await self._all_events()):
            if isinstance(event, SlotSet) and event.key in wanted and event.key not in found:
                found[event.key] = event.value
                if len(found) == len(wanted):
                    break
        return found

    async def _all_events(self) -> List[Any]:
        if self._events is None:
            tracker = await self.store.retrieve_full_tracker(self.sender_id)
            self._events = list(tracker.events) if tracker else []
        return self._events


_INDEXES = (
    ("ix_events_whatsapp_window", ("sender_id", "type_name", "id")),
    ("ix_events_whatsapp_slots", ("sender_id", "type_name", "action_name", "id")),
)
_indexed: set = set()


def ensure_indexes(store: SQLTrackerStore) -> None:
    """Rasa indexes `events` by sender_id alone: PostgreSQL then reads a customer's rows
    newest-first by scanning every row written since (other customers' too) or by sorting all
    of theirs. These two indexes keep the care window's reads flat. Created once, if missing."""
    key = str(store.engine.url)
    if key in _indexed:
        return
    table = store.SQLEvent.__tablename__
    with store.engine.begin() as connection:
        for name, columns in _INDEXES:
            connection.exec_driver_sql(f"CREATE INDEX IF NOT EXISTS {name} ON {table} ({', '.join(columns)})")
    _indexed.add(key)


def _sql_newest_first(
    store: SQLTrackerStore, sender_id: str, type_name: str, action_name: Optional[str] = None
) -> Iterable[Dict[str, Any]]:
    """Stored events of one type, newest first: a row first (usually all it takes), then pages."""
    ensure_indexes(store)
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
        for row_id, data in page:
            yield json.loads(data)
        if len(page) < size:
            return
        before = page[-1][0]
        size = _PAGE
