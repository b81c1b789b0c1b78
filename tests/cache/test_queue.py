"""The durable write-behind queue, on fakeredis (memory://), on the real Redis, on a Redis
Cluster (every script's keys in one slot, or the cluster refuses it) and behind Sentinel."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import fakeredis
import pytest

from cache.breaker import Breaker, Guard
from cache.entry import Entry
from cache.errors import CircuitOpen, CorruptEntry, QueueFull, TierUnavailable
from cache.redis.tier import RedisClient, client_from_url
from cache.write_behind.queue import WriteQueue
from cache.write_behind.records import Queued, QueuedWrite
from cache.write_behind.shards import DEFAULT_SHARDS, shard_of
from tests.fakes import FakeClock
from tests.ports import free_port

LEASE = 10.0


def put(key: str, body: bytes) -> QueuedWrite:
    entry = Entry(200, (("Content-Type", "application/json"),), body, 1_700_000_000.0, 60.0)
    return QueuedWrite(key, "PUT", f"/{key.replace(':', '/')}", entry)


def queue_on(
    client: RedisClient,
    key_prefix: str,
    clock: FakeClock,
    max_pending: int = 0,
    shards: int = DEFAULT_SHARDS,
) -> WriteQueue:
    return WriteQueue(
        client,
        key_prefix=key_prefix,
        timeout=2.0,
        clock=clock,
        max_pending=max_pending,
        shards=shards,
    )


def values_of(key_prefix: str, key: str) -> str:
    """The Redis hash that holds ``key``'s pending write (its shard's)."""
    return f"{key_prefix}{{wb:{shard_of(key, DEFAULT_SHARDS)}}}:values"


@pytest.fixture
def queue(client: RedisClient, key_prefix: str, clock: FakeClock) -> WriteQueue:
    return queue_on(client, key_prefix, clock)


async def test_a_queued_write_is_pending_until_acked(queue: WriteQueue) -> None:
    assert (await queue.enqueue(put("users:1", b"1"))).coalesced is False
    assert await queue.pending("users:1") == put("users:1", b"1")
    [claim] = await queue.claim(10, LEASE)
    assert claim.write == put("users:1", b"1")
    assert claim.tries == 0
    assert await queue.ack(claim) is True
    assert await queue.pending("users:1") is None
    assert (await queue.stats()).depth == 0


async def test_concurrent_writes_share_one_call_and_each_gets_its_own_answer(
    client: RedisClient, key_prefix: str, clock: FakeClock
) -> None:
    """A group commit: writes arriving while a call is under way go together in the next."""
    queue = queue_on(client, key_prefix, clock, max_pending=3, shards=1)
    calls: list[int] = []
    script = queue._enqueue

    async def counted(keys: list[str], args: list[bytes | str | int]) -> object:
        calls.append((len(args) - 3) // 2)
        return await script(keys=keys, args=args)

    queue._enqueue = counted  # type: ignore[assignment]
    writes = [put("a", b"1"), put("b", b"1"), put("a", b"2"), put("c", b"1"), put("d", b"1")]
    answers = await asyncio.gather(*map(queue.enqueue, writes), return_exceptions=True)
    assert calls == [5]
    *answered, refused = answers
    taken = [answer for answer in answered if isinstance(answer, Queued)]
    assert len(taken) == 4
    assert [answer.seq for answer in taken] == sorted(answer.seq for answer in taken)
    assert [answer.coalesced for answer in taken] == [False, False, True, False]
    assert isinstance(refused, QueueFull)  # past max_pending; the others were taken
    pending = await queue.pending("a")
    assert pending is not None
    assert pending.entry.body == b"2"


async def test_a_caller_gone_before_its_write_left_is_not_queued(queue: WriteQueue) -> None:
    first = asyncio.ensure_future(queue.enqueue(put("a", b"1")))
    gone = asyncio.ensure_future(queue.enqueue(put("b", b"1")))
    await asyncio.sleep(0)  # both wait; the call has not left yet
    gone.cancel()
    await first
    assert await queue.pending("b") is None
    assert await queue.pending("a") is not None


async def test_a_write_is_claimed_unsettled_until_the_tiers_are_said_to_hold_it(
    queue: WriteQueue,
) -> None:
    """A crash between the queue and the tiers leaves the write unsettled: its flusher must
    drop the key from the tiers. News of an older write settles nothing."""
    first = await queue.enqueue(put("a", b"1"))
    await queue.enqueue(put("b", b"1"))
    queue.settled("a", first.seq)
    newer = await queue.enqueue(put("c", b"1"))
    await queue.enqueue(put("c", b"2"))
    queue.settled("c", newer.seq)  # an older write of c than the one queued
    await queue.enqueue(put("d", b"1"))  # carries the news above
    claims = {claim.write.key: claim.unsettled for claim in await queue.claim(10, LEASE)}
    assert claims == {"a": False, "b": True, "c": True, "d": True}


async def test_writes_to_one_key_coalesce_into_the_newest(queue: WriteQueue) -> None:
    assert (await queue.enqueue(put("users:1", b"1"))).coalesced is False
    assert (await queue.enqueue(put("users:1", b"2"))).coalesced is True
    assert (await queue.enqueue(put("users:1", b"3"))).coalesced is True
    [claim] = await queue.claim(10, LEASE)
    assert claim.write.entry.body == b"3"
    assert (await queue.stats()).depth == 1


async def test_a_claimed_key_is_leased_to_one_flusher_until_the_lease_lapses(
    queue: WriteQueue, clock: FakeClock
) -> None:
    await queue.enqueue(put("users:1", b"1"))
    assert len(await queue.claim(10, LEASE)) == 1
    assert await queue.claim(10, LEASE) == []  # another replica finds nothing to take
    clock.advance(LEASE + 0.01)  # the holder died: its lease lapses
    [taken_over] = await queue.claim(10, LEASE)
    assert taken_over.write.entry.body == b"1"


async def test_a_write_during_a_flush_goes_out_next_and_is_not_lost(
    queue: WriteQueue,
) -> None:
    await queue.enqueue(put("users:1", b"old"))
    [claim] = await queue.claim(10, LEASE)
    await queue.enqueue(put("users:1", b"new"))  # arrives while "old" is on its way
    assert await queue.ack(claim) is False  # the key stays: "new" is not at the origin
    [again] = await queue.claim(10, LEASE)  # ready at once, not after the lease
    assert again.write.entry.body == b"new"
    assert again.seq > claim.seq
    assert await queue.ack(again) is True


async def test_claims_of_one_shard_are_bounded_and_oldest_first(
    client: RedisClient, key_prefix: str, clock: FakeClock
) -> None:
    queue = queue_on(client, key_prefix, clock, shards=1)
    for n in range(5):
        await queue.enqueue(put(f"users:{n}", b"x"))
        clock.advance(0.001)
    claims = await queue.claim(3, LEASE)
    assert [c.write.key for c in claims] == ["users:0", "users:1", "users:2"]
    assert [c.write.key for c in await queue.claim(3, LEASE)] == ["users:3", "users:4"]


async def test_a_failed_write_waits_out_its_backoff(queue: WriteQueue, clock: FakeClock) -> None:
    await queue.enqueue(put("users:1", b"1"))
    [claim] = await queue.claim(10, LEASE)
    assert await queue.fail(claim, "the origin answered 503", retry_in=2.0) is False
    assert await queue.claim(10, LEASE) == []
    clock.advance(2.0)
    [again] = await queue.claim(10, LEASE)
    assert again.tries == 1
    assert await queue.dead_letters() == []


async def test_a_dead_write_leaves_the_queue_for_the_dead_letters_and_replays(
    queue: WriteQueue, clock: FakeClock
) -> None:
    await queue.enqueue(put("users:1", b"refused"))
    await queue.enqueue(put("users:2", b"fine"))
    claims = {c.write.key: c for c in await queue.claim(10, LEASE)}
    assert await queue.fail(claims["users:1"], "the origin answered 400", retry_in=None) is True
    await queue.ack(claims["users:2"])
    [letter] = await queue.dead_letters()
    assert (letter.key, letter.method, letter.path, letter.attempts) == (
        "users:1",
        "PUT",
        "/users/1",
        1,
    )
    assert letter.last_error == "the origin answered 400"
    assert letter.failed_at == pytest.approx(clock.time())
    stats = await queue.stats()
    assert (stats.depth, stats.dead) == (0, 1)
    assert await queue.pending("users:1") is None

    assert await queue.replay() == ["users:1"]
    assert await queue.dead_letters() == []
    [replayed] = await queue.claim(10, LEASE)
    assert replayed.write == put("users:1", b"refused")
    assert replayed.tries == 0


async def test_a_dead_letter_does_not_take_a_newer_write_with_it(queue: WriteQueue) -> None:
    await queue.enqueue(put("users:1", b"refused"))
    [claim] = await queue.claim(10, LEASE)
    await queue.enqueue(put("users:1", b"newer"))
    assert await queue.fail(claim, "400", retry_in=None) is False  # "newer" still waits
    [next_claim] = await queue.claim(10, LEASE)  # at once
    assert next_claim.write.entry.body == b"newer"
    [letter] = await queue.dead_letters()  # listed, so the refusal is seen
    assert letter.key == "users:1"
    # Replaying it, now or after "newer" reached the origin, would undo "newer": it is dropped.
    assert await queue.ack(next_claim) is True
    assert await queue.replay() == []
    assert await queue.dead_letters() == []
    assert await queue.pending("users:1") is None


async def test_a_new_write_supersedes_the_keys_dead_letter(queue: WriteQueue) -> None:
    """v1 refused, then v2 written and flushed: a replay must not send v1 after v2."""
    await queue.enqueue(put("users:1", b"v1"))
    [claim] = await queue.claim(10, LEASE)
    await queue.fail(claim, "400", retry_in=None)
    await queue.enqueue(put("users:1", b"v2"))
    assert await queue.dead_letters() == []
    [v2] = await queue.claim(10, LEASE)
    await queue.ack(v2)
    assert await queue.replay() == []
    assert await queue.claim(10, LEASE) == []


async def test_a_replica_that_lost_its_lease_cannot_settle_the_key(
    queue: WriteQueue, clock: FakeClock
) -> None:
    """A stalls past its lease; B takes the key over; A's late ack or fail changes nothing."""
    await queue.enqueue(put("users:1", b"v5"))
    [a] = await queue.claim(10, LEASE)
    clock.advance(LEASE + 0.01)
    [b] = await queue.claim(10, LEASE)  # B is sending v5 now
    await queue.enqueue(put("users:1", b"v6"))
    assert await queue.ack(a) is False
    assert await queue.fail(a, "late", retry_in=0.1) is False
    assert await queue.fail(a, "late", retry_in=None) is False
    clock.advance(1.0)
    assert await queue.claim(10, LEASE) == []  # still B's: nobody sends v6 beside B's v5
    assert await queue.dead_letters() == []
    assert await queue.ack(b) is False  # B's ack: v6 waits its turn
    clock.advance(0.01)
    [c] = await queue.claim(10, LEASE)
    assert (c.write.entry.body, c.tries) == (b"v6", 0)


async def test_a_stop_takes_keys_in_their_window_but_not_those_backing_off(
    client: RedisClient, key_prefix: str, clock: FakeClock
) -> None:
    queue = WriteQueue(client, key_prefix=key_prefix, timeout=2.0, clock=clock, coalesce_for=1.0)
    await queue.enqueue(put("users:1", b"1"))
    clock.advance(1.0)
    [failing] = await queue.claim(10, LEASE)
    await queue.fail(failing, "the origin answered 503", retry_in=0.5)
    await queue.enqueue(put("users:2", b"2"))  # in its window
    claimed = await queue.claim(10, LEASE, early=1.0)
    assert [c.write.key for c in claimed] == ["users:2"]


async def test_past_max_pending_keys_new_keys_are_refused_and_queued_ones_still_take_writes(
    client: RedisClient, key_prefix: str, clock: FakeClock
) -> None:
    queue = queue_on(client, key_prefix, clock, max_pending=2, shards=1)
    await queue.enqueue(put("users:1", b"1"))
    await queue.enqueue(put("users:2", b"2"))
    with pytest.raises(QueueFull, match="2 keys are waiting"):
        await queue.enqueue(put("users:3", b"3"))
    assert (await queue.enqueue(put("users:1", b"1b"))).coalesced is True
    assert await queue.pending("users:3") is None


async def test_stats_report_depth_and_the_oldest_pending_age(
    queue: WriteQueue, clock: FakeClock
) -> None:
    assert (await queue.stats()).oldest_age == 0.0
    await queue.enqueue(put("users:1", b"1"))
    clock.advance(3)
    await queue.enqueue(put("users:2", b"2"))
    await queue.enqueue(put("users:1", b"1b"))  # a rewrite does not make the key younger
    clock.advance(2)
    stats = await queue.stats()
    assert stats.depth == 2
    assert stats.oldest_age == pytest.approx(5.0)


async def test_every_queue_key_of_a_write_shares_its_shards_hash_tag(
    queue: WriteQueue, client: RedisClient, key_prefix: str
) -> None:
    await queue.enqueue(put("users:1", b"1"))
    [claim] = await queue.claim(10, LEASE)
    await queue.fail(claim, "x", retry_in=1.0)
    keys = {key.decode() async for key in client.scan_iter(match=f"{key_prefix}*")}
    # Beside the write's shard, only the count of shards the queue is laid out in.
    keys.remove(f"{key_prefix}{{wb}}:shards")
    assert keys
    tag = f"{key_prefix}{{wb:{shard_of('users:1', DEFAULT_SHARDS)}}}:"
    assert all(key.startswith(tag) for key in keys), keys


async def test_bytes_that_are_not_a_queued_write_are_corrupt(
    queue: WriteQueue, client: RedisClient, key_prefix: str
) -> None:
    await client.hset(values_of(key_prefix, "users:1"), "users:1", b"not ours")
    with pytest.raises(CorruptEntry):
        await queue.pending("users:1")


async def test_a_dead_redis_is_unavailable(clock: FakeClock) -> None:
    client = client_from_url(f"redis://127.0.0.1:{free_port()}", timeout=0.2)
    queue = WriteQueue(client, key_prefix="x:", timeout=0.2, clock=clock)
    with pytest.raises(TierUnavailable, match="queue enqueue"):
        await queue.enqueue(put("users:1", b"1"))
    await queue.aclose()


async def test_a_client_that_decodes_responses_is_refused(clock: FakeClock) -> None:
    with pytest.raises(ValueError, match="decode_responses"):
        WriteQueue(
            fakeredis.FakeAsyncRedis(decode_responses=True),
            key_prefix="x:",
            timeout=1.0,
            clock=clock,
        )


async def test_a_key_waits_out_its_coalescing_window_before_it_can_be_claimed(
    client: RedisClient, key_prefix: str, clock: FakeClock
) -> None:
    queue = WriteQueue(client, key_prefix=key_prefix, timeout=2.0, clock=clock, coalesce_for=1.0)
    await queue.enqueue(put("users:1", b"1"))
    clock.advance(0.6)
    await queue.enqueue(put("users:1", b"2"))  # inside the window: no new window
    assert await queue.claim(10, LEASE) == []
    clock.advance(0.4)
    [claim] = await queue.claim(10, LEASE)
    assert claim.write.entry.body == b"2"
    await queue.enqueue(put("users:1", b"3"))  # written while "2" is on its way
    assert await queue.ack(claim) is False
    assert await queue.claim(10, LEASE) == []  # a new window for "3", not at once
    clock.advance(1.0)
    [again] = await queue.claim(10, LEASE)
    assert again.write.entry.body == b"3"


async def test_a_stop_can_claim_keys_still_in_their_window_but_not_leased_ones(
    client: RedisClient, key_prefix: str, clock: FakeClock
) -> None:
    queue = WriteQueue(client, key_prefix=key_prefix, timeout=2.0, clock=clock, coalesce_for=1.0)
    await queue.enqueue(put("users:1", b"1"))
    await queue.enqueue(put("users:2", b"2"))
    clock.advance(1.0)
    [leased] = await queue.claim(1, LEASE)  # held by a flusher elsewhere
    await queue.enqueue(put("users:3", b"3"))
    claimed = await queue.claim(10, LEASE, early=1.0)
    assert sorted(c.write.key for c in claimed) == sorted(
        {"users:1", "users:2", "users:3"} - {leased.write.key}
    )


async def test_an_unreadable_queued_write_is_dead_lettered_and_the_others_are_claimed(
    queue: WriteQueue, client: RedisClient, key_prefix: str
) -> None:
    await queue.enqueue(put("users:1", b"1"))
    await queue.enqueue(put("users:2", b"2"))
    await client.hset(values_of(key_prefix, "users:1"), "users:1", b"from another version")
    [claim] = await queue.claim(10, LEASE)
    assert claim.write.key == "users:2"
    [letter] = await queue.dead_letters()
    assert (letter.key, letter.method) == ("users:1", "?")
    assert letter.last_error.startswith("unreadable:")
    assert (await queue.stats()).depth == 1


# -- behind the process's L2 breaker -------------------------------------------------------------


def guarded(client: RedisClient, clock: FakeClock, breaker: Breaker) -> WriteQueue:
    return WriteQueue(
        client, key_prefix="x:", timeout=0.2, clock=clock, guard=Guard(breaker), coalesce_for=0
    )


async def test_failing_queue_calls_open_the_breaker_then_every_call_is_refused_unasked(
    clock: FakeClock,
) -> None:
    changes: list[bool] = []
    breaker = Breaker(failures=3, reset_after=10, clock=clock, on_change=changes.append)
    queue = guarded(
        client_from_url(f"redis://127.0.0.1:{free_port()}", timeout=0.2), clock, breaker
    )
    for _ in range(3):  # Redis asked: refused connections
        with pytest.raises(TierUnavailable) as failed:
            await queue.claim(10, LEASE)
        assert not isinstance(failed.value, CircuitOpen)
    assert changes == [True]
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: queue.enqueue(put("users:1", b"1")),
        lambda: queue.pending("users:1"),
        lambda: queue.claim(10, LEASE),
        queue.stats,
        queue.dead_letters,
        queue.replay,
    ]
    for call in calls:  # refused before Redis is asked
        with pytest.raises(CircuitOpen, match="circuit breaker open"):
            await call()
    await queue.aclose()


async def test_in_half_open_a_queue_call_may_be_the_probe_that_closes_the_breaker(
    clock: FakeClock,
) -> None:
    changes: list[bool] = []
    breaker = Breaker(failures=1, reset_after=10, clock=clock, on_change=changes.append)
    client = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    queue = guarded(client, clock, breaker)
    breaker.failure()
    with pytest.raises(CircuitOpen):
        await queue.enqueue(put("users:1", b"1"))
    assert await client.keys("*") == []  # the refused write is nowhere
    clock.advance(10)
    assert (await queue.enqueue(put("users:1", b"2"))).seq == 1  # the probe
    assert changes == [True, False]
    [claim] = await queue.claim(10, LEASE)
    assert claim.write.entry.body == b"2"
    await queue.aclose()
