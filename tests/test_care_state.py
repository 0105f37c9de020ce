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

from connector.care_state import (
    CareState, DeskEvent, OutboundRecord, PendingTurn, Pricing, TemplateState, UnsupportedTrackerStore, backend_for,
)
from connector.care_state import sql
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
    wamid = f"wamid.X1{sender}"  # PostgreSQL and Redis keep earlier runs' wamids
    sent = record(sender, decision="free_form", template=None, choices=(("1", "/a"), ("2", "/b")))
    backend.add_outbound(sent)
    accepted = backend.update_outbound("accepted", callback_id=sent.callback_id, wamid=wamid)
    assert accepted.wamid == wamid and accepted.status == "accepted"
    assert backend.update_outbound("read", wamid=wamid).status == "read"
    assert backend.update_outbound("delivered", wamid=wamid) is None  # late: never backwards
    assert backend.update_outbound("sent", wamid=f"wamid.unknown{sender}") is None
    stored = backend.outbound(sent.callback_id)
    assert stored.status == "read" and stored.choices == (("1", "/a"), ("2", "/b"))


def test_a_lost_answer_is_resolved_by_the_callback_id_and_only_one_caller_acts(backend, sender):
    unknown, wamid = record(sender), f"wamid.F{sender}"
    assert backend.reserve_template(unknown, limit=1)
    backend.update_outbound("unknown", callback_id=unknown.callback_id)
    start = threading.Barrier(8)

    def fail(_):
        start.wait()
        return backend.update_outbound("failed", callback_id=unknown.callback_id, wamid=wamid,
                                       error_code=131047, reason="Re-engagement message")

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = [r for r in pool.map(fail, range(8)) if r is not None]
    assert len(results) == 1
    assert (results[0].status, results[0].wamid, results[0].error_code) == ("failed", wamid, 131047)


def test_recent_records_newest_first(backend, sender):
    records = [record(sender, decision="free_form", created_at=1000.0 + n) for n in range(5)]
    for r in records:
        backend.add_outbound(r)
    assert [r.callback_id for r in backend.recent_outbound(sender, 3)] == [r.callback_id for r in records[::-1][:3]]


def test_a_suppressions_reason_code_is_stored_with_its_record(backend, sender):
    suppressed = record(sender, decision="suppressed", template=None, status="suppressed",
                        reason="outside the care window and the customer has not opted in", reason_code="no_opt_in")
    sent = record(sender, decision="free_form", template=None, created_at=suppressed.created_at + 1)
    backend.add_outbound(suppressed)
    backend.add_outbound(sent)
    assert backend.outbound(suppressed.callback_id) == suppressed
    assert backend.outbound(sent.callback_id).reason_code is None
    assert [(r.callback_id, r.reason_code) for r in backend.recent_outbound(sender, 2)] == [
        (sent.callback_id, None), (suppressed.callback_id, "no_opt_in")]
    # a later status (of a record that was written with a code) keeps it
    limited = record(sender, reason_code="template_limit", created_at=sent.created_at + 1)
    assert backend.reserve_template(limited, limit=1)
    failed = backend.update_outbound("failed", callback_id=limited.callback_id, error_code=131047, reason="closed")
    assert (failed.reason_code, failed.error_code) == ("template_limit", 131047)
    assert backend.outbound(limited.callback_id).reason_code == "template_limit"


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


# --- handoffs and the desk's events -----------------------------------------------------------

def test_a_handoff_starts_and_ends_exactly_once(backend, sender):
    assert backend.handoff(sender) is None
    assert backend.start_handoff(sender, 1000.5, "asked for a person")
    assert not backend.start_handoff(sender, 2000.0, "again")  # the first one stays
    shown = backend.handoff(sender)
    assert (shown.since, shown.reason, shown.closing_sent_for) == (1000.5, "asked for a person", None)
    assert backend.end_handoff(sender)
    assert not backend.end_handoff(sender)
    assert backend.handoff(sender) is None
    assert backend.start_handoff(sender, 3000.0, None) and backend.handoff(sender).reason is None
    backend.end_handoff(sender)


def test_concurrent_handoffs_of_one_customer_start_and_end_once(backend, sender):
    start = threading.Barrier(16)

    def race(call):
        def run(_):
            start.wait()
            return call()
        with ThreadPoolExecutor(max_workers=16) as pool:
            return list(pool.map(run, range(16)))

    assert race(lambda: backend.start_handoff(sender, time.time(), "busy")).count(True) == 1
    assert race(lambda: backend.end_handoff(sender)).count(True) == 1


def test_open_handoffs_oldest_first_with_the_customers_last_message(backend, sender):
    older, newer, quiet = f"{sender}-a", f"{sender}-b", f"{sender}-c"
    now = time.time()
    backend.note_inbound(older, 1_700_000_100, "111")
    backend.note_inbound(newer, 1_700_000_200, "111")
    backend.start_handoff(newer, now + 2, "order")
    backend.start_handoff(older, now + 1, None)
    backend.start_handoff(quiet, now + 3, None)  # no customer state at all
    shown = [h for h in backend.handoffs(10_000) if h.sender_id.startswith(sender)]
    assert [(h.sender_id, h.last_inbound_at) for h in shown] == [
        (older, 1_700_000_100), (newer, 1_700_000_200), (quiet, None)]
    assert backend.handoff(newer).last_inbound_at == 1_700_000_200 and backend.handoff(newer).reason == "order"
    backend.end_handoff(older)
    assert [h.sender_id for h in backend.handoffs(10_000) if h.sender_id.startswith(sender)] == [newer, quiet]
    for other in (newer, quiet):
        backend.end_handoff(other)


def test_the_window_closing_warning_is_marked_once_per_window(backend, sender):
    assert not backend.mark_window_closing(sender, 1_700_000_100)  # no handoff
    backend.start_handoff(sender, time.time(), None)
    assert backend.mark_window_closing(sender, 1_700_000_100)
    assert not backend.mark_window_closing(sender, 1_700_000_100)
    assert not backend.mark_window_closing(sender, 1_700_000_050)  # an older window
    assert backend.handoff(sender).closing_sent_for == 1_700_000_100
    assert backend.mark_window_closing(sender, 1_700_000_200)  # the customer wrote again
    assert backend.handoff(sender).closing_sent_for == 1_700_000_200
    backend.end_handoff(sender)


def test_concurrent_window_closing_marks_win_once(backend, sender):
    backend.start_handoff(sender, time.time(), None)
    start = threading.Barrier(8)

    def mark(_):
        start.wait()
        return backend.mark_window_closing(sender, 1_700_000_100)

    with ThreadPoolExecutor(max_workers=8) as pool:
        assert list(pool.map(mark, range(8))).count(True) == 1
    backend.end_handoff(sender)


def desk_event(sender, n, **changes):
    values = dict(event_id=f"{sender}.event.{n}", sender_id=sender, created_at=time.time(),
                  body={"type": "message", "n": n, "text": "Bonjour, où est ma commande ?"})
    values.update(changes)
    return DeskEvent(**values)


def ids(events, *senders):
    """Like `mine`: PostgreSQL and Redis may hold events other runs left (claimers are named
    after the test's sender, so that none of them holds a lease of an earlier run)."""
    return [e.event_id for e in events if e.sender_id in senders]


def forget_desk_events(backend, *senders):
    for sender in senders:
        for event in backend.desk_backlog(sender, 1000):
            backend.desk_event_delivered(event.event_id)


def test_a_desk_event_is_stored_once_by_its_id(backend, sender):
    first = desk_event(sender, 1)
    assert backend.add_desk_event(first, limit=10)
    assert backend.add_desk_event(desk_event(sender, 1, body={"changed": True}), limit=10)  # a retried turn
    (stored,) = backend.desk_backlog(sender, 10)
    assert (stored.event_id, stored.body, stored.created_at) == (first.event_id, first.body, first.created_at)
    assert stored.seq > 0 and (stored.attempts, stored.next_attempt_at, stored.error) == (0, 0.0, None)
    forget_desk_events(backend, sender)


def test_a_full_backlog_refuses_the_next_event_and_stores_nothing(backend, sender):
    for n in range(3):
        assert backend.add_desk_event(desk_event(sender, n), limit=3)
    assert not backend.add_desk_event(desk_event(sender, 3), limit=3)
    assert backend.add_desk_event(desk_event(sender, 2), limit=3)  # already stored: not refused
    assert ids(backend.desk_backlog(sender, 10), sender) == [f"{sender}.event.{n}" for n in range(3)]
    assert backend.add_desk_event(desk_event(f"{sender}-other", 0), limit=3)  # the limit is per customer
    backend.desk_event_delivered(f"{sender}.event.0")
    assert backend.add_desk_event(desk_event(sender, 3), limit=3)
    assert [e.seq for e in backend.desk_backlog(sender, 10)] == sorted(e.seq for e in backend.desk_backlog(sender, 10))
    forget_desk_events(backend, sender, f"{sender}-other")


def test_concurrent_adds_store_an_event_once_and_never_exceed_the_limit(backend, sender):
    start = threading.Barrier(16)

    def add(n):
        start.wait()
        return backend.add_desk_event(desk_event(sender, n % 8), limit=5)  # each id twice

    with ThreadPoolExecutor(max_workers=16) as pool:
        added = list(pool.map(add, range(16)))
    stored = backend.desk_backlog(sender, 100)
    assert len(stored) == 5 and len({e.event_id for e in stored}) == 5
    assert sorted(added) == [False] * 6 + [True] * 10  # 3 ids refused twice; 5 stored, their twin kept once
    forget_desk_events(backend, sender)


def claim(backend, owner, now, *senders, lease=30.0, limit=1000):
    """The ids of these customers' events that `owner` claims at `now`."""
    return ids(backend.claim_desk_events(owner, now, now + lease, limit), *senders)


def test_only_each_customers_oldest_event_is_claimed_in_order(backend, sender):
    other, desk = f"{sender}-other", f"{sender}/desk"  # a claimer of this test only
    for event in (desk_event(sender, 1), desk_event(other, 1), desk_event(sender, 2)):
        backend.add_desk_event(event, limit=10)
    now = time.time()
    claimed = backend.claim_desk_events(desk, now, now + 30, limit=1000)
    assert ids(claimed, sender, other) == [f"{sender}.event.1", f"{other}.event.1"]
    (first,) = [e for e in claimed if e.event_id == f"{sender}.event.1"]
    assert first.body == desk_event(sender, 1).body and first.seq > 0
    backend.desk_event_delivered(f"{sender}.event.1")
    backend.desk_event_delivered(f"{other}.event.1")
    assert claim(backend, desk, now, sender, other) == [f"{sender}.event.2"]
    forget_desk_events(backend, sender, other)


def test_a_failed_event_holds_back_its_customers_later_events_only(backend, sender):
    other, first_desk, second_desk = f"{sender}-other", f"{sender}/desk:1", f"{sender}/desk:2"
    for event in (desk_event(sender, 1), desk_event(sender, 2), desk_event(other, 1)):
        backend.add_desk_event(event, limit=10)
    now = time.time()
    assert claim(backend, first_desk, now, sender) == [f"{sender}.event.1"]
    backend.desk_event_failed(f"{sender}.event.1", 1, "HTTP 503", next_attempt_at=now + 60)
    backend.desk_event_delivered(f"{other}.event.1")
    backend.add_desk_event(desk_event(other, 2), limit=10)
    assert claim(backend, second_desk, now + 1, sender, other) == [f"{other}.event.2"]
    assert claim(backend, second_desk, now + 60, sender) == [f"{sender}.event.1"]
    (retried, waiting) = backend.desk_backlog(sender, 10)
    assert (retried.attempts, retried.error, retried.next_attempt_at) == (1, "HTTP 503", now + 60)
    assert waiting.event_id == f"{sender}.event.2" and waiting.attempts == 0
    forget_desk_events(backend, sender, other)


def test_a_leased_event_is_claimed_again_only_by_its_owner_or_after_the_lease(backend, sender):
    a, b, event_id = f"{sender}/desk:a", f"{sender}/desk:b", f"{sender}.event.1"
    backend.add_desk_event(desk_event(sender, 1), limit=10)
    now = time.time()
    assert claim(backend, a, now, sender) == [event_id]  # leased until now + 30
    assert claim(backend, b, now + 10, sender) == []
    assert claim(backend, a, now + 10, sender) == [event_id]  # its own again: until now + 40
    assert claim(backend, b, now + 35, sender) == []
    assert claim(backend, b, now + 41, sender) == [event_id]
    assert claim(backend, a, now + 42, sender) == []  # b has it now
    forget_desk_events(backend, sender)


def test_a_delivered_event_leaves_the_backlog_and_the_next_becomes_claimable(backend, sender):
    for n in (1, 2, 3):
        backend.add_desk_event(desk_event(sender, n), limit=10)
    now = time.time()
    delivered = []
    for round_ in range(4):
        claimed = claim(backend, f"{sender}/desk", now + round_, sender)
        assert len(claimed) <= 1
        for event_id in claimed:
            backend.desk_event_delivered(event_id)
            delivered.append(event_id)
    assert delivered == [f"{sender}.event.{n}" for n in (1, 2, 3)]
    assert backend.desk_backlog(sender, 10) == []
    backend.desk_event_delivered(f"{sender}.event.1")  # twice: nothing to do


def test_claims_stop_at_the_limit_oldest_events_first(backend, sender):
    now = time.time()
    backend.claim_desk_events(f"{sender}/sweeper", now, now + 3600, limit=100_000)  # what other runs left
    senders = [f"{sender}-{n}" for n in range(3)]
    for s in senders:
        backend.add_desk_event(desk_event(s, 1), limit=10)
    first = backend.claim_desk_events(f"{sender}/desk:1", now, now + 30, limit=2)
    assert [e.sender_id for e in first] == senders[:2] and first[0].seq < first[1].seq
    backend.desk_event_failed(f"{senders[0]}.event.1", 1, "timeout", next_attempt_at=now)  # due again at once
    second = backend.claim_desk_events(f"{sender}/desk:2", now, now + 30, limit=2)
    assert [e.sender_id for e in second] == [senders[0], senders[2]]  # senders[1]'s is leased to desk:1
    forget_desk_events(backend, *senders)


def test_concurrent_claimers_never_take_the_same_event(backend, sender):
    senders = [f"{sender}-{n}" for n in range(12)]
    for s in senders:
        for n in (1, 2):
            backend.add_desk_event(desk_event(s, n), limit=10)
    now = time.time()
    start = threading.Barrier(8)

    def race(n):
        start.wait()
        return claim(backend, f"{sender}/desk:{n}", now, *senders)

    with ThreadPoolExecutor(max_workers=8) as pool:
        claimed = [event_id for taken in pool.map(race, range(8)) for event_id in taken]
    assert sorted(claimed) == sorted(f"{s}.event.1" for s in senders)  # every head, once; no later event
    forget_desk_events(backend, *senders)


# --- templates as Meta knows them ----------------------------------------------------------------

@pytest.fixture
def template_name():
    """PostgreSQL and Redis keep templates across runs: each test's are its own."""
    return f"order_update_{uuid.uuid4().hex[:12]}"


def stored(backend, *names):
    return [t for t in backend.templates() if t.name in names]


def test_a_template_is_created_and_read_back_per_language(backend, template_name):
    at = 1_700_000_000.123456
    assert backend.update_template(TemplateState(template_name, "fr", "APPROVED", "UTILITY", at))
    assert backend.update_template(TemplateState(template_name, "en_US", "PENDING", "MARKETING", at + 1))
    assert stored(backend, template_name) == [
        TemplateState(template_name, "en_US", "PENDING", "MARKETING", at + 1),
        TemplateState(template_name, "fr", "APPROVED", "UTILITY", at),
    ]


def test_a_later_word_wins_and_an_earlier_one_is_refused(backend, template_name):
    at = 1_700_000_000.5
    assert backend.update_template(TemplateState(template_name, "fr", "APPROVED", "UTILITY", at))
    assert backend.update_template(TemplateState(template_name, "fr", "PAUSED", "MARKETING", at + 0.25))
    assert not backend.update_template(TemplateState(template_name, "fr", "APPROVED", "UTILITY", at + 0.125))
    assert stored(backend, template_name) == [TemplateState(template_name, "fr", "PAUSED", "MARKETING", at + 0.25)]
    # the same time counts as stored
    assert backend.update_template(TemplateState(template_name, "fr", "DISABLED", "MARKETING", at + 0.25))
    assert stored(backend, template_name)[0].status == "DISABLED"


def test_status_only_and_category_only_updates_keep_the_other_field(backend, template_name):
    assert backend.update_template(TemplateState(template_name, "fr", "APPROVED", "UTILITY", 100.0))
    assert backend.update_template(TemplateState(template_name, "fr", "PAUSED", "", 200.0), category=False)
    assert stored(backend, template_name) == [TemplateState(template_name, "fr", "PAUSED", "UTILITY", 200.0)]
    assert backend.update_template(TemplateState(template_name, "fr", "", "MARKETING", 300.0), status=False)
    assert stored(backend, template_name) == [TemplateState(template_name, "fr", "PAUSED", "MARKETING", 300.0)]
    # refused: neither field nor the time moves
    assert not backend.update_template(TemplateState(template_name, "fr", "APPROVED", "", 250.0), category=False)
    assert stored(backend, template_name) == [TemplateState(template_name, "fr", "PAUSED", "MARKETING", 300.0)]


def test_a_template_first_known_by_one_field_gets_an_empty_other(backend, template_name):
    other = template_name + "_b"
    assert backend.update_template(TemplateState(template_name, "fr", "PAUSED", "UTILITY", 10.0), category=False)
    assert backend.update_template(TemplateState(other, "fr", "PAUSED", "UTILITY", 10.0), status=False)
    assert stored(backend, template_name, other) == [TemplateState(template_name, "fr", "PAUSED", "", 10.0),
                                                     TemplateState(other, "fr", "", "UTILITY", 10.0)]


def test_concurrent_updates_keep_the_latest_word(backend, template_name):
    start = threading.Barrier(16)
    base = 1_700_000_000.0

    def update(n):
        start.wait()
        # a status-only, a category-only or a full word, in a shuffled order of times
        at = base + (n * 7 % 16) / 8
        return at, backend.update_template(
            TemplateState(template_name, "fr", f"S{n}", f"C{n}", at), status=n % 3 != 1, category=n % 3 != 2)

    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(update, range(16)))
    latest = max(at for at, _ in results)
    assert [ok for at, ok in results if at == latest] == [True]
    (template,) = stored(backend, template_name)
    assert template.updated_at == latest
    n = next(n for n in range(16) if results[n][0] == latest)
    if n % 3 != 1:
        assert template.status == f"S{n}"
    if n % 3 != 2:
        assert template.category == f"C{n}"



def test_a_customer_stops_then_resumes_marketing_the_later_word_winning(backend, sender):
    assert backend.marketing_stopped(sender) is False  # never said anything
    at = 1_700_000_000.123456789  # Meta's time, kept to the last bit
    assert backend.set_marketing_stopped(sender, True, at)
    assert backend.marketing_stopped(sender) is True
    assert not backend.set_marketing_stopped(sender, False, at - 0.000001)  # an earlier word, delivered late
    assert backend.marketing_stopped(sender) is True
    assert backend.set_marketing_stopped(sender, False, at + 0.000001)
    assert backend.marketing_stopped(sender) is False
    assert not backend.set_marketing_stopped(sender, True, at)
    assert backend.marketing_stopped(sender) is False
    assert backend.set_marketing_stopped(sender, True, at + 0.000001)  # an equal time counts as stored
    assert backend.marketing_stopped(sender) is True
    assert backend.marketing_stopped(sender + "-other") is False


def test_concurrent_marketing_words_keep_the_latest(backend, sender):
    start = threading.Barrier(16)

    def say(n):
        start.wait()
        at = 1_700_000_000 + (n * 7 % 16) / 8
        return at, n % 2 == 0, backend.set_marketing_stopped(sender, n % 2 == 0, at)

    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(say, range(16)))
    latest = max(at for at, _, _ in results)
    assert [ok for at, _, ok in results if at == latest] == [True]
    assert backend.marketing_stopped(sender) is next(stopped for at, stopped, _ in results if at == latest)


def test_pricing_is_overwritten_and_read_back_for_known_ids_only(backend):
    first, second, unknown = (uuid.uuid4().hex for _ in range(3))
    assert backend.pricing_of([first, second, unknown]) == {}
    assert backend.pricing_of([]) == {}
    backend.set_pricing(first, Pricing("utility", True, "regular"))
    backend.set_pricing(second, Pricing(None, None))
    assert backend.pricing_of([first, second, unknown]) == {
        first: Pricing("utility", True, "regular"), second: Pricing(None, None, None)}
    backend.set_pricing(first, Pricing("service", False, None))  # a later status of the same message
    backend.set_pricing(second, Pricing("marketing", None, "regular"))
    assert backend.pricing_of([first, second]) == {
        first: Pricing("service", False, None), second: Pricing("marketing", None, "regular")}
    assert backend.pricing_of([unknown]) == {}


def test_pricing_of_many_ids_reads_them_all(backend):
    ids = [uuid.uuid4().hex for _ in range(1203)]
    for n, callback_id in enumerate(ids[::3]):
        backend.set_pricing(callback_id, Pricing("utility", n % 2 == 0, "regular"))
    found = backend.pricing_of(ids)
    assert set(found) == set(ids[::3])
    assert found[ids[3]] == Pricing("utility", False, "regular")

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
    assert "CREATE TABLE whatsapp_templates" in message
    assert "CREATE TABLE whatsapp_marketing_stops" in message and "CREATE TABLE whatsapp_pricing" in message
    assert "README" in message


# `whatsapp_outbound` as the versions before `reason_code` made it (README, 'Care-window state')
OLD_OUTBOUND = """CREATE TABLE whatsapp_outbound (callback_id VARCHAR(64) NOT NULL, sender_id VARCHAR(255) NOT NULL,
  decision VARCHAR(16) NOT NULL, window_of BIGINT NOT NULL, at FLOAT(53) NOT NULL,
  created_at FLOAT(53) NOT NULL, response VARCHAR(255), template VARCHAR(512), rendered_with TEXT,
  choices TEXT, wamid VARCHAR(255), status VARCHAR(16) NOT NULL, status_rank INTEGER NOT NULL,
  error_code INTEGER, reason TEXT, fallback_of VARCHAR(64), PRIMARY KEY (callback_id))"""
OLD_ROW = """INSERT INTO whatsapp_outbound (callback_id, sender_id, decision, window_of, at, created_at, response,
  rendered_with, wamid, status, status_rank) VALUES ('old-1', :sender, 'free_form', 1700000000, 1700000100.5,
  1700000100.5, 'utter_greet', '{"text":"Hi!"}', 'wamid.old1', 'accepted', 1)"""
ADD_REASON_CODE = "ALTER TABLE whatsapp_outbound ADD COLUMN reason_code VARCHAR(32)"


def old_outbound_table(engine, sender):
    with engine.begin() as connection:
        connection.execute(sa.text(OLD_OUTBOUND))
        connection.execute(sa.text(OLD_ROW), {"sender": sender})


def outbound_columns(engine):
    return [column["name"] for column in sa.inspect(engine).get_columns("whatsapp_outbound")]


def assert_upgraded(backend, sender):
    assert "reason_code" in outbound_columns(backend.engine)
    (old,) = backend.recent_outbound(sender, 10)
    assert (old.callback_id, old.decision, old.status, old.wamid, old.reason_code) == (
        "old-1", "free_form", "accepted", "wamid.old1", None)
    assert old.rendered_with == {"text": "Hi!"} and old.at == 1700000100.5
    new = record(sender, decision="suppressed", template=None, status="suppressed", reason_code="no_template")
    backend.add_outbound(new)
    assert backend.outbound(new.callback_id).reason_code == "no_template"
    assert backend.update_outbound("delivered", wamid="wamid.old1").reason_code is None  # its statuses go on


@pytest.mark.parametrize("upsert", [True, False])
def test_a_table_from_before_reason_code_gets_the_column_and_keeps_its_rows(tmp_path, sender, upsert, caplog):
    store = tracker_store("sqlite", tmp_path)
    old_outbound_table(store.engine, sender)
    assert "reason_code" not in outbound_columns(store.engine)
    backend = backend_for(store)
    if not upsert:
        backend.on_conflict = None
    with caplog.at_level(logging.INFO, logger="connector.care_state.sql"):
        backend.create_schema()
    assert "Added column reason_code to whatsapp_outbound" in caplog.text
    backend.create_schema()  # a second start finds it in place
    assert outbound_columns(store.engine).count("reason_code") == 1
    assert_upgraded(backend, sender)


@pytest.mark.services
def test_a_postgresql_table_from_before_reason_code_gets_the_column_and_keeps_its_rows(sender):
    """In a schema of its own: the shared database's tables are in use by other tests."""
    schema = f"upgrade_{uuid.uuid4().hex[:12]}"
    settings = postgres_settings()
    url = sa.engine.URL.create("postgresql", username=settings["username"], password=settings["password"],
                               host=settings["host"], port=settings["port"], database=settings["db"])
    admin = sa.create_engine(url)
    with admin.begin() as connection:
        connection.execute(sa.text(f"CREATE SCHEMA {schema}"))
    engine = sa.create_engine(url, connect_args={"options": f"-csearch_path={schema}"})
    try:
        old_outbound_table(engine, sender)
        assert "reason_code" not in outbound_columns(engine)
        backend = SqlBackend(engine)
        backend.create_schema()
        backend.create_schema()
        assert_upgraded(backend, sender)
    finally:
        engine.dispose()
        with admin.begin() as connection:
            connection.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


@pytest.mark.services
def test_the_shared_postgresql_table_has_the_column_once_the_backend_started(tmp_path):
    """The table the other tests share: one an earlier run made lacked it."""
    backend = backend_for(tracker_store("postgresql", tmp_path))
    backend.create_schema()
    assert outbound_columns(backend.engine).count("reason_code") == 1


def test_a_column_another_instance_added_meanwhile_is_no_failure(tmp_path, sender):
    store = tracker_store("sqlite", tmp_path)
    old_outbound_table(store.engine, sender)

    class Late(SqlBackend):
        """Saw the table before the other instance's ALTER, runs its own after it."""
        looked = 0

        def _columns(self, table):
            self.looked += 1
            if self.looked == 1:
                with self.engine.begin() as connection:
                    connection.execute(sa.text(ADD_REASON_CODE))
                return {"callback_id"}
            return super()._columns(table)

    backend = Late(store.engine)
    backend.create_schema()  # its own ALTER fails (duplicate column): the column is there, so fine
    assert backend.looked == 2
    assert_upgraded(backend, sender)


def test_a_column_that_cannot_be_added_fails_with_the_statement(tmp_path, sender):
    path = tmp_path / "old.db"
    writer = sa.create_engine(f"sqlite:///{path}")
    old_outbound_table(writer, sender)  # and every other table, as the earlier version made them
    sql.metadata.create_all(writer, tables=[t for t in sql.metadata.sorted_tables if t.name != "whatsapp_outbound"])
    engine = sa.create_engine(f"sqlite:///file:{path}?mode=ro&uri=true")  # a user without DDL rights
    with pytest.raises(SchemaError) as raised:
        SqlBackend(engine).create_schema()
    message = str(raised.value)
    assert f"{ADD_REASON_CODE};" in message and "whatsapp_outbound lacks the column reason_code" in message
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
