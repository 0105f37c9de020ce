"""Once per wamid, in one process and across processes sharing a REAL Redis (env `REDIS_URL`).

These tests fail, not skip, when that Redis is missing: cross-instance dedup is what keeps a
customer from being answered twice when Meta retries into another instance.
"""

import asyncio
import logging
import socket
import uuid

import pytest
import redis.asyncio

from connector.dedup import DEFAULT_TTL_SECONDS, Deduplicator, dedup_key
from connector.payloads import parse_webhook
from tests.fixtures.loader import webhook
from tests.services import REDIS_URL

pytestmark = pytest.mark.services


@pytest.fixture
async def prefix():
    """A key prefix of this test's own; its keys are deleted afterwards."""
    prefix = f"test:dedup:{uuid.uuid4().hex}:"
    client = redis.asyncio.from_url(REDIS_URL)
    try:
        assert await client.ping(), f"no Redis at {REDIS_URL}"
        yield prefix
        keys = [key async for key in client.scan_iter(match=prefix + "*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.close()


@pytest.fixture
async def make(prefix):
    made = []

    def make(**kwargs):
        kwargs.setdefault("prefix", prefix)
        dedup = Deduplicator(**kwargs)
        made.append(dedup)
        return dedup

    yield make
    for dedup in made:
        await dedup.close()


def dead_redis_url():
    """A local port nobody listens on: connections are refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"redis://127.0.0.1:{port}/0"


async def test_memory_only_first_time_once(make):
    dedup = make()
    assert await dedup.first_time("message:wamid.A") is True
    assert await dedup.first_time("message:wamid.A") is False
    assert await dedup.first_time("message:wamid.B") is True


async def test_memory_is_bounded_and_forgets_the_least_recently_seen(make):
    dedup = make(capacity=3)
    for key in "abc":
        assert await dedup.first_time(key)
    assert await dedup.first_time("a") is False  # a is now the most recent
    assert await dedup.first_time("d") is True  # evicts b
    assert len(dedup._seen) == 3
    assert await dedup.first_time("b") is True
    assert await dedup.first_time("a") is False


async def test_concurrent_duplicates_in_one_process_pass_once(make):
    dedup = make(redis_url=REDIS_URL)
    results = await asyncio.gather(*(dedup.first_time("message:wamid.same") for _ in range(20)))
    assert results.count(True) == 1


async def test_second_instance_sees_the_first_instances_message(make):
    first, second = make(redis_url=REDIS_URL), make(redis_url=REDIS_URL)
    assert await first.first_time("message:wamid.X") is True
    assert await second.first_time("message:wamid.X") is False
    assert await second.first_time("message:wamid.Y") is True
    assert await first.first_time("message:wamid.Y") is False


async def test_redis_remembers_past_the_memory_bound(make):
    dedup = make(redis_url=REDIS_URL, capacity=1)
    assert await dedup.first_time("one") is True
    assert await dedup.first_time("two") is True  # "one" leaves memory
    assert await dedup.first_time("one") is False  # Redis still has it


async def test_key_expires_after_eight_days_by_default(make, prefix):
    dedup = make(redis_url=REDIS_URL)
    assert DEFAULT_TTL_SECONDS == 8 * 24 * 3600
    await dedup.first_time("message:wamid.T")
    client = redis.asyncio.from_url(REDIS_URL)
    try:
        assert await client.get(prefix + "message:wamid.T") == b"1"
        assert DEFAULT_TTL_SECONDS - 5 <= await client.ttl(prefix + "message:wamid.T") <= DEFAULT_TTL_SECONDS
    finally:
        await client.close()


async def test_custom_ttl(make, prefix):
    dedup = make(redis_url=REDIS_URL, ttl_seconds=60)
    await dedup.first_time("k")
    client = redis.asyncio.from_url(REDIS_URL)
    try:
        assert 55 <= await client.ttl(prefix + "k") <= 60
    finally:
        await client.close()


async def test_unreachable_redis_falls_back_to_memory_and_warns_once(make, caplog):
    dedup = make(redis_url=dead_redis_url())
    with caplog.at_level(logging.WARNING, logger="connector.dedup"):
        assert await dedup.first_time("message:wamid.1") is True
        assert await dedup.first_time("message:wamid.1") is False
        assert await dedup.first_time("message:wamid.2") is True
    warnings = [r for r in caplog.records if "Dedup Redis unreachable" in r.getMessage()]
    assert len(warnings) == 1


async def test_redis_is_retried_after_a_rest_and_used_again(make, prefix):
    now = [0.0]
    dedup = make(redis_url=dead_redis_url(), retry_after_seconds=10, clock=lambda: now[0])
    assert await dedup.first_time("a") is True
    assert dedup._redis_resting()
    # Redis comes back (here: the client is pointed at the real one).
    await dedup._redis.close()
    dedup._redis = redis.asyncio.from_url(REDIS_URL)
    other = make(redis_url=REDIS_URL)
    assert await other.first_time("b") is True
    assert await dedup.first_time("b") is True  # still resting: memory only
    now[0] = 11.0
    assert await dedup.first_time("c") is True
    assert not dedup._redis_resting()
    assert await other.first_time("c") is False


@pytest.mark.parametrize("kwargs", [{"capacity": 0}, {"ttl_seconds": 0}])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        Deduplicator(**kwargs)


def test_keys_of_every_item_kind():
    (message,) = parse_webhook(webhook("text")).messages
    assert dedup_key(message) == "message:wamid.HBgLMTYzMTU1NTExODEVAgASGBQM0E0QTY1OTlBRUUwMzgxMDE0NDAAA="
    (sent,) = parse_webhook(webhook("status_sent")).statuses
    (delivered,) = parse_webhook(webhook("status_delivered")).statuses
    assert sent.wamid == delivered.wamid
    assert dedup_key(sent) == f"status:{sent.wamid}:sent" != dedup_key(delivered)
    (change,) = parse_webhook(webhook("system_user_changed_number")).system_changes
    assert dedup_key(change) == f"message:{change.wamid}"
    (connect,) = parse_webhook(webhook("call_connect")).calls
    (terminate,) = parse_webhook(webhook("call_terminate")).calls
    assert connect.call_id == terminate.call_id and dedup_key(connect) != dedup_key(terminate)
    assert dedup_key(connect) == f"call:{connect.call_id}:connect:"
    (preference,) = parse_webhook(webhook("user_preferences_marketing_stop")).preferences
    assert dedup_key(preference) == "preference:16315551181:marketing_messages:stop:1732545300"
    with pytest.raises(TypeError):
        dedup_key(parse_webhook(webhook("account_update")).notices[0])


async def test_a_retried_webhook_is_processed_once(make):
    """The channel's use: every item of a webhook Meta delivers twice passes only the first time."""
    dedup = make(redis_url=REDIS_URL)
    body = webhook("batch_three_customers")

    async def fresh():
        parsed = parse_webhook(body)
        return [m.wamid for m in parsed.messages if await dedup.first_time(dedup_key(m))]

    assert len(await fresh()) == 3
    assert await fresh() == []
