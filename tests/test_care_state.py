"""One suite for every care-window state backend, each built from the real tracker store it
lives with: in-memory, SQLite, PostgreSQL and Redis (the last two need the services running)."""

import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import sqlalchemy as sa

from rasa.core.tracker_store import InMemoryTrackerStore, RedisTrackerStore, SQLTrackerStore
from rasa.shared.core.domain import Domain

from connector.care_state import CareState, OutboundRecord, PendingTurn, UnsupportedTrackerStore, backend_for
from connector.care_state.sql import SchemaError, SqlBackend
from tests.services import postgres_settings, redis_settings

KINDS = ["memory", "sqlite", "sqlite, no upsert", pytest.param("postgresql", marks=pytest.mark.services),
         pytest.param("redis", marks=pytest.mark.services)]


def tracker_store(kind, tmp_path):
    domain = Domain.empty()
    if kind == "memory":
        return InMemoryTrackerStore(domain)
    if kind.startswith("sqlite"):
        return SQLTrackerStore(domain, dialect="sqlite", db=str(tmp_path / "state.db"))
    if kind == "postgresql":
        return SQLTrackerStore(domain, **postgres_settings())
    return RedisTrackerStore(domain, **redis_settings())


@pytest.fixture(params=KINDS)
def backend(request, tmp_path):
    backend = backend_for(tracker_store(request.param, tmp_path))
    if request.param == "sqlite, no upsert":  # the path for databases without ON CONFLICT (MySQL)
        backend.on_conflict = None
    backend.create_schema()
    backend.create_schema()  # a second start finds everything in place
    return backend


@pytest.fixture
def sender():
    return f"state-{uuid.uuid4().hex[:12]}"


def record(sender, window_of=1_700_000_000, **changes):
    values = dict(callback_id=uuid.uuid4().hex, sender_id=sender, decision="template", window_of=window_of,
                  at=time.time(), created_at=time.time(), response="utter_x", template="t",
                  rendered_with={"order_id": "10042"})
    values.update(changes)
    return OutboundRecord(**values)


def test_last_inbound_only_moves_forward_and_remembers_the_number(backend, sender):
    assert backend.customer(sender).last_inbound_at is None
    backend.note_inbound(sender, 1_700_000_100, "111")
    backend.note_inbound(sender, 1_700_000_050, "222")  # a late redelivery of an older message
    state = backend.customer(sender)
    assert (state.last_inbound_at, state.reply_number) == (1_700_000_100, "111")
    backend.note_inbound(sender, 1_700_000_200, "222")
    assert backend.customer(sender).reply_number == "222"


def test_meta_closing_a_window_and_a_pending_opt_out(backend, sender):
    backend.close_window(sender, 1_700_000_100)
    backend.close_window(sender, 1_700_000_000)
    backend.set_opt_out_pending(sender, True)
    state = backend.customer(sender)
    assert state.closed_for_inbound == 1_700_000_100 and state.opt_out_pending is True
    backend.set_opt_out_pending(sender, False)
    assert backend.customer(sender).opt_out_pending is False


def test_reservations_are_per_window_and_released_when_meta_refused(backend, sender):
    first = record(sender)
    assert backend.reserve_template(first, limit=1)
    assert not backend.reserve_template(record(sender), limit=1)
    assert backend.templates_reserved(sender, first.window_of) == 1
    assert backend.reserve_template(record(sender, window_of=first.window_of + 1), limit=1)
    backend.release_template(first)
    assert backend.templates_reserved(sender, first.window_of) == 0
    assert backend.reserve_template(record(sender), limit=1)
    assert backend.outbound(first.callback_id).rendered_with == {"order_id": "10042"}


@pytest.mark.parametrize("limit", [1, 3])
def test_concurrent_reservations_from_threads_never_exceed_the_limit(backend, sender, limit):
    start = threading.Barrier(16)

    def reserve(_):
        start.wait()
        return backend.reserve_template(record(sender), limit=limit)

    with ThreadPoolExecutor(max_workers=16) as pool:
        won = list(pool.map(reserve, range(16)))
    assert won.count(True) == limit
    assert backend.templates_reserved(sender, 1_700_000_000) == limit


def test_a_status_moves_forward_once_found_by_callback_id_or_wamid(backend, sender):
    sent = record(sender, decision="free_form", template=None, choices=(("1", "/a"), ("2", "/b")))
    backend.add_outbound(sent)
    accepted = backend.update_outbound("accepted", callback_id=sent.callback_id, wamid="wamid.X1")
    assert accepted.wamid == "wamid.X1" and accepted.status == "accepted"
    assert backend.update_outbound("read", wamid="wamid.X1").status == "read"
    assert backend.update_outbound("delivered", wamid="wamid.X1") is None  # late: never backwards
    assert backend.update_outbound("sent", wamid="wamid.unknown") is None
    stored = backend.outbound(sent.callback_id)
    assert stored.status == "read" and stored.choices == (("1", "/a"), ("2", "/b"))


def test_a_lost_answer_is_resolved_by_the_callback_id_and_only_one_caller_acts(backend, sender):
    unknown = record(sender)
    assert backend.reserve_template(unknown, limit=1)
    backend.update_outbound("unknown", callback_id=unknown.callback_id)
    start = threading.Barrier(8)

    def fail(_):
        start.wait()
        return backend.update_outbound("failed", callback_id=unknown.callback_id, wamid="wamid.F",
                                       error_code=131047, reason="Re-engagement message")

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = [r for r in pool.map(fail, range(8)) if r is not None]
    assert len(results) == 1
    assert (results[0].status, results[0].wamid, results[0].error_code) == ("failed", "wamid.F", 131047)


def test_recent_records_newest_first(backend, sender):
    records = [record(sender, decision="free_form", created_at=1000.0 + n) for n in range(5)]
    for r in records:
        backend.add_outbound(r)
    assert [r.callback_id for r in backend.recent_outbound(sender, 3)] == [r.callback_id for r in records[::-1][:3]]


def turn(sender, n, timestamp=1_700_000_000, number="106540352242922"):
    return PendingTurn(key=f"wamid.{sender}.{n}", sender_id=sender, text=f"message {n}",
                       metadata={"whatsapp": {"timestamp": timestamp + n, "context": {}}},
                       timestamp=timestamp + n, phone_number_id=number, received_at=time.time() + n / 1000)


def mine(turns, sender):
    """Redis and PostgreSQL outlive a test run: claims may also find what earlier runs left."""
    return [t.key for t in turns if t.sender_id == sender]


def test_the_inbox_takes_a_message_once_and_opens_the_window_with_it(backend, sender):
    first, second = turn(sender, 1), turn(sender, 2, number="222")
    assert backend.accept_turns([first, second, first], "a:1", time.time() + 30) == [first.key, second.key]
    assert backend.accept_turns([first], "b:1", time.time() + 30) == []  # pending with a:1
    customer = backend.customer(sender)
    assert (customer.last_inbound_at, customer.reply_number) == (second.timestamp, "222")
    backend.turn_done(first.key)
    assert backend.accept_turns([first], "b:1", time.time() + 30) == []  # done
    (shown,) = [t for t in backend.turns_of(sender, 10) if t.key == first.key]
    assert shown.state == "done" and shown.metadata == first.metadata and shown.text == "message 1"


def test_a_failed_message_is_taken_back_when_delivered_again(backend, sender):
    failing = turn(sender, 1)
    backend.accept_turns([failing], "a:1", time.time() + 30)
    backend.turn_failed(failing.key, 1, "RuntimeError: down", final=False)
    (shown,) = backend.turns_of(sender, 10)
    assert (shown.state, shown.attempts, shown.error) == ("pending", 1, "RuntimeError: down")
    backend.turn_failed(failing.key, 2, "RuntimeError: still down", final=True)
    assert backend.turns_of(sender, 10)[0].state == "failed"
    assert backend.accept_turns([failing], "b:1", time.time() + 30) == [failing.key]
    (shown,) = backend.turns_of(sender, 10)
    assert (shown.state, shown.attempts, shown.error) == ("pending", 0, None)


def test_concurrent_deliveries_of_one_message_are_taken_by_exactly_one(backend, sender):
    start = threading.Barrier(8)

    def accept(n):
        start.wait()
        return backend.accept_turns([turn(sender, 1)], f"instance:{n}", time.time() + 30)

    with ThreadPoolExecutor(max_workers=8) as pool:
        taken = list(pool.map(accept, range(8)))
    assert sorted(map(len, taken)) == [0] * 7 + [1]


def test_expired_leases_are_claimed_with_all_of_the_customers_pending_messages_in_order(backend, sender):
    now = time.time()
    turns = [turn(sender, n) for n in (1, 2, 3)]
    backend.accept_turns(turns[:2], "dead:1", now - 1)  # its lease ran out
    backend.accept_turns(turns[2:], "alive:1", now + 30)  # the same customer, on a live instance
    claimed = backend.claim_turns("b:1", now, now + 30, limit=1000)
    assert mine(claimed, sender) == [t.key for t in turns]  # all of them, so that one runs them in order
    assert mine(backend.claim_turns("c:1", now, now + 30, limit=1000), sender) == []
    for t in turns:
        backend.turn_done(t.key)


def test_a_restarted_instance_takes_over_its_own_pending_messages_at_once(backend, sender):
    now = time.time()
    pending, done = turn(sender, 1), turn(sender, 2)
    backend.accept_turns([pending, done], "host:5005", now + 30)
    backend.turn_done(done.key)
    assert mine(backend.claim_turns("other:5005", now, now + 30, limit=1000), sender) == []
    assert mine(backend.claim_turns("host:5005", now, now + 30, limit=1000, take_over="host:5005"), sender) == [pending.key]
    backend.turn_done(pending.key)


def test_renewed_leases_are_not_claimed_and_finished_messages_never_are(backend, sender):
    now = time.time()
    kept, given_up = turn(sender, 1), turn(sender, 2)
    backend.accept_turns([kept, given_up], "a:1", now + 0.5)
    backend.renew_leases([kept.key, given_up.key], "a:1", now + 100)
    backend.renew_leases([kept.key], "intruder:1", now - 100)  # only the owner renews
    backend.turn_failed(given_up.key, 8, "RuntimeError: down", final=True)
    assert mine(backend.claim_turns("b:1", now + 1, now + 30, limit=1000), sender) == []
    backend.turn_done(kept.key)


def test_finished_messages_are_forgotten_after_the_redelivery_period(backend, sender):
    old = turn(sender, 1)
    backend.accept_turns([old], "a:1", time.time() + 30)
    backend.turn_done(old.key)
    backend.forget_turns(time.time() - 3600)
    assert [t.key for t in backend.turns_of(sender, 10)] == [old.key]
    backend.forget_turns(time.time() + 1)
    if type(backend).__name__ == "RedisBackend":  # Redis lets them expire on their own
        assert 0 < backend.red.ttl(backend._key("i", old.key)) <= 8 * 24 * 3600
    else:
        assert backend.turns_of(sender, 10) == []


async def test_the_async_face_runs_calls_off_the_event_loop(tmp_path, sender):
    threads = []

    class Spy(SqlBackend):
        def customer(self, sender_id):
            threads.append(threading.current_thread().name)
            return super().customer(sender_id)

    store = tracker_store("sqlite", tmp_path)
    state = CareState(Spy(store.engine))
    await state.create_schema()
    await state.note_inbound(sender, 1_700_000_000, "111")
    assert (await state.customer(sender)).last_inbound_at == 1_700_000_000
    assert threads and all(name.startswith("care-state") for name in threads)
    state.close()


def test_tables_that_cannot_be_created_fail_with_the_ddl(tmp_path):
    path = tmp_path / "readonly.db"
    sa.create_engine(f"sqlite:///{path}").connect().close()
    engine = sa.create_engine(f"sqlite:///file:{path}?mode=ro&uri=true")  # a user without DDL rights
    with pytest.raises(SchemaError) as raised:
        SqlBackend(engine).create_schema()
    message = str(raised.value)
    assert "CREATE TABLE whatsapp_customers" in message and "CREATE TABLE whatsapp_outbound" in message
    assert "README" in message


def test_another_tracker_store_is_refused_naming_the_setting():
    class MongoLike:
        pass

    with pytest.raises(UnsupportedTrackerStore, match="tracker_store: type:"):
        backend_for(MongoLike())


def test_events_indexes_it_may_not_create_are_a_warning_not_a_failure(tmp_path, caplog):
    store = tracker_store("sqlite", tmp_path)

    def refuse(conn, cursor, statement, *_):
        if "CREATE INDEX ix_events_whatsapp" in statement:
            raise sa.exc.OperationalError(statement, None, Exception("permission denied"))

    sa.event.listen(store.engine, "before_cursor_execute", refuse)
    with caplog.at_level(logging.WARNING, logger="connector.care_state.sql"):
        backend_for(store).create_schema()
    assert "Could not create index ix_events_whatsapp_window" in caplog.text
    assert sa.inspect(store.engine).has_table("whatsapp_outbound")
