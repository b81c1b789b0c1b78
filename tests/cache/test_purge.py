"""Purge in the engine, on the real Redis and on a Redis Cluster: batches, literal prefixes,
tags, what is counted."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from redis.asyncio.cluster import RedisCluster

from cache.clock import SystemClock
from cache.entry import Entry
from cache.memory import MemoryTier
from cache.purge import Purger
from cache.redis.tier import RedisTier, client_from_url
from cache.tiered import TieredCache
from tests.conftest import deployment_of
from tests.redis_keys import drop_prefix
from tests.redis_servers import Deployment

pytestmark = pytest.mark.redis

CLOCK = SystemClock()


@pytest.fixture(params=["redis", "cluster"])
async def tiers(
    request: pytest.FixtureRequest, key_prefix: str
) -> AsyncIterator[tuple[TieredCache, RedisTier]]:
    url = deployment_of(request, request.param).url
    l2 = RedisTier(client_from_url(url, timeout=2.0), key_prefix=key_prefix, timeout=2.0)
    l1 = MemoryTier(max_entries=10_000, max_bytes=1 << 26, clock=CLOCK)
    cache = TieredCache(l1, l2, clock=CLOCK)
    yield cache, l2
    await cache.aclose()
    cleaner = client_from_url(url, timeout=2.0)
    await drop_prefix(cleaner, key_prefix)
    await cleaner.aclose()


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


async def test_a_tag_purge_drops_the_tagged_keys_and_the_tag(
    tiers: tuple[TieredCache, RedisTier],
) -> None:
    cache, l2 = tiers
    await l2.set("users:1", "", entry(), 60, tags=["team:a", "all"])
    await l2.set("users:2", "", entry(), 60, tags=["team:b", "all"])
    assert await Purger(cache, l2, None).tag("team:a") == 1
    assert await l2.get("users:1") is None
    assert await l2.get("users:2") is not None
    assert await tagged(l2, "team:a") == []  # the tag's set went with the purge
    assert await tagged(l2, "all") == ["users:1", "users:2"]


async def tagged(l2: RedisTier, tag: str) -> list[str]:
    return sorted([key async for batch in l2.tagged(tag) for key in batch])


async def test_a_tag_purge_cut_short_loses_nothing_and_can_be_sent_again(
    tiers: tuple[TieredCache, RedisTier],
) -> None:
    cache, l2 = tiers
    for n in range(5):
        await l2.set(f"users:{n}", "", entry(), 60, tags=["all"])
    # A purge that stopped after its first batch (Redis went away).
    first = await anext(l2.tagged("all", batch=2))
    await cache.purge(first)
    assert len(await tagged(l2, "all")) == 5  # the index is still whole
    assert await Purger(cache, l2, None).tag("all") == 5 - len(first)
    assert await tagged(l2, "all") == []


async def test_keys_that_look_like_cachecars_own_records_stay_apart_from_them(
    tiers: tuple[TieredCache, RedisTier], key_prefix: str
) -> None:
    cache, l2 = tiers
    await l2.set("users:1", "", entry(), 60, tags=["user:1"])
    # A path parameter can be anything, such as the names of the tag set or the queue.
    for key in ("!tag:user:1", "{wb}:values", "!lease:0:users:1"):
        assert await l2.get(key) is None
        await l2.set(key, "", entry(), 60)
        assert await l2.get(key) is not None
    assert await tagged(l2, "user:1") == ["users:1"]  # the tag's set is untouched
    purger = Purger(cache, l2, None)
    assert await purger.prefix("{wb}") == 1  # the look-alike key, not the queue's records
    assert await purger.prefix("!") == 2
    assert await tagged(l2, "user:1") == ["users:1"]
    assert await purger.tag("user:1") == 1


async def test_on_a_cluster_the_listing_sees_the_keys_of_every_primary(
    redis_cluster: Deployment, key_prefix: str
) -> None:
    client = client_from_url(redis_cluster.url, timeout=2.0)
    assert isinstance(client, RedisCluster)
    l2 = RedisTier(client, key_prefix=key_prefix, timeout=2.0)
    try:
        keys = [f"users:{n}" for n in range(60)]
        for key in keys:
            await l2.set(key, "", entry(), 60)
        nodes = [client.get_node_from_key(key_prefix + key) for key in keys]
        homes = {node.name for node in nodes if node is not None}
        assert homes == {node.name for node in client.get_primaries()}
        assert len(homes) == 3
        listed = [key async for batch in l2.keys_with_prefix("users:") for key in batch]
        assert sorted(listed) == sorted(keys)
    finally:
        await drop_prefix(client, key_prefix)
        await l2.aclose()
