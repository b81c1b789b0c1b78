"""The tiered read: L1 -> L2 -> loader, single-flight, invalidation, and L2 trouble as misses."""

from __future__ import annotations

import asyncio

import fakeredis
import pytest
from redis.asyncio import Redis

from cache.breaker import Breaker
from cache.entry import Entry
from cache.lookup import Loaded, Source
from cache.memory import MemoryTier
from cache.observer import Eviction
from cache.redis.tier import RedisTier, client_from_url
from cache.tiered import TieredCache
from tests.fakes import FakeClock, FlakyTier, RecordingObserver
from tests.ports import free_port


def memory_l1(clock: FakeClock, observer: RecordingObserver) -> MemoryTier:
    return MemoryTier(max_entries=1000, max_bytes=1 << 24, clock=clock, observer=observer)


def fake_l2() -> RedisTier:
    return RedisTier(
        fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer()), key_prefix="t:", timeout=1.0
    )


class Origin:
    """A loader that counts its calls and answers ``body`` (fresh ``ttl`` seconds)."""

    def __init__(self, clock: FakeClock, *, status: int = 200, ttl: float = 60.0) -> None:
        self.clock = clock
        self.calls = 0
        self.status = status
        self.ttl = ttl
        self.body = b"v1"
        self.shared = True
        self.gate: asyncio.Event | None = None

    async def __call__(self) -> Loaded:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        entry = Entry(self.status, (), self.body, self.clock.time(), self.ttl)
        ttl = self.ttl if self.shared else 0.0
        return Loaded(entry, l1_ttl=min(ttl, 30), l2_ttl=ttl, shared=self.shared)


@pytest.fixture
def cache(clock: FakeClock, observer: RecordingObserver) -> TieredCache:
    return TieredCache(memory_l1(clock, observer), fake_l2(), clock=clock, observer=observer)


async def settle(cache: TieredCache) -> None:
    """Let background L2 fills finish (they are tasks of their own)."""
    for _ in range(5):
        await asyncio.sleep(0)
    await asyncio.sleep(0.01)


async def test_miss_then_l1_then_l2_after_a_restart(
    clock: FakeClock, observer: RecordingObserver, cache: TieredCache
) -> None:
    origin = Origin(clock)
    first = await cache.get("users:1", "", l1_ttl=30, loader=origin)
    assert (first.source, first.stored) == (Source.LOADER, True)
    second = await cache.get("users:1", "", l1_ttl=30, loader=origin)
    assert second.source is Source.L1
    assert second.entry == first.entry
    await settle(cache)

    restarted = TieredCache(memory_l1(clock, observer), cache.l2, clock=clock, observer=observer)
    third = await restarted.get("users:1", "", l1_ttl=30, loader=origin)
    assert third.source is Source.L2
    assert third.entry == first.entry
    fourth = await restarted.get("users:1", "", l1_ttl=30, loader=origin)
    assert fourth.source is Source.L1  # the L2 hit was promoted
    assert origin.calls == 1
    assert observer.lookups == {
        ("l1", False): 2,
        ("l1", True): 2,
        ("l2", False): 1,
        ("l2", True): 1,
    }


async def test_an_l2_hit_fills_l1_with_the_time_l2_has_left_not_the_l1_ttl(
    clock: FakeClock, observer: RecordingObserver
) -> None:
    l2 = fake_l2()
    # Stored 8 s ago, fresh for 10: two seconds left, although the route allows 30 s in L1.
    await l2.set("users:1", "", Entry(200, (), b"v", clock.time() - 8, 10), 600)
    l1 = memory_l1(clock, observer)
    cache = TieredCache(l1, l2, clock=clock, observer=observer)
    hit = await cache.get("users:1", "", l1_ttl=30, loader=Origin(clock))
    assert hit.source is Source.L2
    in_l1 = await l1.get("users:1")
    assert in_l1 is not None
    assert in_l1.ttl_left == pytest.approx(2, abs=0.01)
    clock.advance(2.01)
    assert await l1.get("users:1") is None


async def test_an_l2_variant_past_its_own_ttl_is_a_miss(
    clock: FakeClock, observer: RecordingObserver
) -> None:
    l2 = fake_l2()
    await l2.set("users:1", "", Entry(200, (), b"old", clock.time() - 11, 10), 600)
    cache = TieredCache(memory_l1(clock, observer), l2, clock=clock, observer=observer)
    origin = Origin(clock)
    found = await cache.get("users:1", "", l1_ttl=30, loader=origin)
    assert found.source is Source.LOADER
    assert origin.calls == 1


async def test_a_thousand_concurrent_misses_make_one_load(
    clock: FakeClock, cache: TieredCache
) -> None:
    origin = Origin(clock)
    origin.gate = asyncio.Event()
    calls = [
        asyncio.create_task(cache.get("hot", "", l1_ttl=30, loader=origin)) for _ in range(1000)
    ]
    await asyncio.sleep(0.01)
    origin.gate.set()
    results = await asyncio.gather(*calls)
    assert origin.calls == 1
    assert sum(not r.coalesced for r in results) == 1
    assert sum(r.coalesced for r in results) == 999
    assert {r.entry.body for r in results} == {b"v1"}


async def test_variants_of_one_key_load_separately(clock: FakeClock, cache: TieredCache) -> None:
    origin = Origin(clock)
    await asyncio.gather(
        cache.get("p", "json", l1_ttl=30, loader=origin),
        cache.get("p", "xml", l1_ttl=30, loader=origin),
    )
    assert origin.calls == 2


async def test_a_loader_error_reaches_every_waiter_and_is_not_remembered(
    clock: FakeClock, cache: TieredCache
) -> None:
    gate = asyncio.Event()

    async def failing() -> Loaded:
        await gate.wait()
        raise ConnectionRefusedError("origin down")

    calls = [asyncio.create_task(cache.get("k", "", l1_ttl=30, loader=failing)) for _ in range(5)]
    await asyncio.sleep(0.01)
    gate.set()
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert all(isinstance(r, ConnectionRefusedError) for r in results)
    origin = Origin(clock)
    assert (await cache.get("k", "", l1_ttl=30, loader=origin)).source is Source.LOADER


async def test_a_caller_that_goes_away_does_not_cancel_the_load(
    clock: FakeClock, cache: TieredCache
) -> None:
    origin = Origin(clock)
    origin.gate = asyncio.Event()
    leaving = asyncio.create_task(cache.get("k", "", l1_ttl=30, loader=origin))
    await asyncio.sleep(0.01)
    leaving.cancel()
    staying = asyncio.create_task(cache.get("k", "", l1_ttl=30, loader=origin))
    await asyncio.sleep(0.01)
    origin.gate.set()
    assert (await staying).coalesced
    assert (await cache.get("k", "", l1_ttl=30, loader=origin)).source is Source.L1
    assert origin.calls == 1


async def test_an_answer_for_one_caller_alone_is_not_handed_to_waiters(
    clock: FakeClock, cache: TieredCache
) -> None:
    origin = Origin(clock)
    origin.shared = False  # what the proxy says of a private or Set-Cookie response
    origin.gate = asyncio.Event()
    calls = [asyncio.create_task(cache.get("k", "", l1_ttl=30, loader=origin)) for _ in range(3)]
    await asyncio.sleep(0.01)
    origin.gate.set()
    results = await asyncio.gather(*calls)
    assert origin.calls == 3
    assert not any(r.stored or r.coalesced for r in results)


async def test_negative_entries_are_entries_with_their_own_ttl(
    clock: FakeClock, cache: TieredCache
) -> None:
    origin = Origin(clock, status=404, ttl=5)
    await cache.get("users:404", "", l1_ttl=30, loader=origin)
    hit = await cache.get("users:404", "", l1_ttl=30, loader=origin)
    assert (hit.source, hit.entry.status) == (Source.L1, 404)
    clock.advance(5.01)
    await cache.get("users:404", "", l1_ttl=30, loader=origin)
    assert origin.calls == 2


async def test_an_invalidated_lookup_answers_its_callers_but_stores_nothing(
    clock: FakeClock, cache: TieredCache
) -> None:
    origin = Origin(clock)
    origin.gate = asyncio.Event()
    before = asyncio.create_task(cache.get("k", "", l1_ttl=30, loader=origin))
    await asyncio.sleep(0.01)
    await cache.invalidate("k")  # a write lands while the old value is being fetched
    origin.body = b"v2"
    after = asyncio.create_task(cache.get("k", "", l1_ttl=30, loader=origin))
    await asyncio.sleep(0.01)
    origin.gate.set()
    old, new = await asyncio.gather(before, after)
    assert not old.stored
    assert not new.coalesced  # a new lookup, not the stale one
    assert new.entry.body == b"v2"
    assert origin.calls == 2
    await settle(cache)
    assert (await cache.get("k", "", l1_ttl=30, loader=origin)).entry.body == b"v2"


async def test_invalidate_waits_for_a_pending_l2_fill_so_the_old_value_cannot_land_after(
    clock: FakeClock, observer: RecordingObserver
) -> None:
    l2 = FlakyTier(fake_l2())
    l2.hold = {"set"}
    cache = TieredCache(memory_l1(clock, observer), l2, clock=clock, observer=observer)
    await cache.get("k", "", l1_ttl=30, loader=Origin(clock))  # its L2 fill is parked
    invalidation = asyncio.create_task(cache.invalidate("k"))
    await asyncio.sleep(0.01)
    assert not invalidation.done()
    l2.released.set()
    await invalidation
    assert await l2.inner.get("k") is None


async def test_an_l2_on_a_dead_port_is_a_counted_miss_and_the_breaker_stops_asking(
    clock: FakeClock, observer: RecordingObserver
) -> None:
    client = client_from_url(f"redis://127.0.0.1:{free_port()}", timeout=0.2)
    l2 = RedisTier(client, key_prefix="t:", timeout=0.2)
    breaker = Breaker(failures=3, reset_after=10, clock=clock)
    cache = TieredCache(
        memory_l1(clock, observer), l2, clock=clock, observer=observer, breaker=breaker
    )
    origin = Origin(clock)
    for n in range(6):
        found = await cache.get(f"k{n}", "", l1_ttl=30, loader=origin)
        assert found.source is Source.LOADER  # served, never an error
    await settle(cache)
    assert breaker.is_open
    assert origin.calls == 6
    # Three gets failed before the breaker opened; the fills of those three may have added a
    # failure each before it opened; nothing after.
    errors_when_open = sum(observer.errors.values())
    assert observer.errors["l2", "get"] >= 1
    for n in range(6, 10):
        await cache.get(f"k{n}", "", l1_ttl=30, loader=origin)
    await settle(cache)
    assert sum(observer.errors.values()) == errors_when_open
    await cache.aclose()


async def test_the_breaker_probes_after_reset_after_and_closes_when_l2_is_back(
    clock: FakeClock, observer: RecordingObserver
) -> None:
    l2 = FlakyTier(fake_l2())
    changes: list[bool] = []
    breaker = Breaker(failures=2, reset_after=10, clock=clock, on_change=changes.append)
    cache = TieredCache(
        memory_l1(clock, observer), l2, clock=clock, observer=observer, breaker=breaker
    )
    origin = Origin(clock)
    l2.down = True
    await cache.get("a", "", l1_ttl=30, loader=origin)
    await cache.get("b", "", l1_ttl=30, loader=origin)
    assert changes == [True]
    l2.down = False
    asked = l2.calls["get"]
    await cache.get("c", "", l1_ttl=30, loader=origin)
    assert l2.calls["get"] == asked  # open: L2 not asked at all
    clock.advance(10)
    await cache.get("d", "", l1_ttl=30, loader=origin)
    assert changes == [True, False]


async def test_a_corrupt_l2_entry_is_a_counted_miss_and_is_dropped(
    clock: FakeClock, observer: RecordingObserver
) -> None:
    client = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    await client.hset("t:k", "", b"not an envelope")
    cache = TieredCache(
        memory_l1(clock, observer),
        RedisTier(client, key_prefix="t:", timeout=1),
        clock=clock,
        observer=observer,
    )
    found = await cache.get("k", "", l1_ttl=30, loader=Origin(clock))
    assert found.source is Source.LOADER
    assert observer.errors == {("l2", "decode"): 1}
    await settle(cache)
    assert await client.hget("t:k", "") != b"not an envelope"


async def test_an_invalidation_during_an_l2_outage_is_applied_when_l2_is_back(
    clock: FakeClock, observer: RecordingObserver
) -> None:
    l2 = FlakyTier(fake_l2())
    cache = TieredCache(memory_l1(clock, observer), l2, clock=clock, observer=observer)
    origin = Origin(clock)
    await cache.get("k", "", l1_ttl=30, loader=origin)
    await settle(cache)
    l2.down = True
    await cache.invalidate("k")  # the write went to the origin; L2 could not be told
    assert cache.pending_deletes == 1
    l2.down = False
    origin.body = b"v2"
    # L2 still holds v1, but the cache knows it may be stale and does not ask L2 for "k".
    found = await cache.get("k", "", l1_ttl=30, loader=origin)
    assert found.entry.body == b"v2"
    await cache.get("other", "", l1_ttl=30, loader=origin)  # L2 answers: the delete is retried
    await settle(cache)
    assert cache.pending_deletes == 0
    assert await l2.inner.get("k") is None


async def test_invalidate_drops_every_variant_in_both_tiers(
    clock: FakeClock, observer: RecordingObserver, cache: TieredCache
) -> None:
    origin = Origin(clock)
    for variant in ("json", "xml"):
        await cache.get("p", variant, l1_ttl=30, loader=origin)
    await settle(cache)
    await cache.invalidate("p")
    assert cache.l2 is not None
    for variant in ("json", "xml"):
        assert await cache.l1.get("p", variant) is None
        assert await cache.l2.get("p", variant) is None
    assert observer.evictions[Eviction.INVALIDATED] == 2


async def test_l1_only_works_without_l2(clock: FakeClock, observer: RecordingObserver) -> None:
    cache = TieredCache(memory_l1(clock, observer), None, clock=clock, observer=observer)
    origin = Origin(clock)
    assert (await cache.get("k", "", l1_ttl=30, loader=origin)).source is Source.LOADER
    assert (await cache.get("k", "", l1_ttl=30, loader=origin)).source is Source.L1
    await cache.invalidate("k")
    assert (await cache.get("k", "", l1_ttl=30, loader=origin)).source is Source.LOADER
    assert ("l2", False) not in observer.lookups


async def test_a_read_during_an_invalidation_neither_serves_nor_keeps_the_old_l2_value(
    clock: FakeClock, observer: RecordingObserver
) -> None:
    l2 = FlakyTier(fake_l2())
    cache = TieredCache(memory_l1(clock, observer), l2, clock=clock, observer=observer)
    origin = Origin(clock)
    await cache.get("k", "", l1_ttl=30, loader=origin)
    await settle(cache)  # v1 is in L2
    origin.body = b"v2"  # the write reached the origin
    l2.hold = {"delete"}  # and Redis is slow to drop the key
    invalidation = asyncio.create_task(cache.invalidate("k"))
    await asyncio.sleep(0.01)
    during = await cache.get("k", "", l1_ttl=30, loader=origin)
    assert during.entry.body == b"v2"
    l2.released.set()
    await invalidation
    after = await cache.get("k", "", l1_ttl=30, loader=origin)
    assert (after.source, after.entry.body) == (Source.L1, b"v2")


async def test_a_cancelled_invalidation_still_drops_the_key_from_l2(
    clock: FakeClock, observer: RecordingObserver
) -> None:
    l2 = FlakyTier(fake_l2())
    cache = TieredCache(memory_l1(clock, observer), l2, clock=clock, observer=observer)
    await cache.get("k", "", l1_ttl=30, loader=Origin(clock))
    await settle(cache)
    l2.hold = {"delete"}
    invalidation = asyncio.create_task(cache.invalidate("k"))
    await asyncio.sleep(0.01)
    invalidation.cancel()  # the client went away, or the shutdown grace ran out
    l2.released.set()
    await cache.aclose()  # waits for the L2 half
    assert await l2.inner.get("k") is None


@pytest.mark.redis
async def test_a_key_of_another_redis_type_is_dropped_and_does_not_open_the_breaker(
    clock: FakeClock, observer: RecordingObserver, redis_client: Redis, key_prefix: str
) -> None:
    for n in range(6):
        await redis_client.set(f"{key_prefix}k{n}", b"a plain string from some other tool")
    breaker = Breaker(failures=3, reset_after=10, clock=clock)
    cache = TieredCache(
        memory_l1(clock, observer),
        RedisTier(redis_client, key_prefix=key_prefix, timeout=1),
        clock=clock,
        observer=observer,
        breaker=breaker,
    )
    for n in range(6):
        found = await cache.get(f"k{n}", "", l1_ttl=30, loader=Origin(clock))
        assert found.source is Source.LOADER
    await settle(cache)
    assert not breaker.is_open
    assert observer.errors == {("l2", "decode"): 6}
    assert await redis_client.type(f"{key_prefix}k0") in (b"none", b"hash")


async def test_a_slow_fill_on_one_replica_cannot_undo_a_write_on_another(
    clock: FakeClock, observer: RecordingObserver
) -> None:
    server = fakeredis.FakeServer()

    def replica() -> TieredCache:
        l2 = RedisTier(
            fakeredis.FakeAsyncRedis(server=server), key_prefix="t:", timeout=1.0, clock=clock
        )
        return TieredCache(memory_l1(clock, observer), l2, clock=clock, observer=observer)

    a, b = replica(), replica()
    slow = Origin(clock)
    slow.body = b"old"
    slow.gate = asyncio.Event()
    reading = asyncio.create_task(b.get("k", "", l1_ttl=30, loader=slow))
    await settle(b)
    clock.advance(0.1)
    written = Entry(200, (), b"new", clock.time(), 60)
    await a.put("k", "", written, l1_ttl=30, l2_ttl=60)
    slow.gate.set()
    assert (await reading).entry.body == b"old"  # B's reader got what it asked for
    await settle(b)
    fresh = replica()
    found = await fresh.get("k", "", l1_ttl=30, loader=Origin(clock))
    assert (found.source, found.entry.body) == (Source.L2, b"new")


async def test_a_write_that_lost_to_a_newer_one_in_l2_leaves_l1_too(
    clock: FakeClock, observer: RecordingObserver
) -> None:
    server = fakeredis.FakeServer()
    l2 = RedisTier(fakeredis.FakeAsyncRedis(server=server), key_prefix="t:", timeout=1.0)
    other = RedisTier(fakeredis.FakeAsyncRedis(server=server), key_prefix="t:", timeout=1.0)
    cache = TieredCache(memory_l1(clock, observer), l2, clock=clock, observer=observer)
    newer = Entry(200, (), b"newer", clock.time(), 60)
    await other.replace("k", "", newer, 60, version=9)  # another replica's newer write
    older = Entry(200, (), b"older", clock.time(), 60)
    await cache.put("k", "", older, l1_ttl=30, l2_ttl=60, version=8)
    found = await cache.get("k", "", l1_ttl=30, loader=Origin(clock))
    assert (found.source, found.entry.body) == (Source.L2, b"newer")


async def test_an_entry_kept_past_its_freshness_is_given_to_revalidate_not_loaded_anew(
    clock: FakeClock, cache: TieredCache
) -> None:
    origin = Origin(clock, ttl=10)
    kept = Loaded(Entry(200, (("ETag", '"1"'),), b"v1", clock.time(), 10), 10, 10, stale_for=600)
    first = await cache.get("users:1", "", l1_ttl=30, loader=lambda: _returns(kept))
    asked: list[Entry] = []

    async def revalidate(previous: Entry) -> Loaded:
        asked.append(previous)
        refreshed = Entry(200, previous.headers, previous.body, clock.time(), 10)
        return Loaded(refreshed, 10, 10, revalidated=True)

    fresh = await cache.get("users:1", "", l1_ttl=30, loader=origin, revalidate=revalidate)
    assert fresh.source is Source.L1
    assert asked == []  # fresh: nothing to revalidate
    clock.advance(11)
    again = await cache.get("users:1", "", l1_ttl=30, loader=origin, revalidate=revalidate)
    assert asked == [first.entry]
    assert (again.source, again.revalidated, again.stored) == (Source.LOADER, True, True)
    assert origin.calls == 0
    hit = await cache.get("users:1", "", l1_ttl=30, loader=origin, revalidate=revalidate)
    assert (hit.source, hit.entry.stored_at) == (Source.L1, clock.time())


async def test_with_nothing_kept_the_loader_loads(clock: FakeClock, cache: TieredCache) -> None:
    origin = Origin(clock)

    async def revalidate(previous: Entry) -> Loaded:
        raise AssertionError(f"nothing to revalidate, but asked for {previous}")

    found = await cache.get("users:1", "", l1_ttl=30, loader=origin, revalidate=revalidate)
    assert (found.source, origin.calls) == (Source.LOADER, 1)


async def _returns(loaded: Loaded) -> Loaded:
    return loaded
