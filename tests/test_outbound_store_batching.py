"""The care-window state on a SQLite file as the outbound path uses it under load: one writer
thread group-committing the writes that queued meanwhile, one reader thread reading the
customers asked for meanwhile with one SELECT ... IN, every statement off the event loop, and
one caller's failure its own (README, "Where the state lives"; bench/outbound_throughput.py)."""

import asyncio
import threading
import time
import uuid

import pytest
import sqlalchemy as sa

from rasa.core.tracker_store import SQLTrackerStore
from rasa.shared.core.domain import Domain

from connector.care_state import CareState, OutboundRecord, Pricing, backend_for
from connector.care_state.sql import SqlBackend, _SqliteFile
from connector.pacing import Pacer


@pytest.fixture
def store(tmp_path):
    return SQLTrackerStore(Domain.empty(), dialect="sqlite", db=str(tmp_path / "state.db"))


@pytest.fixture
def state(store):
    backend = backend_for(store)
    backend.create_schema()
    state = CareState(backend)
    yield state
    state.close()


class Statements:
    """Every statement on the engine: its SQL and the thread it ran on."""

    def __init__(self, engine):
        self.seen = []
        sa.event.listen(engine, "before_cursor_execute", self._seen)

    def _seen(self, conn, cursor, statement, parameters, context, executemany):
        self.seen.append((statement.split()[0], threading.get_ident(), executemany))


def record(sender, **changes):
    values = dict(callback_id=uuid.uuid4().hex, sender_id=sender, decision="free_form", window_of=1_700_000_000,
                  at=time.time(), created_at=time.time(), response="utter_x", rendered_with={"text": "hi"})
    values.update(changes)
    return OutboundRecord(**values)


def test_the_sqlite_file_of_rasas_store_gets_the_batching_access(store, tmp_path):
    assert isinstance(backend_for(store).access, _SqliteFile)
    memory = SqlBackend(sa.create_engine("sqlite://"))  # one connection per thread: left as it is
    assert not isinstance(memory.access, _SqliteFile)


async def test_concurrent_writes_are_committed_together_and_each_is_stored_when_awaited(state, store):
    statements = Statements(store.engine)
    loop_thread = threading.get_ident()
    records = [record(f"4915{n:08d}") for n in range(300)]

    async def write_then_read(r):
        await state.add_outbound(r)
        assert (await state.outbound(r.callback_id)) == r  # committed once awaited

    await asyncio.gather(*(write_then_read(r) for r in records))
    access = state.backend.access
    assert access.commits < len(records) / 5, access.commits  # group commits, not one per write
    assert max(access.writer.sizes) > 10
    assert not [s for s in statements.seen if s[1] == loop_thread]  # nothing on the event loop
    inserts = [s for s in statements.seen if s[0] == "INSERT"]
    assert len(inserts) < len(records) / 5 and any(many for _, _, many in inserts)  # executemany


async def test_a_write_that_fails_in_a_batch_fails_for_its_caller_only(state):
    first = record("491510000001")
    await state.add_outbound(first)
    again = [record(f"4915200{n:05d}") for n in range(50)]
    results = await asyncio.gather(*(state.add_outbound(r) for r in again[:25]), state.add_outbound(first),
                                   *(state.add_outbound(r) for r in again[25:]), return_exceptions=True)
    failures = [r for r in results if isinstance(r, Exception)]
    assert len(failures) == 1 and isinstance(failures[0], sa.exc.IntegrityError)  # the duplicate callback id
    assert all([await state.outbound(r.callback_id) == r for r in again])


async def test_an_injected_outage_fails_that_write_and_the_next_one_works(state, store):
    armed = {"left": 1}

    def outage(conn, cursor, statement, parameters, context, executemany):
        if "INSERT INTO whatsapp_outbound" in statement and armed["left"]:
            armed["left"] -= 1
            raise sa.exc.OperationalError(statement, parameters, Exception("the database went away (injected)"))

    sa.event.listen(store.engine, "before_cursor_execute", outage)
    lost, kept = record("491510000002"), record("491510000003")
    with pytest.raises(sa.exc.OperationalError):
        await state.add_outbound(lost)
    await state.add_outbound(kept)
    assert await state.outbound(lost.callback_id) is None and await state.outbound(kept.callback_id) == kept


async def test_concurrent_customer_reads_are_read_together_and_each_is_right(state, store):
    known = [f"4916{n:08d}" for n in range(200)]
    for n, sender in enumerate(known):
        await state.note_inbound(sender, 1_700_000_000 + n, "106540352242922")
    await state.close_window(known[0], 1_700_000_000)
    statements = Statements(store.engine)
    unknown = [f"4917{n:08d}" for n in range(50)]
    asked = known + unknown
    answers = await asyncio.gather(*(state.customer(sender) for sender in asked))
    assert [a.sender_id for a in answers] == asked
    assert [a.last_inbound_at for a in answers[:200]] == [1_700_000_000 + n for n in range(200)]
    assert answers[0].closed_for_inbound == 1_700_000_000 and answers[1].closed_for_inbound is None
    assert all(a.last_inbound_at is None and a.reply_number is None for a in answers[200:])  # never wrote
    assert len([s for s in statements.seen if s[0] == "SELECT"]) < len(asked) / 5


async def test_a_read_sees_every_write_awaited_before_it(state):
    sender = "491510000004"
    for timestamp in range(1_700_000_000, 1_700_000_050):
        await state.note_inbound(sender, timestamp, "106540352242922")
        assert (await state.customer(sender)).last_inbound_at == timestamp


async def test_a_write_given_up_before_it_started_is_not_made(state):
    access = state.backend.access
    blocker = record("491510000005")
    access.lock.acquire()  # the writer takes its first batch, then waits for the file's lock
    try:
        first = asyncio.ensure_future(state.add_outbound(blocker))
        await asyncio.sleep(0.2)
        given_up = record("491510000006")
        task = asyncio.ensure_future(state.add_outbound(given_up))
        await asyncio.sleep(0)
        task.cancel()
        await asyncio.sleep(0.05)
    finally:
        access.lock.release()
    await first
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await state.outbound(blocker.callback_id) == blocker
    assert await state.outbound(given_up.callback_id) is None


async def test_one_status_write_stores_the_first_pricing_once_and_moves_the_record_forward(state, store):
    r = record("491510000007")
    await state.add_outbound(r)
    statements = Statements(store.engine)
    pricing = Pricing("service", False, "free_customer_service")
    sent = await state.record_status("sent", callback_id=r.callback_id, wamid="wamid.x", pricing=pricing, fetch=False)
    assert sent.changed and sent.first_pricing and sent.record is None
    assert [s[0] for s in statements.seen] == ["INSERT", "UPDATE"]  # one transaction, no read back
    again = await state.record_status("sent", callback_id=r.callback_id, wamid="wamid.x", pricing=pricing)
    assert not again.changed and not again.first_pricing
    failed = await state.record_status("failed", callback_id=r.callback_id, error_code=131047, reason="late")
    assert failed.changed and failed.record.status == "failed" and failed.record.wamid == "wamid.x"
    assert (await state.pricing_of([r.callback_id])) == {r.callback_id: pricing}


async def test_closing_the_state_stops_its_threads_after_what_was_queued(store):
    backend = backend_for(store)
    backend.create_schema()
    state = CareState(backend)
    records = [record(f"4918{n:08d}") for n in range(20)]
    await asyncio.gather(*(state.add_outbound(r) for r in records), state.customer("4918"))
    writer, reader = backend.access.writer.thread, backend.access.reader.thread
    state.close()
    writer.join(5)
    reader.join(5)
    assert not writer.is_alive() and not reader.is_alive()
    assert all(backend.outbound(r.callback_id) == r for r in records)


def test_a_pacer_without_limits_keeps_nothing():
    off = Pacer.disabled()
    assert not off.paces and off.reserve("106540352242922", "4915100000001") == 0.0
    assert off.tracked_customers() == 0
    assert Pacer().paces and Pacer(messages_per_second=0, customer_interval=0, customer_min_gap=0.1).paces


async def test_the_state_closed_twice_then_used_again_still_answers(store):
    backend = backend_for(store)
    backend.create_schema()
    state = CareState(backend)
    await state.add_outbound(record("491510000008"))
    backend.close()
    backend.close()
    later = record("491510000009")
    await state.add_outbound(later)  # a write after the close starts the writer again
    assert await state.outbound(later.callback_id) == later
    state.close()


async def test_the_file_is_in_wal_mode_and_only_the_writer_thread_commits_without_waiting_for_the_disk(state, store, tmp_path):
    """Rasa's tracker reads on the loop must not wait for the writer's commits (WAL), and the
    inbox's write before a webhook's 200 keeps waiting for the disk (synchronous FULL, 2)."""
    import sqlite3

    with sqlite3.connect(tmp_path / "state.db") as other:  # the mode is the file's: any connection sees it
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    access = state.backend.access

    def synchronous(connection):
        return connection.exec_driver_sql("PRAGMA synchronous").scalar()

    assert await asyncio.get_running_loop().run_in_executor(None, lambda: access.combined(synchronous)) == 1
    with access.begin() as connection:  # any other thread's write, as the inbox's
        assert synchronous(connection) == 2
