"""Purge in the engine, on the real Redis: batches, literal prefixes, what is counted."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from cache.clock import SystemClock
from cache.entry import Entry
from cache.memory import MemoryTier
from cache.purge import Purger
from cache.redis_tier import RedisTier, client_from_url
from cache.tiered import TieredCache

pytestmark = pytest.mark.redis

CLOCK = SystemClock()


@pytest.fixture
async def tiers(
    redis_url: str, key_prefix: str, redis_client: Redis
) -> AsyncIterator[tuple[TieredCache, RedisTier]]:
    l2 = RedisTier(client_from_url(redis_url, timeout=2.0), key_prefix=key_prefix, timeout=2.0)
    l1 = MemoryTier(max_entries=10_000, max_bytes=1 << 26, clock=CLOCK)
    cache = TieredCache(l1, l2, clock=CLOCK)
    yield cache, l2
    await cache.aclose()


def entry() -> Entry:
    return Entry(200, (), b"x", CLOCK.time(), 60)


async def test_a_prefix_purge_walks_redis_in_batches_and_removes_every_matching_key(
    tiers: tuple[TieredCache, RedisTier],
) -> None:
    cache, l2 = tiers
    for n in range(1_200):
        await l2.set(f"users:{n}", "", entry(), 60)
    await l2.set("items:1", "", entry(), 60)
    batches = [keys async for keys in l2.keys_with_prefix("users:", batch=200)]
    assert len(batches) > 1
    assert sum(len(keys) for keys in batches) == 1_200
    assert await Purger(cache, l2, None).prefix("users:") == 1_200
    assert await l2.get("users:7") is None
    assert await l2.get("items:1") is not None


async def test_a_prefix_is_matched_literally_not_as_a_pattern(
    tiers: tuple[TieredCache, RedisTier],
) -> None:
    cache, l2 = tiers
    for key in ("a*b:1", "a*b:2", "axb:1", "a?b:1", "a[b]:1"):
        await l2.set(key, "", entry(), 60)
    purger = Purger(cache, l2, None)
    assert await purger.prefix("a*b:") == 2
    assert await purger.prefix("a[b]") == 1
    assert await l2.get("axb:1") is not None
    assert await l2.get("a?b:1") is not None


async def test_keys_held_only_in_this_replicas_l1_are_purged_and_counted(
    tiers: tuple[TieredCache, RedisTier],
) -> None:
    cache, l2 = tiers
    await cache.l1.set("users:1", "", entry(), 60)  # never reached L2
    await l2.set("users:2", "", entry(), 60)
    await cache.l1.set("users:2", "", entry(), 60)  # in both: counted once
    assert await Purger(cache, l2, None).prefix("users:") == 2
    assert await cache.l1.get("users:1") is None
