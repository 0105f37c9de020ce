"""The care window's memory against Rasa's real tracker stores: SQLite, PostgreSQL, in-memory."""

import uuid

import pytest
from rasa.core.tracker_store import InMemoryTrackerStore, SQLTrackerStore
from rasa.shared.core.domain import Domain
from rasa.shared.core.events import ActionExecuted, SessionStarted, SlotSet, UserUttered
from rasa.shared.core.trackers import DialogueStateTracker

from connector.history import LEDGER_PREFIX, CareWindowHistory
from connector.window import CareWindowPolicy
from tests.services import postgres_settings

T0 = 1_764_000_000.0
H = 3600.0
POLICY = CareWindowPolicy(margin_seconds=0)
DOMAIN = Domain.from_yaml(
    """
slots:
  whatsapp_opt_in: {type: bool, influence_conversation: false, mappings: [{type: custom}]}
  order_id: {type: text, influence_conversation: false, mappings: [{type: custom}]}
"""
)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.services), "in-memory"])
def store(request, tmp_path):
    if request.param == "sqlite":
        store = SQLTrackerStore(DOMAIN, dialect="sqlite", db=str(tmp_path / "tracker.db"))
    elif request.param == "postgresql":
        store = SQLTrackerStore(DOMAIN, **postgres_settings())
    else:
        store = InMemoryTrackerStore(DOMAIN)
    yield store
    if isinstance(store, SQLTrackerStore):
        store.engine.dispose()


@pytest.fixture
def sender_id():
    return f"49{uuid.uuid4().int % 10**10:010d}"


def customer_message(text, timestamp):
    return UserUttered(text, metadata={"whatsapp": {"timestamp": int(timestamp)}})


async def save(store, sender_id, *events):
    tracker = await store.retrieve(sender_id) or DialogueStateTracker(sender_id, DOMAIN.slots)
    for event in events:
        tracker.update(event)
    await store.save(tracker)


def history(store):
    return CareWindowHistory(lambda: store, "whatsapp_opt_in")


async def test_never_wrote(store, sender_id):
    facts, values = await history(store).facts(sender_id, T0, POLICY, slots=["order_id"])
    assert facts.last_inbound_at is None and facts.opt_in is None and not facts.is_open(T0, POLICY)
    assert values == {}


async def test_last_customer_message_is_found_across_sessions(store, sender_id):
    await save(store, sender_id, customer_message("hi", T0), SlotSet("whatsapp_opt_in", True))
    await save(store, sender_id, SessionStarted(), ActionExecuted("action_listen"))  # Rasa session expired
    if isinstance(store, SQLTrackerStore):
        assert len((await store.retrieve(sender_id)).events) == 2  # retrieve() no longer sees the message
    facts, _ = await history(store).facts(sender_id, T0 + 2 * H, POLICY)
    assert facts.last_inbound_at == T0 and facts.is_open(T0 + 2 * H, POLICY)
    closed, _ = await history(store).facts(sender_id, T0 + 25 * H, POLICY)
    assert not closed.is_open(T0 + 25 * H, POLICY) and closed.opt_in is True


async def test_external_and_non_whatsapp_user_events_are_not_customer_messages(store, sender_id):
    await save(
        store, sender_id,
        customer_message("hi", T0),
        UserUttered("/EXTERNAL_follow_up", metadata={"is_external": True, "whatsapp": {"timestamp": int(T0 + 20 * H)}}),
        UserUttered("typed into the HTTP API"),
    )
    facts, _ = await history(store).facts(sender_id, T0 + 25 * H, POLICY)
    assert facts.last_inbound_at == T0


async def test_latest_slot_values_across_sessions(store, sender_id):
    await save(store, sender_id, customer_message("hi", T0), SlotSet("whatsapp_opt_in", True), SlotSet("order_id", "1"))
    await save(store, sender_id, SessionStarted(), SlotSet("order_id", "10042"), SlotSet("whatsapp_opt_in", False))
    facts, values = await history(store).facts(sender_id, T0 + 30 * H, POLICY, slots=["order_id"])
    assert facts.opt_in is False and values == {"order_id": "10042"}


async def test_slots_are_not_read_while_the_window_is_open(store, sender_id):
    await save(store, sender_id, customer_message("hi", T0), SlotSet("whatsapp_opt_in", True))
    facts, values = await history(store).facts(sender_id, T0 + H, POLICY, slots=["order_id"])
    assert facts.is_open(T0 + H, POLICY) and facts.opt_in is None and values == {}


async def test_ledger_counts_templates_per_lapsed_window_and_resets_on_reply(store, sender_id):
    h = history(store)
    await save(store, sender_id, customer_message("hi", T0))
    await h.record(sender_id, {"kind": "template", "at": T0 + 30 * H, "window_of": T0, "template": "order_update"})
    await h.record(sender_id, {"kind": "suppressed", "at": T0 + 31 * H, "window_of": T0, "reason": "limit"})
    facts, _ = await h.facts(sender_id, T0 + 31 * H, POLICY)
    assert facts.templates_sent == 1
    # a fresh history (another instance, or after a restart) reads the same from the store
    facts, _ = await history(store).facts(sender_id, T0 + 31 * H, POLICY)
    assert facts.templates_sent == 1

    await save(store, sender_id, customer_message("thanks", T0 + 32 * H))
    facts, _ = await history(store).facts(sender_id, T0 + 60 * H, POLICY)
    assert facts.last_inbound_at == T0 + 32 * H and facts.templates_sent == 0
    await h.record(sender_id, {"kind": "template", "at": T0 + 60 * H, "window_of": T0 + 32 * H})
    assert [r["kind"] for r in await h.records(sender_id)] == ["template"]  # the old window's records dropped out


async def test_meta_closing_the_window_until_the_customer_writes(store, sender_id):
    h = history(store)
    await save(store, sender_id, customer_message("hi", T0))
    await h.record(sender_id, {"kind": "closed", "at": T0 + H, "window_of": T0, "code": 131047})
    facts, _ = await h.facts(sender_id, T0 + 2 * H, POLICY)
    assert facts.closed_at == T0 + H and not facts.is_open(T0 + 2 * H, POLICY)
    await save(store, sender_id, customer_message("hello?", T0 + 3 * H))
    facts, _ = await history(store).facts(sender_id, T0 + 4 * H, POLICY)
    assert facts.is_open(T0 + 4 * H, POLICY)


async def test_the_customers_tracker_is_never_written(store, sender_id):
    await save(store, sender_id, customer_message("hi", T0))
    before = (await store.retrieve_full_tracker(sender_id)).events
    await history(store).record(sender_id, {"kind": "suppressed", "at": T0, "window_of": T0})
    assert (await store.retrieve_full_tracker(sender_id)).events == before
    assert (await store.retrieve(LEDGER_PREFIX + sender_id)) is not None


async def test_the_cache_may_say_open_but_closed_is_read_from_the_store(store, sender_id):
    h = history(store)
    h.saw_inbound(sender_id, T0)  # a webhook this instance received
    facts, _ = await h.facts(sender_id, T0 + H, POLICY)
    assert facts.is_open(T0 + H, POLICY)  # answered from the cache: the store has nothing yet
    await save(store, sender_id, customer_message("hi again", T0 + 20 * H))  # written through another instance
    facts, _ = await h.facts(sender_id, T0 + 30 * H, POLICY)
    assert facts.last_inbound_at == T0 + 20 * H and facts.is_open(T0 + 30 * H, POLICY)


async def test_in_flight_message_counts_before_rasa_saves_it(store, sender_id):
    facts, _ = await history(store).facts(sender_id, T0 + 5, POLICY, in_flight_inbound_at=T0)
    assert facts.is_open(T0 + 5, POLICY)


async def test_unreadable_store_means_unknown_not_never_wrote(tmp_path, sender_id):
    store = SQLTrackerStore(DOMAIN, dialect="sqlite", db=str(tmp_path / "broken.db"))
    with store.engine.begin() as connection:
        connection.exec_driver_sql("DROP TABLE events")
    facts, _ = await history(store).facts(sender_id, T0, POLICY)
    assert facts.unknown and "OperationalError" in facts.unknown
