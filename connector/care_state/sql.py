"""The state in the tracker store's own SQL database (SQLite, PostgreSQL, MySQL...), in small
tables of its own, reached through the tracker store's engine.

A template reservation is a conditional INSERT: the primary key (sender_id, window_of, slot)
lets exactly one writer take each of the window's slots, on any number of instances, whatever
Rasa's lock store does.

A handoff is a row of `whatsapp_handoffs`: starting one is an INSERT the primary key lets one
caller win, ending it a DELETE, the window-closing mark an UPDATE conditional on the window.
A desk event is a row of `whatsapp_desk_events`, numbered by the database (`seq`). Storing one
inserts it, then counts the customer's rows in the same transaction (rolled back over the
limit): SQLite holds its write lock from the INSERT on, PostgreSQL first takes a transaction
advisory lock per customer, so the count is exact and a customer's rows commit in `seq` order
(elsewhere, e.g. MySQL, two racing writers of one customer may pass the limit by one). A claim
takes each customer's lowest `seq` row only, by an UPDATE conditional on its lease.

A template as Meta knows it is a row of `whatsapp_templates` (name, language). Storing what Meta
says is an INSERT, or where the row exists (ON CONFLICT, else the IntegrityError) an UPDATE
conditional on `updated_at <= ` the word's own: two instances writing at once keep the later word.

A customer's word on marketing messages (stopped, or resumed) is a row of
`whatsapp_marketing_stops`, written the same way (conditional on `at <=` the word's own); no row
means not stopped. Meta's pricing of an outbound message is a row of `whatsapp_pricing` by its
callback id, overwritten by each status that carries one.

A column added since a table was first made (`ADDED_COLUMNS`: `whatsapp_outbound.reason_code`)
is added by `create_schema` at startup with `ALTER TABLE ... ADD COLUMN`, nullable, so the rows
written before read back with None; a user who may not alter the table gets the statement to run.
"""

import asyncio
import hashlib
import json
import logging
import os
import queue
import threading
import time
from concurrent.futures import Future
from contextlib import contextmanager, suppress
from typing import Any, Awaitable, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.schema import CreateIndex, CreateTable

from connector.care_state.base import CareStateBackend
from connector.care_state.records import (
    STATUS_RANK, CustomerState, DeskEvent, Handoff, OutboundRecord, PendingTurn, Pricing, StatusWritten,
    TemplateState, choices_from_json, dump_json,
)

logger = logging.getLogger(__name__)

metadata = sa.MetaData()
customers = sa.Table(
    "whatsapp_customers", metadata,
    sa.Column("sender_id", sa.String(255), primary_key=True),
    sa.Column("last_inbound_at", sa.BigInteger),
    sa.Column("reply_number", sa.String(64)),
    sa.Column("closed_for_inbound", sa.BigInteger),
    sa.Column("opt_out_pending", sa.Boolean, nullable=False, default=False),
)
reservations = sa.Table(
    "whatsapp_template_reservations", metadata,
    sa.Column("sender_id", sa.String(255), primary_key=True),
    sa.Column("window_of", sa.BigInteger, primary_key=True),
    sa.Column("slot", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("callback_id", sa.String(64), nullable=False, unique=True),
)
outbound = sa.Table(
    "whatsapp_outbound", metadata,
    sa.Column("callback_id", sa.String(64), primary_key=True),
    sa.Column("sender_id", sa.String(255), nullable=False),
    sa.Column("decision", sa.String(16), nullable=False),
    sa.Column("window_of", sa.BigInteger, nullable=False),
    sa.Column("at", sa.Float(precision=53), nullable=False),
    sa.Column("created_at", sa.Float(precision=53), nullable=False),
    sa.Column("response", sa.String(255)),
    sa.Column("template", sa.String(512)),
    sa.Column("rendered_with", sa.Text),
    sa.Column("choices", sa.Text),
    sa.Column("wamid", sa.String(255)),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("status_rank", sa.Integer, nullable=False),
    sa.Column("error_code", sa.Integer),
    sa.Column("reason", sa.Text),
    sa.Column("fallback_of", sa.String(64)),
    sa.Column("reason_code", sa.String(32)),  # added later: `create_schema` adds it to older tables
    sa.Index("ix_whatsapp_outbound_sender", "sender_id", "created_at"),
    sa.Index("ix_whatsapp_outbound_wamid", "wamid"),
)

inbox = sa.Table(
    "whatsapp_inbox", metadata,
    sa.Column("turn_key", sa.String(255), primary_key=True),
    sa.Column("sender_id", sa.String(255), nullable=False),
    sa.Column("text", sa.Text, nullable=False),
    sa.Column("message_metadata", sa.Text, nullable=False),
    sa.Column("wa_timestamp", sa.BigInteger, nullable=False),
    sa.Column("phone_number_id", sa.String(64), nullable=False),
    sa.Column("received_at", sa.Float(precision=53), nullable=False),
    sa.Column("state", sa.String(8), nullable=False),
    sa.Column("owner", sa.String(255)),
    sa.Column("lease_until", sa.Float(precision=53)),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("error", sa.Text),
    sa.Column("finished_at", sa.Float(precision=53)),
    sa.Index("ix_whatsapp_inbox_lease", "state", "lease_until"),
    sa.Index("ix_whatsapp_inbox_sender", "sender_id", "received_at"),
)

handoffs = sa.Table(
    "whatsapp_handoffs", metadata,
    sa.Column("sender_id", sa.String(255), primary_key=True),
    sa.Column("since", sa.Float(precision=53), nullable=False),
    sa.Column("reason", sa.Text),
    sa.Column("closing_sent_for", sa.BigInteger),
    sa.Index("ix_whatsapp_handoffs_since", "since"),
)
desk_events = sa.Table(
    "whatsapp_desk_events", metadata,
    # SQLite numbers only an INTEGER PRIMARY KEY; AUTOINCREMENT never reuses a delivered one's
    sa.Column("seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("event_id", sa.String(255), nullable=False, unique=True),
    sa.Column("sender_id", sa.String(255), nullable=False),
    sa.Column("body", sa.Text, nullable=False),
    sa.Column("created_at", sa.Float(precision=53), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("next_attempt_at", sa.Float(precision=53), nullable=False, default=0.0),
    sa.Column("error", sa.Text),
    sa.Column("owner", sa.String(255)),
    sa.Column("lease_until", sa.Float(precision=53)),
    sa.Index("ix_whatsapp_desk_events_sender", "sender_id", "seq"),
    sqlite_autoincrement=True,
)
templates = sa.Table(
    "whatsapp_templates", metadata,
    sa.Column("name", sa.String(512), primary_key=True),
    sa.Column("language", sa.String(32), primary_key=True),
    sa.Column("status", sa.String(32), nullable=False),
    sa.Column("category", sa.String(32), nullable=False),
    sa.Column("updated_at", sa.Float(precision=53), nullable=False),
)
marketing_stops = sa.Table(
    "whatsapp_marketing_stops", metadata,
    sa.Column("sender_id", sa.String(255), primary_key=True),
    sa.Column("stopped", sa.Boolean, nullable=False),
    sa.Column("at", sa.Float(precision=53), nullable=False),
)
pricing_table = sa.Table(
    "whatsapp_pricing", metadata,
    sa.Column("callback_id", sa.String(64), primary_key=True),
    sa.Column("category", sa.String(32)),
    sa.Column("billable", sa.Boolean),
    sa.Column("pricing_type", sa.String(64)),
)
_PRICING_CHUNK = 500  # ids per IN (...): well under every database's limit on bound parameters

# Rasa indexes `events` by sender_id alone: PostgreSQL then reads a customer's rows newest-first
# by scanning every row written since (other customers' too). These keep the window reads flat.
EVENT_INDEXES = {
    "ix_events_whatsapp_window": ("sender_id", "type_name", "id"),
    "ix_events_whatsapp_slots": ("sender_id", "type_name", "action_name", "id"),
}


_ON_CONFLICT = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}

# The statements of the hot paths (every outbound message, every status), built once with bind
# parameters: building a statement from values costs more than running it (coercions, a bind
# parameter per value, the cache key of each new object) and makes garbage for the collector.
_SELECT_CUSTOMER = sa.select(customers).where(customers.c.sender_id == sa.bindparam("b_sender_id"))
_SELECT_CUSTOMERS = sa.select(customers).where(customers.c.sender_id.in_(sa.bindparam("b_ids", expanding=True)))
_INSERT_OUTBOUND = sa.insert(outbound)
_SELECT_OUTBOUND = {
    "callback_id": sa.select(outbound).where(outbound.c.callback_id == sa.bindparam("b_find")),
    "wamid": sa.select(outbound).where(outbound.c.wamid == sa.bindparam("b_find")),
}
_TURN_DONE = sa.update(inbox).where(inbox.c.turn_key == sa.bindparam("b_key")).values(
    state="done", finished_at=sa.bindparam("b_finished_at"), owner=None, error=None)
_PRICING_VALUES = {"category": sa.bindparam("b_category"), "billable": sa.bindparam("b_billable", type_=sa.Boolean),
                   "pricing_type": sa.bindparam("b_pricing_type")}
_INSERT_PRICING_IF_NEW = sa.insert(pricing_table).prefix_with("OR IGNORE", dialect="sqlite").values(
    callback_id=sa.bindparam("b_callback_id"), **_PRICING_VALUES)
_UPDATE_PRICING = sa.update(pricing_table).where(pricing_table.c.callback_id == sa.bindparam("b_callback_id")).values(
    **_PRICING_VALUES)
_UPDATES: Dict[Tuple[str, bool, bool, bool], Any] = {}


def _update_outbound_statement(by: str, wamid: bool, error_code: bool, reason: bool) -> Any:
    """UPDATE of a record's status (found by callback id or wamid), moving it forward only; one
    statement per combination of what is set, built on first use."""
    key = (by, wamid, error_code, reason)
    statement = _UPDATES.get(key)
    if statement is None:
        values: Dict[str, Any] = {"status": sa.bindparam("b_status"), "status_rank": sa.bindparam("b_rank")}
        if wamid:
            values["wamid"] = sa.func.coalesce(outbound.c.wamid, sa.bindparam("b_wamid", type_=sa.String))
        if error_code:
            values["error_code"] = sa.bindparam("b_error_code")
        if reason:
            values["reason"] = sa.bindparam("b_reason")
        statement = _UPDATES[key] = sa.update(outbound).where(
            outbound.c[by] == sa.bindparam("b_find"), outbound.c.status_rank < sa.bindparam("b_rank")).values(**values)
    return statement


class _Exec:
    """A write that is one statement and its parameters, no result: the writer runs consecutive
    ones of the same statement as one `executemany`."""

    __slots__ = ("statement", "params")

    def __init__(self, statement: Any, params: Dict[str, Any]) -> None:
        self.statement = statement
        self.params = params

    def __call__(self, connection: Any) -> None:
        connection.execute(self.statement, self.params)


class SchemaError(RuntimeError):
    """The state's tables are missing and could not be created (or brought up to date)."""


# Columns added to tables that existing deployments created without them: (table, column), each
# added by `create_schema` when missing. Nullable, so rows written before it read as None.
ADDED_COLUMNS = ((outbound, "reason_code"),)


def add_column_statement(table: sa.Table, column: str, engine: sa.engine.Engine) -> str:
    """`ALTER TABLE ... ADD COLUMN ...` for a column of ours, in this database's dialect."""
    kind = table.c[column].type.compile(dialect=engine.dialect)
    return f"ALTER TABLE {table.name} ADD COLUMN {column} {kind}"


def ddl(engine: sa.engine.Engine) -> str:
    """The statements to create the state's tables, in this database's dialect."""
    statements = [str(CreateTable(table).compile(engine)).strip() for table in metadata.sorted_tables]
    statements += [str(CreateIndex(index).compile(engine)).strip()
                   for table in (outbound, inbox, handoffs, desk_events)
                   for index in sorted(table.indexes, key=lambda index: index.name)]
    return ";\n".join(statements) + ";"


# One lock per SQLite file in this process: every backend on the file writes under it.
_FILE_LOCKS: Dict[str, threading.RLock] = {}
_FILE_LOCKS_GUARD = threading.Lock()
_MAX_BATCH = 500
"""Writes committed together at most (a batch waits for nothing: it is what queued meanwhile)."""

Op = Callable[[Any], Any]
"""A write: statements on the connection it is given, inside a transaction it does not end."""


class _Item:
    """A queued call: its op, and the future its caller waits on (a thread's, or a loop's)."""

    __slots__ = ("op", "future", "loop")

    def __init__(self, op: Op, future: Any, loop: Optional[asyncio.AbstractEventLoop]) -> None:
        self.op = op
        self.future = future
        self.loop = loop

    def start(self) -> bool:
        """False if its caller gave up before it started (then it is not run, as in a thread pool)."""
        if self.loop is None:
            return self.future.set_running_or_notify_cancel()
        return not self.future.cancelled()  # read from another thread: at worst it runs for nobody


class _Settle:
    """Results of one batch: a thread's future at once, a loop's futures in ONE callback per loop
    (one wake-up of the loop for the whole batch, not one per call)."""

    def __init__(self) -> None:
        self._loops: Dict[asyncio.AbstractEventLoop, List[Tuple[Any, Any, Optional[BaseException]]]] = {}

    def __call__(self, item: _Item, result: Any = None, error: Optional[BaseException] = None) -> None:
        if item.loop is None:
            if error is not None:
                item.future.set_exception(error)
            else:
                item.future.set_result(result)
        else:
            self._loops.setdefault(item.loop, []).append((item.future, result, error))

    def flush(self) -> None:
        for loop, settled in self._loops.items():
            with suppress(RuntimeError):  # that loop is closed: nobody waits any more
                loop.call_soon_threadsafe(_settle_on_loop, settled)


def _settle_on_loop(settled: List[Tuple[Any, Any, Optional[BaseException]]]) -> None:
    for future, result, error in settled:
        if not future.done():
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)


class _Batches:
    """One thread taking queued calls and running each lot that queued meanwhile together."""

    def __init__(self, name: str, run: Callable[[List[_Item], _Settle], None], stopped: Callable[[], None]) -> None:
        self.name = name
        self._run = run
        self._stopped = stopped
        self._queue: "queue.SimpleQueue[Optional[_Item]]" = queue.SimpleQueue()
        self.thread: Optional[threading.Thread] = None
        self._guard = threading.Lock()
        self._closing = False
        self.sizes: List[int] = []
        """The sizes of the latest batches (the last 1,000), for tests and benchmarks."""

    def put(self, op: Op, loop: Optional[asyncio.AbstractEventLoop] = None) -> Any:
        """Queue `op`; its future (an asyncio one on `loop`, else a concurrent.futures one)."""
        future: Any = loop.create_future() if loop is not None else Future()
        with self._guard:  # with the thread's own exit check: nothing is queued for a thread that left
            self._queue.put(_Item(op, future, loop))
            if self.thread is None:
                self.thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
                self.thread.start()
        return future

    def close(self) -> None:
        """The thread stops once what was queued is done (a later call starts it again)."""
        with self._guard:
            if self.thread is not None and not self._closing:
                self._closing = True
                self._queue.put(None)

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                with self._guard:
                    if self._queue.empty():
                        self.thread, self._closing = None, False
                        self._stopped()
                        return
                self._queue.put(None)  # queued after the stop: done first, then the stop
                continue
            batch: List[_Item] = []
            while item is not None:
                if item.start():
                    batch.append(item)
                if len(batch) >= _MAX_BATCH:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            if batch:
                settle = _Settle()
                self._run(batch, settle)
                settle.flush()
                self.sizes = self.sizes[-999:] + [len(batch)]
            if item is None:
                self._queue.put(None)  # the stop, seen again once this batch is done


class _SqliteFile:
    """How the state reaches a SQLite file behind SQLAlchemy's NullPool (Rasa's SQLite tracker
    store). NullPool opens a new sqlite3 connection for every call, and every new connection
    parses the whole schema on its first statement (about 0.4 ms, more than the query itself);
    SQLite has one writer, whose waiters poll in its busy handler (sleeps of up to 100 ms, then
    "database is locked" after 5 s), so a few threads writing at once are slower than one; and
    every commit is an fsync (1-2 ms on this machine's disk).

    - each thread keeps ONE connection of the engine (its event listeners included) for its
      calls, dropped after an error;
    - every write of this process takes the file's lock, so they queue in order instead of
      polling SQLite's lock;
    - the hot single-row writes (`submit`, `combined`) go to ONE writer thread, which commits
      whatever writes queued while it was busy in one transaction: one commit (one fsync) for
      all of them, each caller's future done only once its write is committed. If that
      transaction fails, each write of it runs again alone, so one write's error is only its
      caller's. A write whose caller gave up before it started is not made (as in a thread pool).
    - the customer reads of the outbound path (`read`) go to ONE reader thread, which reads
      whatever customers were asked for meanwhile with one SELECT ... IN: each answer is read
      after its question was asked, so it is as fresh as a read of its own.

    Other processes, and Rasa's own writes, still meet these in SQLite's own locking."""

    def __init__(self, engine: sa.engine.Engine) -> None:
        self.engine = engine
        if not sa.event.contains(engine, "do_connect", _any_thread):
            sa.event.listen(engine, "do_connect", _any_thread)
        path = os.path.abspath(engine.url.database or "")
        with _FILE_LOCKS_GUARD:
            self.lock = _FILE_LOCKS.setdefault(path, threading.RLock())
        self._local = threading.local()
        self.writer = _Batches("care-state-writer", self._write, self._forget_connection)
        self.reader = _Batches("care-state-reader", self._read, self._forget_connection)
        self.commits = 0
        """Write transactions committed by the writer (a figure for tests and benchmarks)."""

    @staticmethod
    def applies_to(engine: sa.engine.Engine) -> bool:
        database = engine.url.database or ""
        return (engine.dialect.name == "sqlite" and isinstance(engine.pool, sa.pool.NullPool)
                and database not in ("", ":memory:") and "mode=memory" not in database)

    @contextmanager
    def connect(self) -> Iterator[Any]:
        connection = getattr(self._local, "connection", None)
        if connection is None or connection.closed or connection.invalidated:
            connection = self._local.connection = self.engine.connect()
            if threading.current_thread() is self.writer.thread:
                connection.exec_driver_sql("PRAGMA synchronous=NORMAL")  # see `_write_ahead_log`
        try:
            yield connection
        except IntegrityError:  # a conflict the caller handles: the connection is fine
            raise
        except BaseException:
            self._forget_connection()
            with suppress(Exception):
                connection.close()
            raise

    def _forget_connection(self) -> None:
        self._local.connection = None

    @contextmanager
    def begin(self) -> Iterator[Any]:
        with self.lock, self.connect() as connection, connection.begin():
            yield connection

    def submit(self, op: Op, loop: Optional[asyncio.AbstractEventLoop] = None) -> Any:
        """Queue a write for the writer thread; its future is done once it is committed."""
        return self.writer.put(op, loop)

    def combined(self, op: Op) -> Any:
        """A write through the writer, waited for (from a worker thread)."""
        if threading.current_thread() is self.writer.thread:
            with self.begin() as connection:
                return op(connection)
        return self.writer.put(op).result()

    def read(self, op: Op, loop: Optional[asyncio.AbstractEventLoop] = None) -> Any:
        """Queue a read for the reader thread (a `_CustomerRead` is read with the others)."""
        return self.reader.put(op, loop)

    def close(self) -> None:
        self.writer.close()
        self.reader.close()

    def _write(self, batch: List[_Item], settle: _Settle) -> None:
        with self.lock:
            if len(batch) > 1:
                try:
                    with self.connect() as connection, connection.begin():
                        results = _run_together(connection, [item.op for item in batch])
                except Exception:  # each alone: only the write that fails fails
                    pass
                else:
                    self.commits += 1
                    for item, result in zip(batch, results):
                        settle(item, result)
                    return
            for item in batch:
                try:
                    with self.connect() as connection, connection.begin():
                        result = item.op(connection)
                except BaseException as error:  # noqa: B902 - the caller gets it, the writer goes on
                    settle(item, error=error)
                else:
                    self.commits += 1
                    settle(item, result)

    def _read(self, batch: List[_Item], settle: _Settle) -> None:
        customers_asked = [item for item in batch if isinstance(item.op, _CustomerRead)]
        others = [item for item in batch if not isinstance(item.op, _CustomerRead)]
        if len(customers_asked) > 1:
            try:
                ids = list(dict.fromkeys(item.op.sender_id for item in customers_asked))
                found: Dict[str, CustomerState] = {}
                with self.connect() as connection:
                    for start in range(0, len(ids), _PRICING_CHUNK):
                        for row in connection.execute(_SELECT_CUSTOMERS, {"b_ids": ids[start:start + _PRICING_CHUNK]}):
                            found[row.sender_id] = _customer(row.sender_id, row)
            except Exception:  # each alone: only the read that fails fails
                others = batch
            else:
                for item in customers_asked:
                    settle(item, found.get(item.op.sender_id) or CustomerState(item.op.sender_id))
        else:
            others = batch
        for item in others:
            try:
                with self.connect() as connection:
                    result = item.op(connection)
            except BaseException as error:  # noqa: B902
                settle(item, error=error)
            else:
                settle(item, result)


class _CustomerRead:
    """The read of one customer's state (the reader reads those asked for together with one IN)."""

    __slots__ = ("sender_id",)

    def __init__(self, sender_id: str) -> None:
        self.sender_id = sender_id

    def __call__(self, connection: Any) -> CustomerState:
        return _customer(self.sender_id, connection.execute(_SELECT_CUSTOMER, {"b_sender_id": self.sender_id}).first())


def _customer(sender_id: str, row: Any) -> CustomerState:
    if row is None:
        return CustomerState(sender_id)
    return CustomerState(sender_id, row.last_inbound_at, row.reply_number, row.closed_for_inbound,
                         bool(row.opt_out_pending))


def _run_together(connection: Any, ops: List[Op]) -> List[Any]:
    """The ops in order on one connection; a run of `_Exec`s of one statement as one executemany."""
    results: List[Any] = []
    start = 0
    while start < len(ops):
        op = ops[start]
        end = start + 1
        if isinstance(op, _Exec):
            while end < len(ops) and isinstance(ops[end], _Exec) and ops[end].statement is op.statement:
                end += 1
        if end - start > 1:
            connection.execute(op.statement, [each.params for each in ops[start:end]])
            results += [None] * (end - start)
        else:
            results.append(op(connection))
        start = end
    return results


def _any_thread(dialect: Any, record: Any, cargs: Any, cparams: Dict[str, Any]) -> None:
    """A thread's connection is used by that thread only, but it is let go of (closed) wherever
    the garbage collector finds it: pysqlite must not refuse that."""
    cparams["check_same_thread"] = False


def _executes(statement: Any) -> Op:
    def op(connection: Any) -> None:
        connection.execute(statement)

    return op


class _OtherDatabase:
    """PostgreSQL, MySQL...: the engine's own pool, a transaction of its own for each write."""

    def __init__(self, engine: sa.engine.Engine) -> None:
        self.engine = engine

    def connect(self) -> Any:
        return self.engine.connect()

    def begin(self) -> Any:
        return self.engine.begin()

    def combined(self, op: Op) -> Any:
        with self.engine.begin() as connection:
            return op(connection)

    def close(self) -> None:
        pass


class SqlBackend(CareStateBackend):
    def __init__(self, engine: sa.engine.Engine, events_table: Optional[sa.Table] = None) -> None:
        self.engine = engine
        self.events_table = events_table
        self.on_conflict = _ON_CONFLICT.get(engine.dialect.name)
        """The dialect's INSERT ... ON CONFLICT, if it has one (None: UPDATE, then INSERT)."""
        self.access = _SqliteFile(engine) if _SqliteFile.applies_to(engine) else _OtherDatabase(engine)

    def _connect(self) -> Any:
        """A connection for reads (outside a transaction)."""
        return self.access.connect()

    def _begin(self) -> Any:
        """A write transaction of its own (on SQLite in the file's write order)."""
        return self.access.begin()

    # The hot writes, each one op (a statement or two on a connection it is given): on SQLite
    # they go through the writer thread, group-committed; elsewhere a transaction each.
    QUEUED = ("note_inbound", "close_window", "set_opt_out_pending", "release_template", "add_outbound",
              "update_outbound", "record_status", "turn_done", "set_pricing")

    def queued(self, name: str) -> Optional[Callable[..., Optional[Awaitable[Any]]]]:
        if (name not in self.QUEUED and name != "customer") or not isinstance(self.access, _SqliteFile):
            return None
        if getattr(type(self), name) is not getattr(SqlBackend, name):
            return None  # a subclass's own version: called as it is, in a worker thread
        access = self.access
        if name == "customer":
            return lambda sender_id: access.read(_CustomerRead(sender_id), asyncio.get_running_loop())

        def queue(*args: Any, **kwargs: Any) -> Optional[Awaitable[Any]]:
            op = getattr(self, f"_{name}_op")(*args, **kwargs)
            return access.submit(op, asyncio.get_running_loop()) if op is not None else None

        return queue

    def close(self) -> None:
        self.access.close()

    def _write(self, op: Optional[Op], otherwise: Callable[[], Any]) -> Any:
        return self.access.combined(op) if op is not None else otherwise()

    def create_schema(self) -> None:
        try:
            metadata.create_all(self.engine, checkfirst=True)
        except sa.exc.SQLAlchemyError as error:
            raise SchemaError(
                f"The WhatsApp care-window tables could not be created ({type(error).__name__}: {error}). "
                f"Create them once with a user that may (README, 'Care-window state'):\n{ddl(self.engine)}"
            ) from error
        self._add_columns()
        if self.events_table is not None:
            self._index_events()
        if isinstance(self.access, _SqliteFile):
            self._write_ahead_log()

    def _write_ahead_log(self) -> None:
        """Rasa reads and saves trackers with SQL on its event loop. In SQLite's default journal
        mode a reader waits while any writer commits, so each of the channel's commits (its
        writer thread's, off the loop) stalled the loop for as long. In WAL mode readers never
        wait for a writer and a commit appends to the log; the mode is kept in the file, for
        every connection.

        The writer thread's connection also commits without waiting for the disk (synchronous
        NORMAL, per connection): its group commits then hold SQLite's one write lock for
        microseconds instead of an fsync, so Rasa's own saves on the loop rarely wait for it.
        Such a commit survives the process crashing (the OS has it), not the machine losing power;
        the inbox's write before the webhook's 200 runs elsewhere and keeps waiting for the disk."""
        with self.engine.connect() as connection:
            mode = connection.exec_driver_sql("PRAGMA journal_mode=WAL").scalar()
        if str(mode).lower() != "wal":
            logger.warning("The SQLite tracker store stays in journal mode %s (WAL refused): Rasa's reads on "
                           "the event loop wait for each commit", mode)

    def _add_columns(self) -> None:
        """Tables made by an earlier version lack the columns added since: add them (nullable,
        so the old rows stay readable). Another instance starting at the same time may add one
        first: its failure is then no failure."""
        for table, column in ADDED_COLUMNS:
            if column in self._columns(table):
                continue
            statement = add_column_statement(table, column, self.engine)
            try:
                with self.engine.begin() as connection:
                    connection.execute(sa.text(statement))
            except sa.exc.SQLAlchemyError as error:
                if column in self._columns(table):  # added by another instance meanwhile
                    continue
                raise SchemaError(
                    f"The WhatsApp care-window table {table.name} lacks the column {column} and it could not "
                    f"be added ({type(error).__name__}: {error}). Add it once with a user that may "
                    f"(README, 'Care-window state'):\n{statement};"
                ) from error
            logger.info("Added column %s to %s", column, table.name)

    def _columns(self, table: sa.Table) -> set:
        return {column["name"] for column in sa.inspect(self.engine).get_columns(table.name)}

    def _index_events(self) -> None:
        """Only speed: without the rights to create them the reads are correct, just slower."""
        existing = {index["name"] for index in sa.inspect(self.engine).get_indexes(self.events_table.name)}
        events = self.events_table.to_metadata(sa.MetaData())  # never add to Rasa's own table
        for name, columns in EVENT_INDEXES.items():
            if name in existing:
                continue
            index = sa.Index(name, *(events.c[column] for column in columns))
            try:
                index.create(self.engine)
            except sa.exc.SQLAlchemyError as error:
                logger.warning("Could not create index %s on %s (window reads get slower with history): %s",
                               name, self.events_table.name, error)

    def customer(self, sender_id: str) -> CustomerState:
        with self._connect() as connection:
            return _CustomerRead(sender_id)(connection)

    def _upsert(self, sender_id: str, values: Dict[str, Any], condition: Any = None) -> None:
        """UPDATE where the condition holds; INSERT if the customer has no row yet. One statement
        where the database has INSERT ... ON CONFLICT (SQLite, PostgreSQL): one commit, which is
        what a write costs on SQLite."""
        op = self._upsert_op(sender_id, values, condition)
        if op is not None:
            self.access.combined(op)
            return
        where = customers.c.sender_id == sender_id
        statement = sa.update(customers).where(where if condition is None else sa.and_(where, condition))
        for _ in range(2):
            with self._begin() as connection:
                if connection.execute(statement.values(**values)).rowcount:
                    return
                if connection.execute(sa.select(customers.c.sender_id).where(where)).first():
                    return  # the row exists and the condition says no
            try:
                with self._begin() as connection:
                    connection.execute(sa.insert(customers).values(**{"sender_id": sender_id, "opt_out_pending": False, **values}))
                return
            except IntegrityError:  # another writer inserted it first: update theirs
                continue

    def _upsert_in(self, connection: Any, sender_id: str, values: Dict[str, Any], condition: Any) -> None:
        statement = self.on_conflict(customers).values(**{"sender_id": sender_id, "opt_out_pending": False, **values})
        connection.execute(statement.on_conflict_do_update(
            index_elements=[customers.c.sender_id], set_=values, where=condition))

    def _upsert_op(self, sender_id: str, values: Dict[str, Any], condition: Any = None) -> Optional[Op]:
        if self.on_conflict is None:
            return None  # UPDATE, then INSERT, each a transaction of its own
        return lambda connection: self._upsert_in(connection, sender_id, values, condition)

    def note_inbound(self, sender_id: str, timestamp: int, phone_number_id: Optional[str]) -> None:
        self._upsert(sender_id, *_inbound(timestamp, phone_number_id))

    def _note_inbound_op(self, sender_id: str, timestamp: int, phone_number_id: Optional[str]) -> Optional[Op]:
        return self._upsert_op(sender_id, *_inbound(timestamp, phone_number_id))

    def close_window(self, sender_id: str, inbound_at: int) -> None:
        self._upsert(sender_id, *_closed(inbound_at))

    def _close_window_op(self, sender_id: str, inbound_at: int) -> Optional[Op]:
        return self._upsert_op(sender_id, *_closed(inbound_at))

    def set_opt_out_pending(self, sender_id: str, pending: bool) -> None:
        self._upsert(sender_id, {"opt_out_pending": pending})

    def _set_opt_out_pending_op(self, sender_id: str, pending: bool) -> Optional[Op]:
        return self._upsert_op(sender_id, {"opt_out_pending": pending})

    def templates_reserved(self, sender_id: str, window_of: int) -> int:
        query = sa.select(sa.func.count()).select_from(reservations).where(
            reservations.c.sender_id == sender_id, reservations.c.window_of == window_of)
        with self._connect() as connection:
            return int(connection.execute(query).scalar() or 0)

    def reserve_template(self, record: OutboundRecord, limit: int) -> bool:
        for slot in range(limit):
            try:
                with self._begin() as connection:
                    connection.execute(sa.insert(reservations).values(
                        sender_id=record.sender_id, window_of=record.window_of, slot=slot,
                        callback_id=record.callback_id))
                    connection.execute(sa.insert(outbound).values(**_row(record)))
                return True
            except IntegrityError:  # that slot is taken: try the next
                continue
        return False

    def release_template(self, record: OutboundRecord) -> None:
        self.access.combined(self._release_template_op(record))

    def _release_template_op(self, record: OutboundRecord) -> Op:
        statement = sa.delete(reservations).where(reservations.c.callback_id == record.callback_id)
        return _executes(statement)

    def add_outbound(self, record: OutboundRecord) -> None:
        self.access.combined(self._add_outbound_op(record))

    def _add_outbound_op(self, record: OutboundRecord) -> Op:
        return _Exec(_INSERT_OUTBOUND, _row(record))

    def update_outbound(self, status, callback_id=None, wamid=None, error_code=None, reason=None):
        return self.access.combined(self._update_outbound_op(status, callback_id, wamid, error_code, reason))

    def _update_outbound_op(self, status: str, callback_id: Optional[str] = None, wamid: Optional[str] = None,
                            error_code: Optional[int] = None, reason: Optional[str] = None) -> Op:
        if callback_id is None and wamid is None:
            return lambda connection: None
        return lambda connection: self._update_outbound_in(
            connection, status, callback_id, wamid, error_code, reason, fetch=True)[1]

    def record_status(self, status, callback_id=None, wamid=None, error_code=None, reason=None, pricing=None,
                      fetch=True):
        """One transaction (group-committed on SQLite): the pricing, then the status."""
        return self._write(self._record_status_op(status, callback_id, wamid, error_code, reason, pricing, fetch),
                           lambda: super(SqlBackend, self).record_status(
                               status, callback_id, wamid, error_code, reason, pricing, fetch))

    def _record_status_op(self, status: str, callback_id: Optional[str] = None, wamid: Optional[str] = None,
                          error_code: Optional[int] = None, reason: Optional[str] = None,
                          pricing: Optional[Pricing] = None, fetch: bool = True) -> Optional[Op]:
        if self.on_conflict is None:  # pricing as UPDATE, then INSERT: each a transaction of its own
            return None
        if callback_id is None and wamid is None:
            return lambda connection: StatusWritten(False)

        def write(connection: Any) -> StatusWritten:
            first = self._set_pricing_in(connection, callback_id, pricing) if pricing is not None and callback_id else False
            changed, record = self._update_outbound_in(connection, status, callback_id, wamid, error_code, reason, fetch)
            return StatusWritten(changed, record, first)

        return write

    def _update_outbound_in(self, connection: Any, status: str, callback_id: Optional[str], wamid: Optional[str],
                            error_code: Optional[int], reason: Optional[str],
                            fetch: bool) -> Tuple[bool, Optional[OutboundRecord]]:
        """Whether this call moved the record forward, and the record then (read back with `fetch`)."""
        by = "callback_id" if callback_id else "wamid"
        params: Dict[str, Any] = {"b_status": status, "b_rank": STATUS_RANK[status], "b_find": callback_id or wamid}
        if wamid is not None:
            params["b_wamid"] = wamid
        if error_code is not None:
            params["b_error_code"] = error_code
        if reason is not None:
            params["b_reason"] = reason
        statement = _update_outbound_statement(by, wamid is not None, error_code is not None, reason is not None)
        changed = connection.execute(statement, params).rowcount
        if not changed or not fetch:
            return bool(changed), None
        row = connection.execute(_SELECT_OUTBOUND[by], {"b_find": params["b_find"]}).first()
        return True, _record(row) if row is not None else None

    def outbound(self, callback_id: str) -> Optional[OutboundRecord]:
        with self._connect() as connection:
            row = connection.execute(_SELECT_OUTBOUND["callback_id"], {"b_find": callback_id}).first()
        return _record(row) if row is not None else None

    def recent_outbound(self, sender_id: str, limit: int) -> List[OutboundRecord]:
        query = (sa.select(outbound).where(outbound.c.sender_id == sender_id)
                 .order_by(outbound.c.created_at.desc()).limit(limit))
        with self._connect() as connection:
            return [_record(row) for row in connection.execute(query)]

    # --- the inbox ---------------------------------------------------------------------------

    def accept_turns(self, turns: Sequence[PendingTurn], owner: str, lease_until: float) -> List[str]:
        turns = list({turn.key: turn for turn in turns}.values())
        lease = {"state": "pending", "owner": owner, "lease_until": lease_until, "attempts": 0, "error": None,
                 "finished_at": None}
        for _ in range(3):  # a concurrent insert of the same key: read again, it is theirs
            try:
                with self._begin() as connection:
                    known = dict(connection.execute(sa.select(inbox.c.turn_key, inbox.c.state).where(
                        inbox.c.turn_key.in_([turn.key for turn in turns]))).all())
                    fresh = [turn for turn in turns if turn.key not in known]
                    if fresh:
                        connection.execute(sa.insert(inbox), [{**_turn_row(turn), **lease} for turn in fresh])
                    failed = []  # handled again, leased to this owner; per key: a racing writer takes it or we do
                    for key in (key for key, state in known.items() if state == "failed"):
                        if connection.execute(sa.update(inbox).where(
                                inbox.c.turn_key == key, inbox.c.state == "failed").values(**lease)).rowcount:
                            failed.append(key)
                    accepted = [turn for turn in turns if turn.key not in known or turn.key in failed]
                    latest = _latest_per_customer(accepted)
                    if self.on_conflict is not None:  # the window opens in the same commit
                        for sender_id, (timestamp, number) in latest.items():
                            self._upsert_in(connection, sender_id, *_inbound(timestamp, number))
                break
            except IntegrityError:
                continue
        else:
            raise RuntimeError("the inbox kept changing under accept_turns")
        if self.on_conflict is None:
            for sender_id, (timestamp, number) in latest.items():
                self.note_inbound(sender_id, timestamp, number)
        return [turn.key for turn in accepted]

    def renew_leases(self, keys: Sequence[str], owner: str, lease_until: float) -> None:
        if not keys:
            return
        with self._begin() as connection:
            connection.execute(sa.update(inbox).where(inbox.c.turn_key.in_(list(keys)), inbox.c.owner == owner,
                                                      inbox.c.state == "pending").values(lease_until=lease_until))

    def claim_turns(self, owner, now, lease_until, limit, take_over=None):
        expired = sa.and_(inbox.c.state == "pending", inbox.c.lease_until < now)
        if take_over is not None:
            expired = sa.or_(expired, sa.and_(inbox.c.state == "pending", inbox.c.owner == take_over))
        with self._connect() as connection:
            senders = [row.sender_id for row in connection.execute(
                sa.select(inbox.c.sender_id).where(expired).group_by(inbox.c.sender_id)
                .order_by(sa.func.min(inbox.c.received_at)).limit(limit))]
        claimed: List[PendingTurn] = []
        for sender_id in senders:
            mine = sa.and_(inbox.c.sender_id == sender_id, inbox.c.state == "pending")
            with self._begin() as connection:
                # one conditional UPDATE per customer: exactly one instance takes all of them
                taken = connection.execute(sa.update(inbox).where(mine, expired).values(owner=owner, lease_until=lease_until)).rowcount
                if taken:
                    connection.execute(sa.update(inbox).where(mine).values(owner=owner, lease_until=lease_until))
                    claimed += [_turn(row) for row in connection.execute(
                        sa.select(inbox).where(mine).order_by(inbox.c.received_at))]
            if len(claimed) >= limit:
                break
        return claimed

    def turn_failed(self, key: str, attempts: int, error: str, final: bool) -> None:
        values: Dict[str, Any] = {"attempts": attempts, "error": error}
        if final:
            values.update(state="failed", finished_at=time.time(), owner=None)
        with self._begin() as connection:
            connection.execute(sa.update(inbox).where(inbox.c.turn_key == key).values(**values))

    def turn_done(self, key: str) -> None:
        self.access.combined(self._turn_done_op(key))

    def _turn_done_op(self, key: str) -> Op:
        return _Exec(_TURN_DONE, {"b_key": key, "b_finished_at": time.time()})

    def turns_of(self, sender_id: str, limit: int) -> List[PendingTurn]:
        query = sa.select(inbox).where(inbox.c.sender_id == sender_id).order_by(inbox.c.received_at.desc()).limit(limit)
        with self._connect() as connection:
            return [_turn(row) for row in connection.execute(query)]

    def forget_turns(self, finished_before: float) -> int:
        with self._begin() as connection:
            return connection.execute(sa.delete(inbox).where(
                inbox.c.state != "pending", inbox.c.finished_at < finished_before)).rowcount


    # --- handoffs and the desk's events ------------------------------------------------------

    def start_handoff(self, sender_id: str, since: float, reason: Optional[str]) -> bool:
        row = {"sender_id": sender_id, "since": since, "reason": reason, "closing_sent_for": None}
        if self.on_conflict is not None:
            with self._begin() as connection:
                return connection.execute(self.on_conflict(handoffs).values(**row).on_conflict_do_nothing(
                    index_elements=[handoffs.c.sender_id])).rowcount == 1
        try:
            with self._begin() as connection:
                connection.execute(sa.insert(handoffs).values(**row))
            return True
        except IntegrityError:  # open already
            return False

    def end_handoff(self, sender_id: str) -> bool:
        with self._begin() as connection:
            return connection.execute(sa.delete(handoffs).where(handoffs.c.sender_id == sender_id)).rowcount == 1

    def _handoffs(self) -> Any:
        return sa.select(handoffs, customers.c.last_inbound_at).select_from(
            handoffs.outerjoin(customers, customers.c.sender_id == handoffs.c.sender_id))

    def handoffs(self, limit: int) -> List[Handoff]:
        query = self._handoffs().order_by(handoffs.c.since, handoffs.c.sender_id).limit(max(limit, 0))
        with self._connect() as connection:
            return [_handoff(row) for row in connection.execute(query)]

    def handoff(self, sender_id: str) -> Optional[Handoff]:
        with self._connect() as connection:
            row = connection.execute(self._handoffs().where(handoffs.c.sender_id == sender_id)).first()
        return _handoff(row) if row is not None else None

    def mark_window_closing(self, sender_id: str, window_of: int) -> bool:
        older = sa.or_(handoffs.c.closing_sent_for.is_(None), handoffs.c.closing_sent_for < window_of)
        with self._begin() as connection:
            return connection.execute(sa.update(handoffs).where(handoffs.c.sender_id == sender_id, older)
                                      .values(closing_sent_for=window_of)).rowcount == 1

    def add_desk_event(self, event: DeskEvent, limit: int) -> bool:
        row = {"event_id": event.event_id, "sender_id": event.sender_id, "body": dump_json(dict(event.body)),
               "created_at": event.created_at, "attempts": event.attempts,
               "next_attempt_at": event.next_attempt_at, "error": event.error}
        try:
            with self._begin() as connection:
                if self.engine.dialect.name == "postgresql":  # one writer per customer until the commit
                    connection.execute(sa.select(sa.func.pg_advisory_xact_lock(_lock_key(event.sender_id))))
                if self.on_conflict is not None:
                    statement = self.on_conflict(desk_events).values(**row).on_conflict_do_nothing(
                        index_elements=[desk_events.c.event_id])
                    if not connection.execute(statement).rowcount:
                        return True  # stored already
                else:
                    connection.execute(sa.insert(desk_events).values(**row))
                stored = connection.execute(sa.select(sa.func.count()).select_from(desk_events).where(
                    desk_events.c.sender_id == event.sender_id)).scalar()
                if stored > limit:
                    raise _Full()  # rolls the insert back
            return True
        except _Full:
            return False
        except IntegrityError:  # the event id is stored already
            return True

    def claim_desk_events(self, owner: str, now: float, lease_until: float, limit: int) -> List[DeskEvent]:
        earlier = desk_events.alias("earlier")
        head = ~sa.exists().where(earlier.c.sender_id == desk_events.c.sender_id, earlier.c.seq < desk_events.c.seq)
        claimable = sa.and_(desk_events.c.next_attempt_at <= now, sa.or_(
            desk_events.c.lease_until.is_(None), desk_events.c.lease_until < now, desk_events.c.owner == owner))
        query = sa.select(desk_events.c.seq).where(claimable, head).order_by(desk_events.c.seq).limit(max(limit, 0))
        with self._begin() as connection:
            candidates = [row.seq for row in connection.execute(query)]
            # a head stays the head until delivered (later rows get higher numbers), so only its
            # lease is checked again: exactly one claimer's UPDATE changes it
            taken = [seq for seq in candidates if connection.execute(
                sa.update(desk_events).where(desk_events.c.seq == seq, claimable)
                .values(owner=owner, lease_until=lease_until)).rowcount]
            if not taken:
                return []
            rows = connection.execute(sa.select(desk_events).where(desk_events.c.seq.in_(taken))
                                      .order_by(desk_events.c.seq)).all()
        return [_desk_event(row) for row in rows]

    def desk_event_delivered(self, event_id: str) -> None:
        with self._begin() as connection:
            connection.execute(sa.delete(desk_events).where(desk_events.c.event_id == event_id))

    def desk_event_failed(self, event_id: str, attempts: int, error: str, next_attempt_at: float) -> None:
        with self._begin() as connection:
            connection.execute(sa.update(desk_events).where(desk_events.c.event_id == event_id).values(
                attempts=attempts, error=error, next_attempt_at=next_attempt_at, owner=None, lease_until=None))

    def desk_backlog(self, sender_id: str, limit: int) -> List[DeskEvent]:
        query = (sa.select(desk_events).where(desk_events.c.sender_id == sender_id)
                 .order_by(desk_events.c.seq).limit(max(limit, 0)))
        with self._connect() as connection:
            return [_desk_event(row) for row in connection.execute(query)]

    # --- templates as Meta knows them ---------------------------------------------------------

    def update_template(self, template: TemplateState, status: bool = True, category: bool = True) -> bool:
        at = float(template.updated_at)
        values: Dict[str, Any] = {"updated_at": at}
        if status:
            values["status"] = template.status
        if category:
            values["category"] = template.category
        row = {"name": template.name, "language": template.language, "status": "", "category": "", **values}
        not_later = templates.c.updated_at <= at
        if self.on_conflict is not None:
            statement = self.on_conflict(templates).values(**row).on_conflict_do_update(
                index_elements=[templates.c.name, templates.c.language], set_=values, where=not_later)
            with self._begin() as connection:
                return connection.execute(statement).rowcount == 1
        try:
            with self._begin() as connection:
                connection.execute(sa.insert(templates).values(**row))
            return True
        except IntegrityError:  # stored already (rows are never deleted): the later word wins
            pass
        with self._begin() as connection:
            return connection.execute(sa.update(templates).where(
                templates.c.name == template.name, templates.c.language == template.language, not_later,
            ).values(**values)).rowcount == 1

    def templates(self) -> List[TemplateState]:
        query = sa.select(templates).order_by(templates.c.name, templates.c.language)
        with self._connect() as connection:
            return [TemplateState(name=row.name, language=row.language, status=row.status, category=row.category,
                                  updated_at=row.updated_at) for row in connection.execute(query)]

    # --- marketing stops and pricing ------------------------------------------------------------

    def set_marketing_stopped(self, sender_id: str, stopped: bool, at: float) -> bool:
        at = float(at)
        values: Dict[str, Any] = {"stopped": bool(stopped), "at": at}
        not_later = marketing_stops.c.at <= at
        if self.on_conflict is not None:
            statement = self.on_conflict(marketing_stops).values(sender_id=sender_id, **values).on_conflict_do_update(
                index_elements=[marketing_stops.c.sender_id], set_=values, where=not_later)
            with self._begin() as connection:
                return connection.execute(statement).rowcount == 1
        try:
            with self._begin() as connection:
                connection.execute(sa.insert(marketing_stops).values(sender_id=sender_id, **values))
            return True
        except IntegrityError:  # stored already (rows are never deleted): the later word wins
            pass
        with self._begin() as connection:
            return connection.execute(sa.update(marketing_stops).where(
                marketing_stops.c.sender_id == sender_id, not_later).values(**values)).rowcount == 1

    def marketing_stopped(self, sender_id: str) -> bool:
        query = sa.select(marketing_stops.c.stopped).where(marketing_stops.c.sender_id == sender_id)
        with self._connect() as connection:
            return bool(connection.execute(query).scalar())

    def _set_pricing_op(self, callback_id: str, pricing: Pricing) -> Optional[Op]:
        if self.on_conflict is None:
            return None
        values: Dict[str, Any] = {"category": pricing.category, "billable": pricing.billable,
                                  "pricing_type": pricing.pricing_type}
        statement = self.on_conflict(pricing_table).values(callback_id=callback_id, **values).on_conflict_do_update(
            index_elements=[pricing_table.c.callback_id], set_=values)
        return _executes(statement)

    def set_pricing(self, callback_id: str, pricing: Pricing) -> None:
        op = self._set_pricing_op(callback_id, pricing)
        if op is not None:
            self.access.combined(op)
            return
        values: Dict[str, Any] = {"category": pricing.category, "billable": pricing.billable,
                                  "pricing_type": pricing.pricing_type}
        update = sa.update(pricing_table).where(pricing_table.c.callback_id == callback_id).values(**values)
        with self._begin() as connection:  # a later status of the message: its row exists
            if connection.execute(update).rowcount:
                return
        try:
            with self._begin() as connection:
                connection.execute(sa.insert(pricing_table).values(callback_id=callback_id, **values))
        except IntegrityError:  # another writer inserted it first: the latest word overwrites
            with self._begin() as connection:
                connection.execute(update)

    def _set_pricing_in(self, connection: Any, callback_id: str, pricing: Pricing) -> bool:
        """In the caller's transaction (a database with ON CONFLICT): whether it is the first stored.
        SQLite: INSERT OR IGNORE, then UPDATE if it was there (statements built once; this
        process's writes are one at a time, and SQLite's write lock is held from the first)."""
        params = {"b_callback_id": callback_id, "b_category": pricing.category, "b_billable": pricing.billable,
                  "b_pricing_type": pricing.pricing_type}
        if self.engine.dialect.name == "sqlite":
            if connection.execute(_INSERT_PRICING_IF_NEW, params).rowcount == 1:
                return True
            connection.execute(_UPDATE_PRICING, params)
            return False
        values: Dict[str, Any] = {"category": pricing.category, "billable": pricing.billable,
                                  "pricing_type": pricing.pricing_type}
        insert = self.on_conflict(pricing_table).values(callback_id=callback_id, **values).on_conflict_do_nothing(
            index_elements=[pricing_table.c.callback_id])
        if connection.execute(insert).rowcount == 1:
            return True
        connection.execute(_UPDATE_PRICING, params)
        return False

    def pricing_of(self, callback_ids: Sequence[str]) -> Dict[str, Pricing]:
        ids = list(dict.fromkeys(callback_ids))
        found: Dict[str, Pricing] = {}
        with self._connect() as connection:
            for start in range(0, len(ids), _PRICING_CHUNK):
                chunk = ids[start:start + _PRICING_CHUNK]
                query = sa.select(pricing_table).where(pricing_table.c.callback_id.in_(chunk))
                for row in connection.execute(query):
                    found[row.callback_id] = Pricing(
                        category=row.category, billable=None if row.billable is None else bool(row.billable),
                        pricing_type=row.pricing_type)
        return found


class _Full(Exception):
    """The customer's backlog is full: the event's INSERT is rolled back."""


def _lock_key(sender_id: str) -> int:
    """A customer's PostgreSQL advisory lock: a signed 64-bit number from their id."""
    return int.from_bytes(hashlib.blake2b(f"whatsapp_desk_events:{sender_id}".encode(), digest_size=8).digest(),
                          "big", signed=True)


def _handoff(row: Any) -> Handoff:
    return Handoff(sender_id=row.sender_id, since=row.since, reason=row.reason,
                   closing_sent_for=row.closing_sent_for, last_inbound_at=row.last_inbound_at)


def _desk_event(row: Any) -> DeskEvent:
    return DeskEvent(event_id=row.event_id, sender_id=row.sender_id, body=json.loads(row.body),
                     created_at=row.created_at, seq=row.seq, attempts=row.attempts,
                     next_attempt_at=row.next_attempt_at, error=row.error)


def _closed(inbound_at: int) -> Tuple[Dict[str, Any], Any]:
    """Meta's word that the window opened at `inbound_at` closed: never for an older window."""
    older = sa.or_(customers.c.closed_for_inbound.is_(None), customers.c.closed_for_inbound < inbound_at)
    return {"closed_for_inbound": inbound_at}, older


def _inbound(timestamp: int, phone_number_id: Optional[str]) -> Tuple[Dict[str, Any], Any]:
    """A customer message's write to their row: raise the last message time, never lower it."""
    older = sa.or_(customers.c.last_inbound_at.is_(None), customers.c.last_inbound_at < timestamp)
    return {"last_inbound_at": timestamp, "reply_number": phone_number_id}, older


def _latest_per_customer(turns: Sequence[PendingTurn]) -> Dict[str, Tuple[int, str]]:
    latest: Dict[str, Tuple[int, str]] = {}
    for turn in turns:
        if turn.sender_id not in latest or latest[turn.sender_id][0] < turn.timestamp:
            latest[turn.sender_id] = (turn.timestamp, turn.phone_number_id)
    return latest


def _turn_row(turn: PendingTurn) -> Dict[str, Any]:
    return {
        "turn_key": turn.key, "sender_id": turn.sender_id, "text": turn.text,
        "message_metadata": dump_json(dict(turn.metadata)), "wa_timestamp": turn.timestamp,
        "phone_number_id": turn.phone_number_id, "received_at": turn.received_at,
    }


def _turn(row: Any) -> PendingTurn:
    return PendingTurn(
        key=row.turn_key, sender_id=row.sender_id, text=row.text, metadata=json.loads(row.message_metadata),
        timestamp=row.wa_timestamp, phone_number_id=row.phone_number_id, received_at=row.received_at,
        state=row.state, attempts=row.attempts, error=row.error,
    )


def _row(record: OutboundRecord) -> Dict[str, Any]:
    return {
        "callback_id": record.callback_id, "sender_id": record.sender_id, "decision": record.decision,
        "window_of": record.window_of, "at": record.at, "created_at": record.created_at,
        "response": record.response, "template": record.template,
        "rendered_with": dump_json(dict(record.rendered_with)),
        "choices": dump_json(list(record.choices)) if record.choices else None,
        "wamid": record.wamid, "status": record.status, "status_rank": record.status_rank,
        "error_code": record.error_code, "reason": record.reason, "fallback_of": record.fallback_of,
        "reason_code": record.reason_code,
    }


def _record(row: Any) -> OutboundRecord:
    return OutboundRecord(
        callback_id=row.callback_id, sender_id=row.sender_id, decision=row.decision,
        window_of=row.window_of, at=row.at, created_at=row.created_at, response=row.response,
        template=row.template, rendered_with=json.loads(row.rendered_with) if row.rendered_with else {},
        choices=choices_from_json(row.choices), wamid=row.wamid, status=row.status,
        error_code=row.error_code, reason=row.reason, reason_code=row.reason_code, fallback_of=row.fallback_of,
    )
