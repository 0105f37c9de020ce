"""The atomic Redis lock store against the real Redis (REDIS_URL), with two store objects
standing for two Rasa instances."""

import asyncio
import uuid
from concurrent.futures import ThreadPoolExecutor

from rasa.core.lock_store import LockStore
from rasa.utils.endpoints import EndpointConfig

import pytest

from connector.lock_store import AtomicRedisLockStore
from tests.services import redis_settings

pytestmark = pytest.mark.services


def store():
    settings = redis_settings()
    return AtomicRedisLockStore(EndpointConfig(url=settings.pop("host"), **settings))


def test_built_by_rasa_from_endpoints_yml():
    settings = redis_settings()
    config = EndpointConfig(url=settings.pop("host"), type="connector.lock_store.AtomicRedisLockStore", **settings)
    created = LockStore.create(config)
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


async def test_turns_on_two_instances_never_overlap():
    conversation = f"lock-test-{uuid.uuid4().hex}"
    instances = [store(), store()]
    inside, overlaps = 0, 0

    async def turn(n):
        nonlocal inside, overlaps
        async with instances[n % 2].lock(conversation, wait_time_in_seconds=0.01):
            inside += 1
            overlaps += inside > 1
            await asyncio.sleep(0.005)
            inside -= 1

    await asyncio.wait_for(asyncio.gather(*(turn(n) for n in range(20))), timeout=30)
    assert overlaps == 0
    assert instances[0].get_lock(conversation) is None
