"""The atomic Redis lock store against the real Redis (REDIS_URL), with separate store objects
standing for separate Rasa instances."""

import asyncio
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import List

from rasa.core.lock_store import LockError, LockStore
from rasa.utils.endpoints import EndpointConfig

import pytest

from connector.lock_store import AtomicRedisLockStore
from tests.services import redis_settings

pytestmark = pytest.mark.services

ATOMIC = "connector.lock_store.AtomicRedisLockStore"
STOCK = "redis"  # Rasa's own RedisLockStore: tickets changed with GET, then SET


def store():
    settings = redis_settings()
    return AtomicRedisLockStore(EndpointConfig(url=settings.pop("host"), **settings))


def lock_store(type_):
    """A lock store as Rasa builds it from the endpoints.yml block."""
    settings = redis_settings()
    return LockStore.create(EndpointConfig(url=settings.pop("host"), type=type_, **settings))


def test_built_by_rasa_from_endpoints_yml():
    created = lock_store(ATOMIC)
    assert isinstance(created, AtomicRedisLockStore)
    assert created.red.ping()


def test_concurrent_tickets_from_two_instances_are_unique_and_none_is_lost():
    conversation = f"lock-test-{uuid.uuid4().hex}"
    instances = [store(), store()]

    def issue(n):
        return instances[n % 2].issue_ticket(conversation)

    with ThreadPoolExecutor(max_workers=8) as pool:
        tickets = list(pool.map(issue, range(200)))
    assert sorted(tickets) == list(range(200))
    lock = instances[0].get_lock(conversation)
    assert len(lock.tickets) == 200

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda t: instances[t % 2].cleanup(conversation, t), tickets))
    assert instances[0].get_lock(conversation) is None  # the last one out deleted the lock


INSTANCES = 2  # threads, each with its own event loop and its own lock store
REQUESTS = 3  # concurrent requests per instance, all for one conversation
TURNS = 10  # turns per request, one after the other
HOLD = 0.002  # seconds a turn stays inside the lock
POLL = 0.002  # wait_time_in_seconds: how often a waiting request looks at the lock again
DEADLINE = 4.0  # seconds; the atomic store needs about 0.5. A request still waiting then is hung


@dataclass
class Turns:
    overlaps: int = 0  # a turn entered while another was inside
    lost: List[LockError] = field(default_factory=list)  # "Could not acquire lock": lock gone
    hung: int = 0  # requests still waiting at the deadline: their ticket was lost
    errors: List[BaseException] = field(default_factory=list)  # anything else: a broken test
    completed: int = 0
    contended: int = 0  # turns that ran while the other instance had requests waiting
    lock_left: bool = False

    @property
    def went_wrong(self):
        return bool(self.overlaps or self.lost or self.hung)


def run_turns(type_) -> Turns:
    """TURNS turns of REQUESTS concurrent requests on each of INSTANCES instances, one
    conversation. The instances are threads, so their Redis calls really interleave (the GIL is
    released on every socket call); a shared counter behind a threading lock sees overlaps."""
    conversation = f"lock-test-{uuid.uuid4().hex}"
    stores = [lock_store(type_) for _ in range(INSTANCES)]
    for each in stores:
        assert each.red.ping()  # no Redis: fail here, never skip or count it as the store's fault
    outcome = Turns()
    guard = threading.Lock()
    inside = 0
    waiting = [0] * INSTANCES
    stop = threading.Event()  # something went wrong: no need to go on
    deadline = time.monotonic() + DEADLINE

    async def turn(i, store):
        nonlocal inside
        with guard:
            waiting[i] += 1
        entered = False
        try:
            async with store.lock(conversation, wait_time_in_seconds=POLL):
                with guard:
                    waiting[i] -= 1
                    entered = True
                    inside += 1
                    if inside > 1:
                        outcome.overlaps += 1
                        stop.set()
                    outcome.contended += any(n for j, n in enumerate(waiting) if j != i)
                try:
                    await asyncio.sleep(HOLD)
                finally:
                    with guard:
                        inside -= 1
                        outcome.completed += 1
        finally:
            if not entered:
                with guard:
                    waiting[i] -= 1

    async def request(i, store):
        try:
            for _ in range(TURNS):
                if stop.is_set():
                    return
                await turn(i, store)
        except LockError as error:
            with guard:
                (outcome.lost if "Could not acquire lock" in str(error) else outcome.errors).append(error)
            stop.set()
        except Exception as error:
            with guard:
                outcome.errors.append(error)
            stop.set()

    async def serve(i, store):
        requests = [asyncio.create_task(request(i, store)) for _ in range(REQUESTS)]
        while not all(r.done() for r in requests) and not stop.is_set():
            if time.monotonic() > deadline:
                with guard:
                    outcome.hung += sum(not r.done() for r in requests)
                stop.set()
                break
            await asyncio.sleep(0.01)
        for r in requests:
            r.cancel()
        await asyncio.gather(*requests, return_exceptions=True)

    def instance(i, store):
        try:
            asyncio.run(serve(i, store))
        except BaseException as error:
            with guard:
                outcome.errors.append(error)

    threads = [threading.Thread(target=instance, args=(i, s), daemon=True) for i, s in enumerate(stores)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(DEADLINE + 5)
    assert not any(thread.is_alive() for thread in threads), "an instance did not stop"
    outcome.lock_left = stores[0].get_lock(conversation) is not None
    stores[0].delete_lock(conversation)
    return outcome


def test_turns_on_two_instances_never_overlap():
    outcome = run_turns(ATOMIC)
    assert not outcome.errors, outcome.errors
    assert outcome.overlaps == 0 and not outcome.lost and not outcome.hung, outcome
    assert outcome.completed == INSTANCES * REQUESTS * TURNS, outcome
    assert outcome.contended > 0, outcome  # the instances really did queue behind each other
    assert not outcome.lock_left, outcome  # the last one out deleted the lock


def test_the_same_turns_go_wrong_with_rasas_stock_redis_lock_store():
    """Proof that the test above can fail: Rasa's RedisLockStore, built the same way, overlaps
    turns, loses tickets or hangs in the same scenario."""
    outcome = run_turns(STOCK)
    assert not outcome.errors, outcome.errors
    assert outcome.went_wrong, outcome
