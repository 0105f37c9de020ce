"""Cost of ONE care-window decision (`OutboundPath.facts` + `decide`) for a conversation of 10
and of 10,000 stored events, on SQLite, PostgreSQL and the in-memory tracker store, against a
baseline measured in the same run: the naive way, `retrieve_full_tracker` and a scan of its events.

    .venv/bin/python bench/window_cost.py [--explain]

--explain adds, for the 10,000-event conversations, each statement of one "closed miss" decision
with PostgreSQL's EXPLAIN ANALYZE and SQLite's EXPLAIN QUERY PLAN (with the indexes the
care-window state creates on `events` at startup, as in production).

Conversations look like what Rasa stores for this bot: per turn a `UserUttered` with
`metadata.whatsapp.timestamp` (and NLU parse data), an `ActionExecuted`, `SlotSet`s, a
`BotUttered` and `action_listen`; Rasa sessions (`action_session_start`, `SessionStarted`, the
carried-over slots) every 150 turns. The care-window state (`connector.care_state`, its tables in
the tracker store's own database; in memory beside the in-memory store, created with
`create_schema()` as `rasa run` does) holds the customer's last message as the webhook wrote it
(`note_inbound`) and one template reservation from an earlier lapsed window.
Layouts: the customer's last message in the latest session ("recent"); in an old session followed
by newer sessions without a customer message ("old session": reminders, whose `UserUttered` is
external); and "quiet": the "recent" conversation written before everyone else's rows, i.e. the
customer has been silent while 70,000 rows of other customers' conversations were written (the
in-memory store has no row order: "recent" only). 10-event conversations are written with Rasa's
own `save()` (one of them checks the bulk rows); 10,000-event ones are bulk-inserted as the same
rows, interleaved with 500 other customers' conversations (50,000 rows, and their state rows) as
in a live table; PostgreSQL is then ANALYZEd, as autovacuum would have done.

Paths (the window decision the channel makes for a proactive `utter_order_update`, mapped to the
template `order_status_update` with body `{order_id}`, `{order_status}`):
  open               customer wrote 1 h ago and the state says so: one state read
  open, state empty  the same, but the state has no row for the customer (an upgrade from the
                     ledger version): the tracker store's indexed read of the last customer
                     message, and the state row written from it (removed again before each call)
  closed             customer wrote 30 h ago: the state, then the tracker store's last customer
                     message, the window's reservation count, and the opt-in and the template's
                     two placeholders from slots
  closed miss        the same with a third placeholder no slot ever set (the slot query finds nothing)
  reserve            "closed" plus the atomic `reserve_template` that must succeed before a
                     template is sent (released after each call, untimed, so the next one succeeds)
  baseline           retrieve_full_tracker + scan for the last customer message + slots + decide

Goal: the decision at 10,000 events within 1.5x of the one at 10 (printed as growth ratios).
PostgreSQL rows (events and whatsapp_* rows) are written under unique sender ids and deleted at
the end.
"""

import argparse
import asyncio
import io
import json
import logging
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any, Awaitable, Callable, Dict, List, Optional, Sequence, Tuple

for _key, _value in (("TF_CPP_MIN_LOG_LEVEL", "2"), ("SQLALCHEMY_SILENCE_UBER_WARNING", "1"), ("RASA_TELEMETRY_ENABLED", "false")):
    os.environ.setdefault(_key, _value)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import sqlalchemy as sa  # noqa: E402
from rasa.core.tracker_store import InMemoryTrackerStore, SQLTrackerStore, TrackerStore  # noqa: E402
from rasa.shared.core.domain import Domain  # noqa: E402
from rasa.shared.core.events import (  # noqa: E402
    ActionExecuted, BotUttered, Event, SessionStarted, SlotSet, UserUttered,
)
from rasa.shared.core.trackers import DialogueStateTracker  # noqa: E402
from rasa.shared.nlu.constants import INTENT_NAME_KEY  # noqa: E402

from bench.results import append  # noqa: E402
from connector.care_state import CareState, OutboundRecord, backend_for  # noqa: E402
from connector.care_state.memory import MemoryBackend  # noqa: E402
from connector.care_state.sql import customers, outbound, reservations  # noqa: E402
from connector.config import ChannelConfig  # noqa: E402
from connector.outbound import OutboundPath, Stores  # noqa: E402
from connector.templates import TemplateBook  # noqa: E402
from connector.tracker_reads import inbound_timestamp  # noqa: E402
from connector.window import CareWindowPolicy, Outbound, SendTemplate, WindowFacts, decide  # noqa: E402
from tests.services import postgres_settings  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DOMAIN = Domain.load(str(ROOT / "domain.yml"))
OPT_IN = "whatsapp_opt_in"
RESPONSE = "utter_order_update"
PHONE_NUMBER_ID = "106540352242922"
POLICY = CareWindowPolicy()  # margin 60 s, 1 template per lapsed window: credentials.yml
BOOK = TemplateBook.parse(
    {RESPONSE: {"name": "order_status_update", "language": "en_US", "body": ["{order_id}", "{order_status}"]}}, None
)
BOOK_MISSING = TemplateBook.parse(
    {RESPONSE: {"name": "order_status_update", "language": "en_US",
                "body": ["{order_id}", "{order_status}", "{customer_name}"]}}, None
)
H = 3600.0
NOW = float(int(time.time()))
SIZES = (10, 10_000)
GOAL = 1.5                   # a decision at 10,000 events within this factor of one at 10
TURNS_PER_SESSION = 150
RECENT_TURNS = 50            # turns in the latest session before the customer's last message (10k case)
LATER_SESSIONS = 3           # newer sessions after the last customer message ("old session", 10k case)
BACKGROUND = (500, 100)      # other customers x events each, interleaved with the big conversations
META = {"model_id": "7632fb72ea904829ad0a5eee00c9f4ad", "assistant_id": "whatsapp-shop-demo"}
INTENTS = ["greet", "order_status", "inform_order_id", "thank", "goodbye", "opt_in", "opt_out",
           "human_handoff", "out_of_scope", "bot_challenge"]
SCRIPT = [  # intent, text, action, reply
    ("greet", "hi", "utter_greet", "Hi! I can check an order's status, or connect you with a person."),
    ("order_status", "where is my order {order}", "action_check_order_status",
     "Order {order} (Linen tote bag) is being prepared and should ship by 18 June."),
    ("thank", "thanks!", "utter_you_are_welcome", "You're welcome!"),
    ("inform_order_id", "{order}", "action_check_order_status", "Order {order} (Mug) has shipped."),
    ("goodbye", "bye", "utter_goodbye", "Bye! Write any time."),
]


# ---------------------------------------------------------------------------------------------
# conversations: specs first (so exactly N events can be cut), then events with timestamps


def _turn(n: int, slots: Sequence[Tuple[str, Any]]) -> List[tuple]:
    return [("user", n), ("action", n), *[("slot", name, value) for name, value in slots], ("bot", n), ("listen",)]


def _session(carry: Sequence[Tuple[str, Any]]) -> List[tuple]:
    return [("session_start",), ("session_started",), *[("slot", name, value) for name, value in carry], ("listen",)]


def _history_slot(n: int) -> Tuple[str, Any]:
    return [("order_id", str(10000 + n % 500)), ("order_status", "shipped" if n % 2 else "processing"),
            ("whatsapp_window_open", True)][n % 3]


CARRY = [(OPT_IN, True), ("order_id", "10042"), ("order_status", "processing")]


def conversation_specs(size: int, layout: str) -> Tuple[List[tuple], int]:
    """Exactly `size` specs and the index of the customer's last message."""
    if size < 100:  # the 10-event conversations, by hand
        last_turn = _turn(1, [("order_id", "10042"), ("order_status", "processing")])
        if layout == "recent":
            specs = _session([(OPT_IN, True)]) + last_turn
            return specs, 4
        specs = last_turn + _session([(OPT_IN, True)])  # session expired; a new one started since
        return specs, 0
    if layout == "recent":
        tail = _session(CARRY)
        for n in range(RECENT_TURNS):
            tail += _turn(n, [_history_slot(n)])
        last_at = len(tail)
        tail += _turn(RECENT_TURNS, [("order_id", "10042")])
    else:
        tail = []
        last_at = 0
        tail += _turn(0, [("order_id", "10042")])
        for _ in range(LATER_SESSIONS):
            tail += _session(CARRY) + [("external",), ("action_update",), ("bot_update",), ("listen",)]
    history: List[tuple] = []
    n = 0
    while len(history) < size - len(tail):
        history += _session(CARRY if n else [])
        history += _turn(n, [(OPT_IN, True)])  # the customer opted in once, early on
        for _ in range(TURNS_PER_SESSION - 1):
            n += 1
            history += _turn(n, [_history_slot(n)])
        n += 1
    history = history[len(history) - (size - len(tail)):] if size > len(tail) else []
    return history + tail, len(history) + last_at


def materialise(sender: str, specs: List[tuple], last_index: int, last_at: float) -> List[Event]:
    """Events 5 min apart before the customer's last message, 1 min apart after it."""
    events = []
    for i, spec in enumerate(specs):
        at = last_at + (i - last_index) * (300.0 if i < last_index else 60.0) + random.random() / 10
        if i == last_index:
            at = last_at
        events.append(_event(sender, spec, at))
    return events


def _event(sender: str, spec: tuple, at: float) -> Event:
    kind = spec[0]
    if kind in ("user", "action", "bot"):
        intent, text, action, reply = SCRIPT[spec[1] % len(SCRIPT)]
        order = str(10000 + spec[1] % 500)
        text, reply = text.format(order=order), reply.format(order=order)
    if kind == "user":
        wamid = f"wamid.HBgL{sender}{spec[1]:08d}{int(at)}"
        whatsapp = {"wamid": wamid, "type": "text", "timestamp": int(at), "phone_number_id": PHONE_NUMBER_ID,
                    "display_phone_number": "15550001234", "wa_id": sender, "user_id": None,
                    "profile_name": f"Customer {sender[-4:]}", "context": None, "reply": None}
        ranking = [{"name": intent, "confidence": 0.9966}] + [
            {"name": other, "confidence": 0.0003} for other in INTENTS if other != intent][:9]
        entities = ([{"entity": "order_id", "start": text.index(order), "end": text.index(order) + len(order),
                      "value": order, "extractor": "RegexEntityExtractor"}] if order in text else [])
        parse_data = {"intent": ranking[0], "entities": entities, "text": text, "message_id": wamid,
                      "metadata": {"whatsapp": whatsapp}, "text_tokens": [[0, len(text)]], "intent_ranking": ranking}
        return UserUttered(text, ranking[0], entities, parse_data, timestamp=at, input_channel="whatsapp",
                           message_id=wamid, metadata={"whatsapp": whatsapp, **META})
    if kind == "external":  # a reminder / trigger_intent: not a customer message
        intent = {"name": "EXTERNAL_order_follow_up", "confidence": 1.0}
        return UserUttered("/EXTERNAL_order_follow_up", intent, [], {"intent": intent, "entities": [], "text": None},
                           timestamp=at, metadata={"is_external": True, **META})
    if kind == "action":
        return ActionExecuted(action, policy="RulePolicy", confidence=1.0, timestamp=at, metadata=META)
    if kind == "action_update":
        return ActionExecuted(RESPONSE, policy="RulePolicy", confidence=1.0, timestamp=at, metadata=META)
    if kind == "listen":
        return ActionExecuted("action_listen", policy="RulePolicy", confidence=1.0, timestamp=at, metadata=META)
    if kind == "session_start":
        return ActionExecuted("action_session_start", timestamp=at, metadata=META)
    if kind == "session_started":
        return SessionStarted(timestamp=at, metadata=META)
    if kind == "slot":
        return SlotSet(spec[1], spec[2], timestamp=at, metadata=META)
    bot_data = {"elements": None, "quick_replies": None, "buttons": None, "attachment": None, "image": None,
                "custom": None}
    if kind == "bot_update":
        return BotUttered("Your order 10042 has shipped.", bot_data, {"utter_action": RESPONSE, **META}, timestamp=at)
    return BotUttered(reply, bot_data, {"utter_action": action, **META}, timestamp=at)


def sql_row(sender_id: str, event: Event) -> Dict[str, Any]:
    """The row SQLTrackerStore.save() writes for an event (rasa/core/tracker_store.py, 3.6)."""
    data = event.as_dict()
    return {
        "sender_id": sender_id,
        "type_name": event.type_name,
        "timestamp": data.get("timestamp"),
        "intent_name": data.get("parse_data", {}).get("intent", {}).get(INTENT_NAME_KEY),
        "action_name": data.get("name"),
        "data": json.dumps(data),
    }


def sender_ids(n: int) -> List[str]:
    return [f"49{uuid.uuid4().int % 10**10:010d}" for _ in range(n)]



# ---------------------------------------------------------------------------------------------
# the two ways to decide


class Bench:
    """One tracker store, its care-window state, and the channel's outbound path over them."""

    def __init__(self, store: TrackerStore) -> None:
        self.store = store
        self.state = CareState(backend_for(store))
        self.path = self._path(BOOK)
        self.path_missing = self._path(BOOK_MISSING)
        self.reserved: List[OutboundRecord] = []

    def _path(self, book: TemplateBook) -> OutboundPath:
        config = ChannelConfig(access_token="x", phone_number_ids=("1",), app_secret="x", verify_token="x",
                               templates=book, care_window=POLICY)
        return OutboundPath(config, client=None, now=_now, stores=lambda: Stores(self.state, self.store),
                            opted_out=lambda customer: False)


async def _now() -> float:
    return NOW


async def ours(path: OutboundPath, sender: str, now: float) -> Tuple[WindowFacts, Any]:
    """What OutboundPath.deliver decides for a proactive bot message (nothing in flight)."""
    book, policy = path.config.templates, path.config.care_window
    facts, values, _ = await path.facts(sender, now, slots=book.for_response(RESPONSE).placeholders)
    return facts, decide(now, facts, Outbound(RESPONSE, values=values), book, policy)


async def decision(path: OutboundPath, sender: str, now: float) -> Any:
    return (await ours(path, sender, now))[1]


async def reserve(bench: Bench, case: "Case") -> Any:
    """The closed decision, then the reservation deliver() writes before it sends the template."""
    facts, decided = await ours(bench.path, case.sender, NOW)
    if isinstance(decided, SendTemplate):
        record = OutboundRecord(
            callback_id=uuid.uuid4().hex, sender_id=case.sender, decision=decided.kind,
            window_of=int(facts.last_inbound_at or 0), at=NOW, created_at=time.time(), response=RESPONSE,
            template=decided.name, rendered_with={"utter_action": RESPONSE, "order_id": "10042"},
        )
        if not await bench.state.reserve_template(record, POLICY.templates_per_lapsed_window):
            raise AssertionError(f"reservation refused for {case.sender}")
        bench.reserved.append(record)
    return decided


async def release(bench: Bench, case: "Case") -> None:
    """Untimed, between `reserve` calls: the window's slot is free again."""
    while bench.reserved:
        await bench.state.release_template(bench.reserved.pop())


async def forget(bench: Bench, case: "Case") -> None:
    """Untimed, before each `open, state empty` call: the state has no row for the customer."""
    backend = bench.state.backend
    if isinstance(backend, MemoryBackend):
        with backend._lock:
            backend._customers.pop(case.sender, None)
        return
    with backend.engine.begin() as connection:
        connection.execute(sa.delete(customers).where(customers.c.sender_id == case.sender))


async def baseline(store: TrackerStore, sender: str, now: float, book: TemplateBook = BOOK):
    """One read of the whole tracker; the same answers as ours (the latest customer message and
    the latest value of each slot, across sessions), without the care-window state."""
    tracker = await store.retrieve_full_tracker(sender)
    wanted = {OPT_IN, *book.for_response(RESPONSE).placeholders}
    last, values = None, {}
    for event in reversed(tracker.events):
        if last is None and isinstance(event, UserUttered):
            last = inbound_timestamp({"metadata": event.metadata})
        elif isinstance(event, SlotSet) and event.key in wanted and event.key not in values:
            values[event.key] = event.value
        if last is not None and len(values) == len(wanted):
            break
    facts = WindowFacts(last, opt_in=values.pop(OPT_IN, None))
    return decide(now, facts, Outbound(RESPONSE, values=values), book, POLICY)


# ---------------------------------------------------------------------------------------------
# stores


class Case:
    def __init__(self, size: int, layout: str, sender: str) -> None:
        self.size, self.layout, self.sender = size, layout, sender
        self.last_at = NOW - 30 * H  # "closed" is NOW; "open" is 29 h earlier (1 h after the message)
        specs, self.last_index = conversation_specs(size, "old session" if layout == "old session" else "recent")
        self.events = materialise(sender, specs, self.last_index, self.last_at)
        assert len(self.events) == size, (size, layout, len(self.events))

    @property
    def open_now(self) -> float:
        return self.last_at + H


def _background_rows(senders: List[str]) -> List[List[Dict[str, Any]]]:
    specs, last = conversation_specs(10_000, "recent")
    specs, last = specs[-BACKGROUND[1]:], last - (len(specs) - BACKGROUND[1])
    template = [sql_row("x", e) for e in materialise("x", specs, last, NOW - 48 * H)]
    return [[{**row, "sender_id": sender} for row in template] for sender in senders]


async def fill(kind: str, bench: Bench, cases: List["Case"], background: List[str]) -> None:
    """The state's schema first (its tables, and the indexes on `events`), as `rasa run` creates
    it. SQL: the 10-event "quiet" conversation through Rasa's save() (its rows are the reference
    for the bulk rows), the 10,000-event "quiet" one next, then everyone else's rows interleaved,
    then the other 10-event conversations. Then each customer's state: their last message as the
    webhook noted it, and a template reserved in an earlier lapsed window."""
    store, state = bench.store, bench.state
    await state.create_schema()
    if not isinstance(store, SQLTrackerStore):
        for case in cases:
            await store.save(DialogueStateTracker.from_events(case.sender, case.events, slots=DOMAIN.slots))
    else:
        event = store.SQLEvent
        reference = next(c for c in cases if c.size < 100 and c.layout == "quiet")
        await store.save(DialogueStateTracker.from_events(reference.sender, reference.events, slots=DOMAIN.slots))
        names = ("sender_id", "type_name", "timestamp", "intent_name", "action_name", "data")
        with store.session_scope() as session:
            stored = [dict(zip(names, row)) for row in session.query(*[getattr(event, n) for n in names])
                      .filter(event.sender_id == reference.sender).order_by(event.id)]
        assert stored == [sql_row(reference.sender, e) for e in reference.events], "bulk rows differ from save()'s"

        def rows_of(case: Case) -> List[Dict[str, Any]]:
            return [sql_row(case.sender, e) for e in case.events]

        rows = [row for c in cases if c.size >= 100 and c.layout == "quiet" for row in rows_of(c)]
        streams = [iter(rows_of(c)) for c in cases if c.size >= 100 and c.layout != "quiet"]
        streams += [iter(r) for r in _background_rows(background)]
        while streams:  # round-robin: a customer's rows spread over the table as in a live store
            for stream in list(streams):
                row = next(stream, None)
                if row is None:
                    streams.remove(stream)
                else:
                    rows.append(row)
        rows += [row for c in cases if c.size < 100 and c is not reference for row in rows_of(c)]
        with store.session_scope() as session:
            for start in range(0, len(rows), 10_000):
                session.execute(event.__table__.insert(), rows[start:start + 10_000])
            session.execute(customers.insert(), [  # the other customers' state rows
                {"sender_id": s, "last_inbound_at": int(NOW - 48 * H), "reply_number": PHONE_NUMBER_ID,
                 "opt_out_pending": False} for s in background])
            session.commit()
        if kind == "postgresql":
            with store.engine.begin() as connection:  # the statistics autovacuum would have by now
                for table in (event.__table__, customers, reservations, outbound):
                    connection.exec_driver_sql(f"ANALYZE {table.name}")
    for case in cases:
        await state.note_inbound(case.sender, int(case.last_at), PHONE_NUMBER_ID)
        earlier = OutboundRecord(  # an earlier lapsed window's template: not this window's
            callback_id=uuid.uuid4().hex, sender_id=case.sender, decision="template",
            window_of=int(case.last_at - 96 * H), at=case.last_at - 72 * H, created_at=time.time(),
            response=RESPONSE, template="order_status_update", wamid=f"wamid.{case.sender}", status="accepted")
        assert await state.reserve_template(earlier, POLICY.templates_per_lapsed_window)


def make_store(kind: str, directory: Path) -> TrackerStore:
    if kind == "sqlite":
        return SQLTrackerStore(DOMAIN, dialect="sqlite", db=str(directory / "tracker.db"))
    if kind == "postgresql":
        return SQLTrackerStore(DOMAIN, **postgres_settings())
    return InMemoryTrackerStore(DOMAIN)


def cleanup(bench: Bench, senders: List[str]) -> None:
    """Every row written for these senders: their events and their whatsapp_* state rows."""
    bench.state.close()
    store = bench.store
    if not isinstance(store, SQLTrackerStore):
        return
    tables = (store.SQLEvent.__table__, customers, reservations, outbound)
    with store.engine.begin() as connection:
        for table in tables:
            connection.execute(sa.delete(table).where(table.c.sender_id.in_(senders)))
    with store.engine.connect() as connection:
        left = {table.name: connection.execute(sa.select(sa.func.count()).select_from(table)
                                               .where(table.c.sender_id.in_(senders))).scalar() for table in tables}
    assert not any(left.values()), left
    store.engine.dispose()


# ---------------------------------------------------------------------------------------------
# measuring


class Queries:
    """The SQL statements an SQLTrackerStore's engine runs (the tracker reads and the state's)."""

    def __init__(self, store: TrackerStore) -> None:
        self.engine = store.engine if isinstance(store, SQLTrackerStore) else None
        self.statements: List[Tuple[str, Any]] = []

    def __enter__(self) -> "Queries":
        if self.engine is not None:
            sa.event.listen(self.engine, "before_cursor_execute", self._seen)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.engine is not None:
            sa.event.remove(self.engine, "before_cursor_execute", self._seen)

    def _seen(self, conn, cursor, statement, parameters, context, executemany) -> None:
        self.statements.append((statement, parameters))

    @property
    def selects(self) -> List[Tuple[str, Any]]:
        return [(s, p) for s, p in self.statements if s.lstrip().upper().startswith("SELECT")]


async def measure(call: Callable[[], Awaitable[Any]], before: Optional[Callable[[], Awaitable[Any]]] = None,
                  budget: float = 0.6) -> List[float]:
    """Warm up, time one call, then as many as fit the budget (at least 5, at most 400);
    `before` runs untimed before each call."""
    async def timed() -> float:
        if before is not None:
            await before()
        started = time.perf_counter()
        await call()
        return time.perf_counter() - started

    await timed()
    await timed()
    samples = [await timed()]
    for _ in range(max(5, min(400, int(budget / max(samples[0], 1e-6)))) - 1):
        samples.append(await timed())
    return samples


def median_p90(samples: List[float]) -> Tuple[float, float]:
    ms = sorted(s * 1000 for s in samples)
    return statistics.median(ms), ms[max(0, int(round(len(ms) * 0.9)) - 1)]


def _paths(layout: str, extra: bool) -> List[tuple]:
    paths = [
        ("open", layout, lambda b, c: decision(b.path, c.sender, c.open_now), "free_form", None),
        ("open, state empty", layout, lambda b, c: decision(b.path, c.sender, c.open_now), "free_form", forget),
        ("closed", layout, lambda b, c: decision(b.path, c.sender, NOW), "template", None),
    ]
    if extra:
        paths += [
            ("closed miss", layout, lambda b, c: decision(b.path_missing, c.sender, NOW), "suppressed", None),
            ("reserve", layout, reserve, "template", release),
        ]
    return paths + [("baseline", layout, lambda b, c: baseline(b.store, c.sender, NOW), "template", None)]


# name, layout, call(bench, case), expected decision, untimed before each call
PATHS = _paths("recent", True) + _paths("old session", False) + _paths("quiet", False)
LAYOUTS = {"sqlite": ("recent", "old session", "quiet"), "postgresql": ("recent", "old session", "quiet"),
           "in-memory": ("recent",)}  # the in-memory store has no row order: one layout is all of them


async def bench_store(kind: str, explain: bool, results: Dict, notes: List[str]) -> None:
    directory = Path(tempfile.mkdtemp(prefix="window_cost_"))
    sql = kind != "in-memory"
    senders = sender_ids(len(SIZES) * len(LAYOUTS[kind]))
    background = sender_ids(BACKGROUND[0]) if sql else []
    cases = [Case(size, layout, senders.pop()) for size in SIZES for layout in LAYOUTS[kind]]
    bench = Bench(make_store(kind, directory))
    try:
        started = time.perf_counter()
        await fill(kind, bench, cases, background)
        notes.append(f"{kind}: stored {sum(c.size for c in cases) + len(background) * BACKGROUND[1]:,} events "
                     f"in {time.perf_counter() - started:.1f} s")
        statements = {}
        for case in cases:
            for name, layout, path, expected, before in PATHS:
                if layout != case.layout:
                    continue
                call = lambda: path(bench, case)  # noqa: E731
                prepare = (lambda: before(bench, case)) if before else None  # noqa: E731
                if prepare:
                    await prepare()
                with Queries(bench.store) as queries:
                    decided = await call()
                if prepare:
                    await prepare()
                assert decided.kind == expected, (kind, case.size, layout, name, decided)
                results[(kind, case.size, layout, name)] = (await measure(call, prepare), len(queries.statements))
                statements[(case.size, layout, name)] = queries.selects
                await release(bench, case)  # the last `reserve` call's slot: the next paths see none
        if explain and sql:
            explain_store(kind, bench.store, statements, notes)
    finally:
        cleanup(bench, [c.sender for c in cases] + background)
        shutil.rmtree(directory, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# --explain: where the time goes


def _what(statement: str, parameters: Any) -> str:
    values = list(parameters.values() if isinstance(parameters, dict) else parameters)
    if "whatsapp_customers" in statement:
        return "state: customer"
    if "whatsapp_template_reservations" in statement:
        return "state: reservations"
    if "action_name =" in statement:
        return f"slot {values[2]}"
    limit = values[-2] if "OFFSET" in statement else values[-1]  # SQLite: LIMIT ? OFFSET ?
    return f"last {values[1]} (LIMIT {limit})"


def _plan_summary(plan: List[str]) -> str:
    scans = [line.strip().split("  (")[0].lstrip("-> ") for line in plan if "Scan" in line]
    removed = sum(int(line.split(":")[1]) for line in plan if "Rows Removed by Filter" in line)
    execution = next(line.split(":")[1].strip() for line in plan if line.startswith("Execution Time"))
    return f"{' + '.join(dict.fromkeys(scans))[:64]:<64} filtered out {removed:>6,}  {execution:>9}"


def explain_store(kind: str, store: SQLTrackerStore, statements: Dict, notes: List[str]) -> None:
    postgres = kind == "postgresql"
    notes.append(f"\n{kind}: {'EXPLAIN ANALYZE' if postgres else 'EXPLAIN QUERY PLAN'} of each SELECT of one "
                 f"'closed miss' decision, 10,000 events:")
    with store.engine.connect() as connection:
        for layout in ("recent", "quiet"):
            for statement, parameters in statements.get((SIZES[1], layout, "closed miss"),
                                                        statements.get((SIZES[1], layout, "closed"), [])):
                if postgres:
                    plan = [row[0] for row in connection.exec_driver_sql("EXPLAIN (ANALYZE) " + statement, parameters)]
                    summary = _plan_summary(plan)
                else:
                    plan = connection.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, parameters).fetchall()
                    summary = " / ".join(row[-1] for row in plan)
                notes.append(f"  {layout:<7}{_what(statement, parameters):<26}{summary}")


def report(results: Dict) -> None:
    stores = ["sqlite", "postgresql", "in-memory"]
    print(f"One care-window decision (facts + decide), {os.cpu_count()} cores; ms; x = our median / baseline "
          "median (same store, size, layout); q = SQL statements")
    print(f"{'store':<11}{'events':>7}  {'layout':<12}{'path':<19}{'median':>9}{'p90':>9}{'n':>5}{'q':>3}{'vs base':>10}")
    for kind in stores:
        for size in SIZES:
            for name, layout, *_ in PATHS:
                if (kind, size, layout, name) not in results:
                    continue
                samples, queries = results[(kind, size, layout, name)]
                median, p90 = median_p90(samples)
                base = statistics.median(results[(kind, size, layout, "baseline")][0]) * 1000
                ratio = "" if name == "baseline" else f"{median / base:.3f}x"
                q = str(queries) if kind != "in-memory" else "-"
                print(f"{kind:<11}{size:>7,}  {layout:<12}{name:<19}{median:>9.2f}{p90:>9.2f}{len(samples):>5}{q:>3}"
                      f"{ratio:>10}")
        print()
    print(f"Growth from {SIZES[0]} to {SIZES[1]:,} events (median / median; flat = 1.0x; "
          f"goal: within {GOAL}x, ! = missed; the baseline is not held to it):")
    print(f"{'layout':<12}{'path':<19}" + "".join(f"{k:>12}" for k in stores))
    missed, met = [], 0
    for name, layout, *_ in PATHS:
        cells = []
        for kind in stores:
            small, big = results.get((kind, SIZES[0], layout, name)), results.get((kind, SIZES[1], layout, name))
            if not (small and big):
                cells.append("-")
                continue
            growth = statistics.median(big[0]) / statistics.median(small[0])
            over = name != "baseline" and growth > GOAL
            if name != "baseline":
                met += not over
                if over:
                    missed.append(f"{kind} {layout} {name} {growth:.2f}x")
            cells.append(f"{growth:.2f}x" + ("!" if over else " "))
        print(f"{layout:<12}{name:<19}" + "".join(f"{c:>12}" for c in cells))
    print(f"goal met for {met} of {met + len(missed)} (store, layout, path)"
          + (f"; missed: {'; '.join(missed)}" if missed else ""))


async def main(explain: bool) -> None:
    logging.disable(logging.WARNING)  # Rasa's warnings about the generated conversations
    random.seed(7)
    results: Dict = {}
    notes: List[str] = []
    started = time.perf_counter()
    for kind in ("sqlite", "postgresql", "in-memory"):
        await bench_store(kind, explain, results, notes)
    table = io.StringIO()
    with redirect_stdout(table):
        report(results)
    print(table.getvalue(), end="")
    print(append("window_cost.py", table.getvalue()))
    print()
    for note in notes:
        print(note)
    print(f"total {time.perf_counter() - started:.0f} s, load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--explain", action="store_true",
                        help="also: PostgreSQL EXPLAIN ANALYZE and SQLite query plans of the 10,000-event reads")
    asyncio.run(main(parser.parse_args().explain))
