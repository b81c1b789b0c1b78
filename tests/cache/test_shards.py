"""The queue's shards: a key's stable place, fair claims, figures summed, slots on every master
of the session's three-master Cluster."""

from __future__ import annotations

import zlib
from collections import Counter

import pytest
from redis.asyncio.cluster import RedisCluster

from cache.redis.tier import RedisClient, client_from_url
from cache.write_behind.queue import WriteQueue
from cache.write_behind.shards import DEFAULT_SHARDS, shard_layouts, shard_of
from tests.cache.test_queue import LEASE, put
from tests.conftest import deployment_of
from tests.fakes import FakeClock
from tests.redis_keys import drop_prefix


def sharded(client: RedisClient, key_prefix: str, clock: FakeClock, shards: int) -> WriteQueue:
    return WriteQueue(client, key_prefix=key_prefix, timeout=2.0, clock=clock, shards=shards)


def keys_in(shard: int, shards: int, count: int, start: int = 0) -> list[str]:
    """``count`` logical keys that land in ``shard``."""
    found: list[str] = []
    n = start
    while len(found) < count:
        if shard_of(f"k:{n}", shards) == shard:
            found.append(f"k:{n}")
        n += 1
    return found


def test_a_key_lands_in_the_same_shard_in_every_process() -> None:
    # crc32, not the salted hash(): the answer is a constant, here and in any other process.
    assert shard_of("users:1", 16) == zlib.crc32(b"users:1") % 16 == 13
    assert Counter(shard_of(f"users:{n}", 16) for n in range(1600)).most_common()[-1][1] > 70


def test_the_shard_count_is_checked() -> None:
    with pytest.raises(ValueError, match="1 to 256 shards, not 0"):
        shard_layouts("p:", 0)


async def test_a_busy_shard_does_not_starve_the_others_and_still_fills_a_batch(
    client: RedisClient, key_prefix: str, clock: FakeClock
) -> None:
    queue = sharded(client, key_prefix, clock, 4)
    busy = keys_in(0, 4, 30)
    quiet = [keys_in(shard, 4, 1)[0] for shard in (1, 2, 3)]
    for key in busy + quiet:
        await queue.enqueue(put(key, b"x"))
    first = {claim.write.key for claim in await queue.claim(4, LEASE)}
    assert set(quiet) <= first  # each shard got its share of the batch at once
    assert len(first) == 4
    # Only the busy shard is left: it takes the whole batch, not its share of it.
    assert len(await queue.claim(20, LEASE)) == 20
    assert len(await queue.claim(20, LEASE)) == 30 - 1 - 20


async def test_with_a_batch_smaller_than_the_shards_every_shard_has_its_turn(
    client: RedisClient, key_prefix: str, clock: FakeClock
) -> None:
    queue = sharded(client, key_prefix, clock, 4)
    for shard in range(4):
        for key in keys_in(shard, 4, 5):
            await queue.enqueue(put(key, b"x"))
    served: Counter[int] = Counter()
    for _ in range(4):
        served.update(shard_of(claim.write.key, 4) for claim in await queue.claim(1, LEASE))
    assert served == {0: 1, 1: 1, 2: 1, 3: 1}


async def test_the_writes_of_a_key_are_ordered_and_coalesced_in_its_shard(
    client: RedisClient, key_prefix: str, clock: FakeClock
) -> None:
    queue = sharded(client, key_prefix, clock, DEFAULT_SHARDS)
    answers = [await queue.enqueue(put(f"k:{n % 5}", str(n).encode())) for n in range(50)]
    for key in range(5):
        seqs = [answer.seq for n, answer in enumerate(answers) if n % 5 == key]
        assert seqs == sorted(set(seqs))
    claims = await queue.claim(100, LEASE)
    assert sorted((c.write.key, c.write.entry.body) for c in claims) == [
        (f"k:{key}", str(45 + key).encode()) for key in range(5)
    ]


async def test_stats_dead_letters_and_replay_cover_every_shard(
    client: RedisClient, key_prefix: str, clock: FakeClock
) -> None:
    queue = sharded(client, key_prefix, clock, 4)
    keys = [keys_in(shard, 4, 2)[n] for shard in range(4) for n in range(2)]
    for key in keys:
        await queue.enqueue(put(key, b"x"))
        clock.advance(1)
    stats = await queue.stats()
    assert (stats.depth, stats.oldest_age, stats.dead) == (8, 8.0, 0)
    claims = await queue.claim(8, LEASE)
    for claim in claims[:5]:
        await queue.fail(claim, "refused", retry_in=None)
    assert (await queue.stats()).dead == 5
    letters = await queue.dead_letters(limit=3)
    assert len(letters) == 3
    assert [letter.failed_at for letter in letters] == sorted(x.failed_at for x in letters)
    assert len(await queue.dead_letters()) == 5
    assert sorted(await queue.replay()) == sorted(c.write.key for c in claims[:5])
    assert (await queue.stats()).depth == 8


async def test_on_a_cluster_the_queue_spreads_over_every_master(
    request: pytest.FixtureRequest, key_prefix: str, clock: FakeClock
) -> None:
    cluster = client_from_url(deployment_of(request, "cluster").url, timeout=2.0)
    assert isinstance(cluster, RedisCluster)
    try:
        queue = sharded(cluster, key_prefix, clock, DEFAULT_SHARDS)
        for n in range(200):
            await queue.enqueue(put(f"users:{n}", b"x"))
        found = [key async for key in cluster.scan_iter(match=f"{key_prefix}{{wb:*}}:values")]
        assert len(found) == DEFAULT_SHARDS
        masters = Counter(str(cluster.get_node_from_key(key)) for key in found)
        assert len(masters) == 3, masters
        assert len(await queue.claim(200, LEASE)) == 200
    finally:
        await drop_prefix(cluster, key_prefix)
        await cluster.aclose()


async def test_a_failing_shard_holds_up_only_its_own_keys(
    client: RedisClient, key_prefix: str, clock: FakeClock
) -> None:
    """A shard whose keys are not the queue's (WRONGTYPE: any Redis error of one shard, a
    master down) leaves the others' claims and replays going."""
    queue = sharded(client, key_prefix, clock, 4)
    for shard in (0, 1, 2):
        await queue.enqueue(put(keys_in(shard, 4, 1)[0], b"x"))
    for claim in await queue.claim(4, LEASE):
        await queue.fail(claim, "refused", retry_in=None)
    for shard in (0, 1):
        await queue.enqueue(put(keys_in(shard, 4, 1, start=1000)[0], b"x"))
    broken = shard_layouts(key_prefix, 4)[2]
    await client.set(broken["ready"], b"not a sorted set")
    await client.set(broken["corpses"], b"not a hash")
    claims = await queue.claim(4, LEASE)
    assert sorted(shard_of(claim.write.key, 4) for claim in claims) == [0, 1]
    assert sorted(shard_of(key, 4) for key in await queue.replay()) == [0, 1]
