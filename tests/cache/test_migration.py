"""A queue left by an older cachecar (one slot, ``{wb}``) is drained into the shards: nothing
lost, nothing sent twice over a newer write, dead letters kept, whoever migrates and however
often; on fakeredis, the real Redis, the session's three-master Cluster (where the old slot
and the shards' are on different masters) and behind Sentinel."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from cache.clock import Clock
from cache.errors import TierUnavailable
from cache.redis.tier import RedisClient
from cache.write_behind.migration import Migration
from cache.write_behind.queue import MIGRATE_EVERY, WriteQueue
from cache.write_behind.records import dump
from cache.write_behind.scripts import CLAIM, ENQUEUE, FAIL
from cache.write_behind.shards import Layout, single_slot
from tests.cache.test_queue import LEASE, put
from tests.fakes import FakeClock

SHARDS = 4


class OldQueue:
    """The queue as cachecar wrote it before the shards: every key under ``{wb}``, run by the
    same scripts (they have not changed)."""

    def __init__(self, client: RedisClient, key_prefix: str, clock: Clock) -> None:
        self.layout: Layout = single_slot(key_prefix)
        self._clock = clock
        self._enqueue = client.register_script(ENQUEUE)
        self._claim = client.register_script(CLAIM)
        self._fail = client.register_script(FAIL)

    def _now(self) -> int:
        return round(self._clock.time() * 1000)

    async def enqueue(self, key: str, body: bytes, *, settled: bool = False) -> int:
        now = self._now()
        keys = self.layout.keys(
            "seq", "values", "seqs", "ready", "since", "dead", "corpses", "unsettled"
        )
        [seq, _] = await self._enqueue(keys=keys, args=[now, 0, now, 1, key, dump(put(key, body))])
        if settled:
            await self._enqueue(keys=keys, args=[now, 0, now, 0, key, seq])
        return int(seq)

    async def claim(self, limit: int) -> list[Any]:
        now = self._now()
        flat = await self._claim(
            keys=self.layout.keys("ready", "values", "seqs", "tries", "unsettled"),
            args=[now, round(LEASE * 1000), limit, now],
        )
        return [(flat[i].decode(), int(flat[i + 1])) for i in range(0, len(flat), 5)]

    async def fail(self, key: str, seq: int, *, dead: bool) -> None:
        now = self._now()
        letter = json.dumps(
            {
                "key": key,
                "method": "PUT",
                "path": f"/{key}",
                "attempts": 1,
                "last_error": "refused",
                "failed_at": now / 1000,
            }
        )
        await self._fail(
            keys=self.layout.keys(
                "ready", "values", "seqs", "since", "tries", "dead", "corpses", "unsettled"
            ),
            args=[
                key,
                seq,
                now,
                now + 5000,
                int(dead),
                letter,
                dump(put(key, b"dead")),
                now + 10_000,
            ],
        )


def new_queue(
    client: RedisClient, key_prefix: str, clock: FakeClock, *, reshard: bool = True
) -> WriteQueue:
    """A replica of this version; ``reshard`` (write_behind.reshard): it moves an older
    cachecar's queue into the shards, where one without keeps using the older one's slot."""
    return WriteQueue(
        client, key_prefix=key_prefix, timeout=5.0, clock=clock, shards=SHARDS, reshard=reshard
    )


async def left_behind(client: RedisClient, key_prefix: str, clock: FakeClock) -> OldQueue:
    """An older cachecar's queue: 20 writes (k:0 settled, k:1 leased, k:2 backing off) and two
    dead letters (d:0 with its write, d:1 superseded by a newer write: no corpse)."""
    old = OldQueue(client, key_prefix, clock)
    for n in range(20):
        await old.enqueue(f"k:{n}", f"v{n}".encode(), settled=n == 0)
    for key in ("d:0", "d:1"):
        await old.enqueue(key, b"dead")
    clock.advance(0.001)
    claimed = dict(await old.claim(100))
    await old.fail("k:2", claimed["k:2"], dead=False)
    await old.fail("d:0", claimed["d:0"], dead=True)
    await old.fail("d:1", claimed["d:1"], dead=True)
    await old.enqueue("d:1", b"newer")  # its dead letter is dropped: d:1 is a write again
    await old.fail("d:1", claimed["d:1"], dead=True)  # no-op: that lease was taken over
    return old


async def test_a_newer_replica_shares_an_older_cachecars_queue_until_a_reshard(
    client: RedisClient, key_prefix: str, clock: FakeClock
) -> None:
    """A rolling upgrade: older and newer replicas write to one queue, so one key's writes are
    ordered by one counter; nothing moves into the shards until write_behind.reshard."""
    old = OldQueue(client, key_prefix, clock)
    first = await old.enqueue("k:1", b"old")
    queue = new_queue(client, key_prefix, clock, reshard=False)
    newer = await queue.enqueue(put("k:1", b"newer"))
    assert (newer.seq, newer.coalesced) == (first + 1, True)
    assert await old.enqueue("k:1", b"latest") == first + 2
    assert await queue.pending("k:1") == put("k:1", b"latest")
    await queue.enqueue(put("k:2", b"2"))
    clock.advance(MIGRATE_EVERY)  # a later look moves nothing either
    assert (await queue.stats()).depth == 2
    assert [key async for key in client.scan_iter(match=f"{key_prefix}{{wb:*")] == []
    assert await client.get(f"{key_prefix}{{wb}}:shards") == b"0"
    claims = {claim.write.key: claim.write for claim in await queue.claim(10, LEASE)}
    assert claims == {"k:1": put("k:1", b"latest"), "k:2": put("k:2", b"2")}

    # Every replica stopped, one started with write_behind.reshard: into the shards.
    clock.advance(LEASE)
    moved = new_queue(client, key_prefix, clock)
    assert (await moved.stats()).depth == 2
    assert await client.get(f"{key_prefix}{{wb}}:shards") == str(SHARDS).encode()
    assert await client.hlen(old.layout["values"]) == 0
    assert (await moved.enqueue(put("k:1", b"after"))).seq > first + 2


async def test_an_older_queue_is_moved_into_the_shards_whole(
    client: RedisClient, key_prefix: str, clock: FakeClock
) -> None:
    old = await left_behind(client, key_prefix, clock)
    old_seq = int(await client.get(old.layout["seq"]))  # type: ignore[arg-type]
    queue = new_queue(client, key_prefix, clock)
    stats = await queue.stats()
    assert (stats.depth, stats.dead) == (21, 1)
    # What was left of the old queue is gone, but its seq (the floor of the shards') and the
    # shard count the queue is laid out in now.
    left = {key async for key in client.scan_iter(match=f"{key_prefix}{{wb}}*")}
    assert left == {old.layout["seq"].encode(), f"{key_prefix}{{wb}}:shards".encode()}
    assert (await queue.enqueue(put("k:5", b"new"))).seq > old_seq

    # Every write keeps what it was: the leases and backoff of the older cachecar's flusher
    # (it had claimed them all; d:1 was written again since), the settled mark.
    [again] = await queue.claim(100, LEASE)
    assert (again.write.key, again.write.entry.body) == ("d:1", b"newer")
    clock.advance(LEASE)
    claims = {claim.write.key: claim for claim in await queue.claim(100, LEASE)}
    assert sorted(claims) == sorted([f"k:{n}" for n in range(20)] + ["d:1"])
    assert claims["k:2"].tries == 1
    assert claims["k:5"].write.entry.body == b"new"
    assert claims["k:7"].write.entry.body == b"v7"
    assert claims["d:1"].write.entry.body == b"newer"
    assert [key for key, claim in claims.items() if not claim.unsettled] == ["k:0"]
    [letter] = await queue.dead_letters()
    assert letter.key == "d:0"
    assert await queue.replay() == ["d:0"]


async def test_a_migration_cut_short_is_finished_by_the_next_without_loss(
    client: RedisClient, key_prefix: str, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The migrator dies between the copy into the shards and the drop from the old slot."""
    await left_behind(client, key_prefix, clock)
    dying = new_queue(client, key_prefix, clock)

    async def die(*args: object, **kwargs: object) -> None:
        raise ConnectionError("killed")

    peek, adopt, _ = dying._migration._scripts["values"]
    monkeypatch.setitem(dying._migration._scripts, "values", (peek, adopt, die))
    with pytest.raises(Exception, match="killed"):
        await dying.stats()
    survivor = new_queue(client, key_prefix, clock)
    stats = await survivor.stats()
    assert (stats.depth, stats.dead) == (21, 1)
    clock.advance(LEASE)
    claims = await survivor.claim(100, LEASE)
    assert len(claims) == len({claim.write.key for claim in claims}) == 21


async def test_replicas_starting_at_once_move_every_write_once(
    client: RedisClient, key_prefix: str, clock: FakeClock
) -> None:
    await left_behind(client, key_prefix, clock)
    replicas = [new_queue(client, key_prefix, clock) for _ in range(5)]
    figures = await asyncio.gather(*(replica.stats() for replica in replicas))
    assert {(stats.depth, stats.dead) for stats in figures} == {(21, 1)}
    clock.advance(LEASE)
    claims = [c for replica in replicas for c in await replica.claim(100, LEASE)]
    assert len(claims) == len({claim.write.key for claim in claims}) == 21


async def test_a_migrator_that_read_a_write_before_another_moved_it_never_sends_it_again(
    client: RedisClient, key_prefix: str, clock: FakeClock
) -> None:
    """Replica A reads the old write; B moves it, it is flushed, a newer write of the key is
    flushed too; then A's copy arrives. The shard's mark makes it a no-op: the origin never
    gets the old value after the newer one."""
    old = OldQueue(client, key_prefix, clock)
    await old.enqueue("k:1", b"old")
    stalled = new_queue(client, key_prefix, clock)
    migration: Migration = stalled._migration
    peek, adopt, forget = migration._scripts["values"]
    peeked, release = asyncio.Event(), asyncio.Event()

    async def slow_adopt(**kwargs: Any) -> Any:
        peeked.set()
        await release.wait()
        return await adopt(**kwargs)

    migration._scripts["values"] = (peek, slow_adopt, forget)  # type: ignore[assignment]
    stalling = asyncio.create_task(stalled.stats())
    await peeked.wait()

    other = new_queue(client, key_prefix, clock)
    [first] = await other.claim(10, LEASE)
    assert first.write.entry.body == b"old"
    assert await other.ack(first)
    await other.enqueue(put("k:1", b"newer"))
    [second] = await other.claim(10, LEASE)
    assert await other.ack(second)

    release.set()
    await stalling
    assert await stalled.pending("k:1") is None
    assert await other.claim(10, LEASE) == []


async def test_writes_an_older_replica_still_makes_are_moved_by_a_later_look(
    client: RedisClient, key_prefix: str, clock: FakeClock
) -> None:
    """During a rolling upgrade the older replicas keep writing to the old slot."""
    old = OldQueue(client, key_prefix, clock)
    await old.enqueue("k:1", b"1")
    queue = new_queue(client, key_prefix, clock)
    assert (await queue.stats()).depth == 1
    await old.enqueue("k:2", b"2")
    assert (await queue.stats()).depth == 1  # not looked for again yet
    clock.advance(MIGRATE_EVERY)
    assert (await queue.stats()).depth == 2
    written = await queue.enqueue(put("k:3", b"3"))
    assert written.seq > await old.enqueue("k:4", b"4") - 1  # the floor follows the old seq


async def test_every_replica_keeps_the_count_the_queue_is_laid_out_in(
    client: RedisClient, key_prefix: str, clock: FakeClock
) -> None:
    """Two counts at once would take a key's writes in two shards, unordered: the second
    replica, configured with 16, follows the 4 the first laid the queue out in."""
    first = WriteQueue(client, key_prefix=key_prefix, timeout=5.0, clock=clock, shards=4)
    await first.enqueue(put("k:1", b"1"))
    second = WriteQueue(client, key_prefix=key_prefix, timeout=5.0, clock=clock, shards=16)
    for n in range(2, 40):
        await second.enqueue(put(f"k:{n}", b"1"))
    await second.enqueue(put("k:1", b"2"))  # coalesces with the first replica's write
    held = {key.decode() async for key in client.scan_iter(match=f"{key_prefix}{{wb:*")}
    assert {_shard(key) for key in held} == {0, 1, 2, 3}
    assert (await first.stats()).depth == 39
    assert await first.pending("k:1") == put("k:1", b"2")
    claims = await first.claim(100, LEASE)
    assert sorted(c.write.key for c in claims) == sorted(f"k:{n}" for n in range(1, 40))


@pytest.mark.parametrize(("before", "after"), [(4, 16), (16, 4), (4, 6)])
async def test_a_reshard_moves_each_key_to_its_new_shard(
    client: RedisClient, key_prefix: str, clock: FakeClock, before: int, after: int
) -> None:
    former = WriteQueue(client, key_prefix=key_prefix, timeout=5.0, clock=clock, shards=before)
    answers = {f"k:{n}": await former.enqueue(put(f"k:{n}", b"1")) for n in range(40)}
    [refused] = [c for c in await former.claim(40, LEASE) if c.write.key == "k:0"]
    await former.fail(refused, "refused", retry_in=None)
    clock.advance(LEASE)

    now = WriteQueue(
        client, key_prefix=key_prefix, timeout=5.0, clock=clock, shards=after, reshard=True
    )
    stats = await now.stats()
    assert (stats.depth, stats.dead) == (39, 1)
    claims = await now.claim(100, LEASE)
    assert sorted(c.write.key for c in claims) == sorted(f"k:{n}" for n in range(1, 40))
    for claim in claims:  # each in the shard it belongs to now, with the seq it had
        assert claim.seq == answers[claim.write.key].seq
        assert await now.pending(claim.write.key) == claim.write
    # A new write of a key that moved is numbered above its old one (L2 keeps the highest).
    assert (await now.enqueue(put("k:1", b"2"))).seq > answers["k:1"].seq
    assert [letter.key for letter in await now.dead_letters()] == ["k:0"]
    assert await now.replay() == ["k:0"]
    # Only the shards of the new count hold anything, but former shards' seqs.
    held = {key.decode() async for key in client.scan_iter(match=f"{key_prefix}{{wb:*")}
    assert {key.rsplit(":", 1)[1] for key in held if _shard(key) >= after} <= {"seq"}


def _shard(name: str) -> int:
    """The shard of a queue key's name (``...{wb:3}:values`` -> 3)."""
    return int(name.split("{wb:", 1)[1].split("}", 1)[0])


async def test_a_later_look_that_fails_does_not_stop_the_shards(
    client: RedisClient, key_prefix: str, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The old slot's master down: only the first look (before any write) must succeed."""
    queue = new_queue(client, key_prefix, clock)
    await queue.enqueue(put("k:1", b"1"))

    async def down(bounded: Any) -> int:
        raise TierUnavailable("migrate", "the old slot's master does not answer")

    monkeypatch.setattr(queue._migration, "run", down)
    clock.advance(MIGRATE_EVERY)
    await queue.enqueue(put("k:2", b"2"))
    assert sorted(c.write.key for c in await queue.claim(10, LEASE)) == ["k:1", "k:2"]

    fresh = new_queue(client, f"{key_prefix}fresh:", clock)
    monkeypatch.setattr(fresh._migration, "run", down)
    with pytest.raises(TierUnavailable):  # the first: no write before it
        await fresh.enqueue(put("k:1", b"1"))
