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

import hashlib
import json
import logging
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.schema import CreateIndex, CreateTable

from connector.care_state.base import CareStateBackend
from connector.care_state.records import (
    STATUS_RANK, CustomerState, DeskEvent, Handoff, OutboundRecord, PendingTurn, Pricing, TemplateState,
    choices_from_json, dump_json,
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


class SqlBackend(CareStateBackend):
    def __init__(self, engine: sa.engine.Engine, events_table: Optional[sa.Table] = None) -> None:
        self.engine = engine
        self.events_table = events_table
        self.on_conflict = _ON_CONFLICT.get(engine.dialect.name)
        """The dialect's INSERT ... ON CONFLICT, if it has one (None: UPDATE, then INSERT)."""

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
        with self.engine.connect() as connection:
            row = connection.execute(sa.select(customers).where(customers.c.sender_id == sender_id)).first()
        if row is None:
            return CustomerState(sender_id)
        return CustomerState(sender_id, row.last_inbound_at, row.reply_number, row.closed_for_inbound,
                             bool(row.opt_out_pending))

    def _upsert(self, sender_id: str, values: Dict[str, Any], condition: Any = None) -> None:
        """UPDATE where the condition holds; INSERT if the customer has no row yet. One statement
        where the database has INSERT ... ON CONFLICT (SQLite, PostgreSQL): one commit, which is
        what a write costs on SQLite."""
        if self.on_conflict is not None:
            with self.engine.begin() as connection:
                self._upsert_in(connection, sender_id, values, condition)
            return
        where = customers.c.sender_id == sender_id
        statement = sa.update(customers).where(where if condition is None else sa.and_(where, condition))
        for _ in range(2):
            with self.engine.begin() as connection:
                if connection.execute(statement.values(**values)).rowcount:
                    return
                if connection.execute(sa.select(customers.c.sender_id).where(where)).first():
                    return  # the row exists and the condition says no
            try:
                with self.engine.begin() as connection:
                    connection.execute(sa.insert(customers).values(**{"sender_id": sender_id, "opt_out_pending": False, **values}))
                return
            except IntegrityError:  # another writer inserted it first: update theirs
                continue

    def _upsert_in(self, connection: Any, sender_id: str, values: Dict[str, Any], condition: Any) -> None:
        statement = self.on_conflict(customers).values(**{"sender_id": sender_id, "opt_out_pending": False, **values})
        connection.execute(statement.on_conflict_do_update(
            index_elements=[customers.c.sender_id], set_=values, where=condition))

    def note_inbound(self, sender_id: str, timestamp: int, phone_number_id: Optional[str]) -> None:
        self._upsert(sender_id, *_inbound(timestamp, phone_number_id))

    def close_window(self, sender_id: str, inbound_at: int) -> None:
        older = sa.or_(customers.c.closed_for_inbound.is_(None), customers.c.closed_for_inbound < inbound_at)
        self._upsert(sender_id, {"closed_for_inbound": inbound_at}, older)

    def set_opt_out_pending(self, sender_id: str, pending: bool) -> None:
        self._upsert(sender_id, {"opt_out_pending": pending})

    def templates_reserved(self, sender_id: str, window_of: int) -> int:
        query = sa.select(sa.func.count()).select_from(reservations).where(
            reservations.c.sender_id == sender_id, reservations.c.window_of == window_of)
        with self.engine.connect() as connection:
            return int(connection.execute(query).scalar() or 0)

    def reserve_template(self, record: OutboundRecord, limit: int) -> bool:
        for slot in range(limit):
            try:
                with self.engine.begin() as connection:
                    connection.execute(sa.insert(reservations).values(
                        sender_id=record.sender_id, window_of=record.window_of, slot=slot,
                        callback_id=record.callback_id))
                    connection.execute(sa.insert(outbound).values(**_row(record)))
                return True
            except IntegrityError:  # that slot is taken: try the next
                continue
        return False

    def release_template(self, record: OutboundRecord) -> None:
        with self.engine.begin() as connection:
            connection.execute(sa.delete(reservations).where(reservations.c.callback_id == record.callback_id))

    def add_outbound(self, record: OutboundRecord) -> None:
        with self.engine.begin() as connection:
            connection.execute(sa.insert(outbound).values(**_row(record)))

    def update_outbound(self, status, callback_id=None, wamid=None, error_code=None, reason=None):
        if callback_id is None and wamid is None:
            return None
        rank = STATUS_RANK[status]
        found = outbound.c.callback_id == callback_id if callback_id else outbound.c.wamid == wamid
        values: Dict[str, Any] = {"status": status, "status_rank": rank}
        if wamid is not None:
            values["wamid"] = sa.func.coalesce(outbound.c.wamid, wamid)
        if error_code is not None:
            values["error_code"] = error_code
        if reason is not None:
            values["reason"] = reason
        with self.engine.begin() as connection:
            changed = connection.execute(
                sa.update(outbound).where(found, outbound.c.status_rank < rank).values(**values)).rowcount
            row = connection.execute(sa.select(outbound).where(found)).first() if changed else None
        return _record(row) if row is not None else None

    def outbound(self, callback_id: str) -> Optional[OutboundRecord]:
        with self.engine.connect() as connection:
            row = connection.execute(sa.select(outbound).where(outbound.c.callback_id == callback_id)).first()
        return _record(row) if row is not None else None

    def recent_outbound(self, sender_id: str, limit: int) -> List[OutboundRecord]:
        query = (sa.select(outbound).where(outbound.c.sender_id == sender_id)
                 .order_by(outbound.c.created_at.desc()).limit(limit))
        with self.engine.connect() as connection:
            return [_record(row) for row in connection.execute(query)]

    # --- the inbox ---------------------------------------------------------------------------

    def accept_turns(self, turns: Sequence[PendingTurn], owner: str, lease_until: float) -> List[str]:
        turns = list({turn.key: turn for turn in turns}.values())
        lease = {"state": "pending", "owner": owner, "lease_until": lease_until, "attempts": 0, "error": None,
                 "finished_at": None}
        for _ in range(3):  # a concurrent insert of the same key: read again, it is theirs
            try:
                with self.engine.begin() as connection:
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
        with self.engine.begin() as connection:
            connection.execute(sa.update(inbox).where(inbox.c.turn_key.in_(list(keys)), inbox.c.owner == owner,
                                                      inbox.c.state == "pending").values(lease_until=lease_until))

    def claim_turns(self, owner, now, lease_until, limit, take_over=None):
        expired = sa.and_(inbox.c.state == "pending", inbox.c.lease_until < now)
        if take_over is not None:
            expired = sa.or_(expired, sa.and_(inbox.c.state == "pending", inbox.c.owner == take_over))
        with self.engine.connect() as connection:
            senders = [row.sender_id for row in connection.execute(
                sa.select(inbox.c.sender_id).where(expired).group_by(inbox.c.sender_id)
                .order_by(sa.func.min(inbox.c.received_at)).limit(limit))]
        claimed: List[PendingTurn] = []
        for sender_id in senders:
            mine = sa.and_(inbox.c.sender_id == sender_id, inbox.c.state == "pending")
            with self.engine.begin() as connection:
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
        with self.engine.begin() as connection:
            connection.execute(sa.update(inbox).where(inbox.c.turn_key == key).values(**values))

    def turn_done(self, key: str) -> None:
        with self.engine.begin() as connection:
            connection.execute(sa.update(inbox).where(inbox.c.turn_key == key).values(
                state="done", finished_at=time.time(), owner=None, error=None))

    def turns_of(self, sender_id: str, limit: int) -> List[PendingTurn]:
        query = sa.select(inbox).where(inbox.c.sender_id == sender_id).order_by(inbox.c.received_at.desc()).limit(limit)
        with self.engine.connect() as connection:
            return [_turn(row) for row in connection.execute(query)]

    def forget_turns(self, finished_before: float) -> int:
        with self.engine.begin() as connection:
            return connection.execute(sa.delete(inbox).where(
                inbox.c.state != "pending", inbox.c.finished_at < finished_before)).rowcount


    # --- handoffs and the desk's events ------------------------------------------------------

    def start_handoff(self, sender_id: str, since: float, reason: Optional[str]) -> bool:
        row = {"sender_id": sender_id, "since": since, "reason": reason, "closing_sent_for": None}
        if self.on_conflict is not None:
            with self.engine.begin() as connection:
                return connection.execute(self.on_conflict(handoffs).values(**row).on_conflict_do_nothing(
                    index_elements=[handoffs.c.sender_id])).rowcount == 1
        try:
            with self.engine.begin() as connection:
                connection.execute(sa.insert(handoffs).values(**row))
            return True
        except IntegrityError:  # open already
            return False

    def end_handoff(self, sender_id: str) -> bool:
        with self.engine.begin() as connection:
            return connection.execute(sa.delete(handoffs).where(handoffs.c.sender_id == sender_id)).rowcount == 1

    def _handoffs(self) -> Any:
        return sa.select(handoffs, customers.c.last_inbound_at).select_from(
            handoffs.outerjoin(customers, customers.c.sender_id == handoffs.c.sender_id))

    def handoffs(self, limit: int) -> List[Handoff]:
        query = self._handoffs().order_by(handoffs.c.since, handoffs.c.sender_id).limit(max(limit, 0))
        with self.engine.connect() as connection:
            return [_handoff(row) for row in connection.execute(query)]

    def handoff(self, sender_id: str) -> Optional[Handoff]:
        with self.engine.connect() as connection:
            row = connection.execute(self._handoffs().where(handoffs.c.sender_id == sender_id)).first()
        return _handoff(row) if row is not None else None

    def mark_window_closing(self, sender_id: str, window_of: int) -> bool:
        older = sa.or_(handoffs.c.closing_sent_for.is_(None), handoffs.c.closing_sent_for < window_of)
        with self.engine.begin() as connection:
            return connection.execute(sa.update(handoffs).where(handoffs.c.sender_id == sender_id, older)
                                      .values(closing_sent_for=window_of)).rowcount == 1

    def add_desk_event(self, event: DeskEvent, limit: int) -> bool:
        row = {"event_id": event.event_id, "sender_id": event.sender_id, "body": dump_json(dict(event.body)),
               "created_at": event.created_at, "attempts": event.attempts,
               "next_attempt_at": event.next_attempt_at, "error": event.error}
        try:
            with self.engine.begin() as connection:
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
        with self.engine.begin() as connection:
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
        with self.engine.begin() as connection:
            connection.execute(sa.delete(desk_events).where(desk_events.c.event_id == event_id))

    def desk_event_failed(self, event_id: str, attempts: int, error: str, next_attempt_at: float) -> None:
        with self.engine.begin() as connection:
            connection.execute(sa.update(desk_events).where(desk_events.c.event_id == event_id).values(
                attempts=attempts, error=error, next_attempt_at=next_attempt_at, owner=None, lease_until=None))

    def desk_backlog(self, sender_id: str, limit: int) -> List[DeskEvent]:
        query = (sa.select(desk_events).where(desk_events.c.sender_id == sender_id)
                 .order_by(desk_events.c.seq).limit(max(limit, 0)))
        with self.engine.connect() as connection:
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
            with self.engine.begin() as connection:
                return connection.execute(statement).rowcount == 1
        try:
            with self.engine.begin() as connection:
                connection.execute(sa.insert(templates).values(**row))
            return True
        except IntegrityError:  # stored already (rows are never deleted): the later word wins
            pass
        with self.engine.begin() as connection:
            return connection.execute(sa.update(templates).where(
                templates.c.name == template.name, templates.c.language == template.language, not_later,
            ).values(**values)).rowcount == 1

    def templates(self) -> List[TemplateState]:
        query = sa.select(templates).order_by(templates.c.name, templates.c.language)
        with self.engine.connect() as connection:
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
            with self.engine.begin() as connection:
                return connection.execute(statement).rowcount == 1
        try:
            with self.engine.begin() as connection:
                connection.execute(sa.insert(marketing_stops).values(sender_id=sender_id, **values))
            return True
        except IntegrityError:  # stored already (rows are never deleted): the later word wins
            pass
        with self.engine.begin() as connection:
            return connection.execute(sa.update(marketing_stops).where(
                marketing_stops.c.sender_id == sender_id, not_later).values(**values)).rowcount == 1

    def marketing_stopped(self, sender_id: str) -> bool:
        query = sa.select(marketing_stops.c.stopped).where(marketing_stops.c.sender_id == sender_id)
        with self.engine.connect() as connection:
            return bool(connection.execute(query).scalar())

    def set_pricing(self, callback_id: str, pricing: Pricing) -> None:
        values: Dict[str, Any] = {"category": pricing.category, "billable": pricing.billable,
                                  "pricing_type": pricing.pricing_type}
        if self.on_conflict is not None:
            statement = self.on_conflict(pricing_table).values(callback_id=callback_id, **values).on_conflict_do_update(
                index_elements=[pricing_table.c.callback_id], set_=values)
            with self.engine.begin() as connection:
                connection.execute(statement)
            return
        update = sa.update(pricing_table).where(pricing_table.c.callback_id == callback_id).values(**values)
        with self.engine.begin() as connection:  # a later status of the message: its row exists
            if connection.execute(update).rowcount:
                return
        try:
            with self.engine.begin() as connection:
                connection.execute(sa.insert(pricing_table).values(callback_id=callback_id, **values))
        except IntegrityError:  # another writer inserted it first: the latest word overwrites
            with self.engine.begin() as connection:
                connection.execute(update)

    def pricing_of(self, callback_ids: Sequence[str]) -> Dict[str, Pricing]:
        ids = list(dict.fromkeys(callback_ids))
        found: Dict[str, Pricing] = {}
        with self.engine.connect() as connection:
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
