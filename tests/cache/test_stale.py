"""Serving past freshness: stale-while-revalidate, stale-if-error and early refresh (XFetch)."""

from __future__ import annotations

import asyncio
import random

import fakeredis
import pytest

from cache.entry import Entry
from cache.lookup import ORIGIN_FAILED, REVALIDATING, Loaded, Source
from cache.memory import MemoryTier
from cache.redis.tier import RedisTier
from cache.stale import Staleness, refresh_early
from cache.tiered import TieredCache
from tests.fakes import FakeClock, RecordingObserver

FRESH = 10.0  # seconds an origin answer is fresh
SWR = Staleness(while_revalidate=30.0)
SIE = Staleness(if_error=60.0)
BOTH = Staleness(while_revalidate=30.0, if_error=60.0)


class OriginDown(Exception):
    pass


class Origin:
    """A loader that counts its calls; it can be held, fail, or answer 500."""

    def __init__(self, clock: FakeClock, stale: Staleness = BOTH) -> None:
        self.clock = clock
        self.stale = stale
        self.calls = 0
        self.version = 0
        self.gate: asyncio.Event | None = None
        self.down = False
        self.status = 200
        self.takes = 0.0  # seconds each load takes (on the clock)

    async def __call__(self) -> Loaded:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        self.clock.advance(self.takes)
        if self.down:
            raise OriginDown("connection refused")
        if self.status >= 500:
            return Loaded(Entry(self.status, (), b"down", self.clock.time(), 0), failed=True)
        self.version += 1
        entry = Entry(self.status, (), b"v%d" % self.version, self.clock.time(), FRESH)
        return Loaded(entry, l1_ttl=FRESH, l2_ttl=FRESH, stale_for=self.stale.keep)


def l1(clock: FakeClock, observer: RecordingObserver) -> MemoryTier:
    return MemoryTier(max_entries=100, max_bytes=1 << 20, clock=clock, observer=observer)


def shared_l2() -> RedisTier:
    return RedisTier(
        fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer()), key_prefix="t:", timeout=1.0
    )


async def settle() -> None:
    """Let background work (refreshes, L2 fills through fakeredis) run to its next wait."""
    for _ in range(50):
        await asyncio.sleep(0)


@pytest.fixture
def cache(clock: FakeClock, observer: RecordingObserver) -> TieredCache:
    return TieredCache(l1(clock, observer), shared_l2(), clock=clock, observer=observer)


async def test_within_stale_while_revalidate_the_old_entry_answers_at_once_and_is_refreshed_once(
    cache: TieredCache, clock: FakeClock
) -> None:
    origin = Origin(clock)
    await cache.get("k", "", l1_ttl=FRESH, loader=origin, stale=SWR)
    clock.advance(FRESH + 5)
    origin.gate = asyncio.Event()  # the refresh hangs until released

    answers = await asyncio.gather(
        *(cache.get("k", "", l1_ttl=FRESH, loader=origin, stale=SWR) for _ in range(50))
    )

    assert {(a.source, a.entry.body, a.detail) for a in answers} == {
        (Source.STALE, b"v1", REVALIDATING)
    }
    await settle()
    assert origin.calls == 2  # the first fill, then one refresh for all fifty
    origin.gate.set()
    await settle()
    refreshed = await cache.get("k", "", l1_ttl=FRESH, loader=origin, stale=SWR)
    assert (refreshed.source, refreshed.entry.body) == (Source.L1, b"v2")


async def test_past_stale_while_revalidate_a_read_waits_for_the_origin(
    cache: TieredCache, clock: FakeClock
) -> None:
    origin = Origin(clock, SWR)
    await cache.get("k", "", l1_ttl=FRESH, loader=origin, stale=SWR)
    clock.advance(FRESH + SWR.while_revalidate + 1)
    found = await cache.get("k", "", l1_ttl=FRESH, loader=origin, stale=SWR)
    assert (found.source, found.entry.body) == (Source.LOADER, b"v2")


@pytest.mark.parametrize("failure", ["raises", "answers 500"])
async def test_within_stale_if_error_a_failed_origin_is_answered_with_the_stale_entry(
    cache: TieredCache, clock: FakeClock, failure: str
) -> None:
    origin = Origin(clock, SIE)
    await cache.get("k", "", l1_ttl=FRESH, loader=origin, stale=SIE)
    clock.advance(FRESH + 30)
    if failure == "raises":
        origin.down = True
    else:
        origin.status = 503

    found = await cache.get("k", "", l1_ttl=FRESH, loader=origin, stale=SIE)

    assert (found.source, found.entry.body, found.detail) == (Source.STALE, b"v1", ORIGIN_FAILED)
    # The origin is asked every time (no stale-while-revalidate): it answers once it is back.
    origin.down, origin.status = False, 200
    back = await cache.get("k", "", l1_ttl=FRESH, loader=origin, stale=SIE)
    assert (back.source, back.entry.body) == (Source.LOADER, b"v2")


async def test_past_stale_if_error_the_failure_reaches_the_caller(
    cache: TieredCache, clock: FakeClock
) -> None:
    origin = Origin(clock, SIE)
    await cache.get("k", "", l1_ttl=FRESH, loader=origin, stale=SIE)
    clock.advance(FRESH + SIE.if_error + 1)
    origin.down = True
    with pytest.raises(OriginDown):
        await cache.get("k", "", l1_ttl=FRESH, loader=origin, stale=SIE)
    origin.down, origin.status = False, 500
    failed = await cache.get("k", "", l1_ttl=FRESH, loader=origin, stale=SIE)
    assert (failed.source, failed.entry.status) == (Source.LOADER, 500)


async def test_without_stale_windows_nothing_is_kept_past_freshness(
    clock: FakeClock, observer: RecordingObserver
) -> None:
    memory = l1(clock, observer)
    cache = TieredCache(memory, None, clock=clock, observer=observer)
    origin = Origin(clock, Staleness())
    await cache.get("k", "", l1_ttl=FRESH, loader=origin)
    clock.advance(FRESH + 0.01)
    assert await memory.get("k") is None
    origin.down = True
    with pytest.raises(OriginDown):
        await cache.get("k", "", l1_ttl=FRESH, loader=origin, stale=BOTH)


async def test_a_failed_background_refresh_keeps_serving_the_stale_entry(
    cache: TieredCache, clock: FakeClock
) -> None:
    origin = Origin(clock)
    await cache.get("k", "", l1_ttl=FRESH, loader=origin, stale=SWR)
    clock.advance(FRESH + 1)
    origin.down = True
    first = await cache.get("k", "", l1_ttl=FRESH, loader=origin, stale=SWR)
    await settle()
    second = await cache.get("k", "", l1_ttl=FRESH, loader=origin, stale=SWR)
    await settle()
    assert (first.source, second.source) == (Source.STALE, Source.STALE)
    assert second.entry.body == b"v1"
    assert origin.calls == 3  # each read past the failed refresh tries again, one at a time


async def test_another_replica_serves_a_stale_l2_entry_and_refreshes_it(
    clock: FakeClock, observer: RecordingObserver
) -> None:
    l2 = shared_l2()
    one = TieredCache(l1(clock, observer), l2, clock=clock, observer=observer)
    two = TieredCache(l1(clock, observer), l2, clock=clock, observer=observer)
    origin = Origin(clock)
    await one.get("k", "", l1_ttl=FRESH, loader=origin, stale=SWR)
    await settle()  # the L2 fill
    clock.advance(FRESH + 1)
    origin.gate = asyncio.Event()

    stale = await two.get("k", "", l1_ttl=FRESH, loader=origin, stale=SWR)

    assert (stale.source, stale.entry.body) == (Source.STALE, b"v1")
    origin.gate.set()
    await settle()
    # One still holds v1 in its L1: served at once, and its refresh finds two's in L2.
    first = await one.get("k", "", l1_ttl=FRESH, loader=origin, stale=SWR)
    await settle()
    then = await one.get("k", "", l1_ttl=FRESH, loader=origin, stale=SWR)
    assert (first.source, first.entry.body) == (Source.STALE, b"v1")
    assert (then.source, then.entry.body) == (Source.L1, b"v2")
    assert origin.calls == 2  # the first fill and two's refresh: one took it from L2


async def test_a_write_during_a_refresh_wins(cache: TieredCache, clock: FakeClock) -> None:
    origin = Origin(clock)
    await cache.get("k", "", l1_ttl=FRESH, loader=origin, stale=SWR)
    clock.advance(FRESH + 1)
    origin.gate = asyncio.Event()
    await cache.get("k", "", l1_ttl=FRESH, loader=origin, stale=SWR)  # starts the refresh
    await cache.invalidate("k")
    origin.gate.set()
    await settle()
    assert await cache.l1.get("k") is None  # the refresh read before the write: not stored
    origin.gate = None
    after = await cache.get("k", "", l1_ttl=FRESH, loader=origin, stale=SWR)
    assert after.source is Source.LOADER


async def test_the_load_time_is_measured_and_stored_with_the_entry(
    cache: TieredCache, clock: FakeClock
) -> None:
    origin = Origin(clock)
    origin.takes = 0.25
    loaded = await cache.get("k", "", l1_ttl=FRESH, loader=origin)
    await settle()
    assert loaded.entry.fetch_seconds == pytest.approx(0.25)
    assert cache.l2 is not None
    in_l2 = await cache.l2.get("k")
    assert in_l2 is not None
    assert in_l2.entry.fetch_seconds == pytest.approx(0.25)


def test_xfetch_refreshes_more_likely_as_expiry_nears_and_the_origin_is_slower() -> None:
    rng = random.Random(7)

    def rate(time_left: float, fetch: float) -> float:
        return sum(refresh_early(time_left, fetch, 1.0, rng.random) for _ in range(4000)) / 4000

    # P(refresh) = exp(-time_left / (beta * delta)).
    assert rate(1.0, 1.0) == pytest.approx(0.368, abs=0.03)
    assert rate(0.1, 1.0) > rate(1.0, 1.0) > rate(3.0, 1.0)
    assert rate(1.0, 2.0) > rate(1.0, 1.0)
    assert rate(1.0, 0.0) == 0.0  # never measured: never early
    assert not refresh_early(0.0001, 5.0, 0.0, rng.random)  # beta 0: off


async def test_a_hot_key_is_refreshed_before_it_expires_and_never_stampedes(
    clock: FakeClock, observer: RecordingObserver
) -> None:
    cache = TieredCache(
        l1(clock, observer),
        shared_l2(),
        clock=clock,
        observer=observer,
        rand=random.Random(3).random,
    )
    origin = Origin(clock, Staleness())
    origin.takes = 0.5  # a slow origin: half a second to produce the entry
    early = Staleness(early_refresh=1.0)
    await cache.get("k", "", l1_ttl=FRESH, loader=origin, stale=early)
    misses = 0
    # 100 reads a second for 60 s: six lifetimes of the entry.
    for _ in range(6000):
        clock.advance(0.01)
        found = await cache.get("k", "", l1_ttl=FRESH, loader=origin, stale=early)
        misses += found.source is Source.LOADER
        await asyncio.sleep(0)
    await settle()
    assert misses == 0  # every read was a hit: the key never expired under its readers
    assert 6 <= origin.calls <= 13  # about one refresh a lifetime, never one per reader


async def test_early_refresh_is_off_when_beta_is_zero(
    clock: FakeClock, observer: RecordingObserver
) -> None:
    cache = TieredCache(l1(clock, observer), None, clock=clock, observer=observer, rand=lambda: 0.0)
    origin = Origin(clock, Staleness())
    origin.takes = 1.0
    await cache.get("k", "", l1_ttl=FRESH, loader=origin)
    clock.advance(FRESH - 0.5)
    await cache.get("k", "", l1_ttl=FRESH, loader=origin, stale=Staleness())
    await settle()
    assert origin.calls == 1


async def test_a_caller_past_the_window_waits_for_the_refresh_not_for_the_stale_answer(
    cache: TieredCache, clock: FakeClock
) -> None:
    swr = Staleness(while_revalidate=5.0)
    origin = Origin(clock, swr)
    await cache.get("k", "", l1_ttl=FRESH, loader=origin, stale=swr)
    clock.advance(FRESH + 1)
    origin.gate = asyncio.Event()
    first = await cache.get("k", "", l1_ttl=FRESH, loader=origin, stale=swr)  # the refresh
    clock.advance(10)  # the refresh is slow: now past the window
    late = asyncio.create_task(cache.get("k", "", l1_ttl=FRESH, loader=origin, stale=swr))
    await settle()
    assert not late.done()  # the stale answer is no longer good for it
    origin.gate.set()
    found = await late
    assert (first.source, found.source, found.entry.body) == (Source.STALE, Source.LOADER, b"v2")


async def test_a_hit_being_refreshed_early_is_not_served_once_it_expired(
    clock: FakeClock, observer: RecordingObserver
) -> None:
    cache = TieredCache(l1(clock, observer), None, clock=clock, observer=observer, rand=lambda: 0.0)
    origin = Origin(clock, Staleness())
    early = Staleness(early_refresh=1.0)
    origin.takes = 0.5
    await cache.get("k", "", l1_ttl=FRESH, loader=origin, stale=early)
    origin.gate = asyncio.Event()
    origin.takes = 0.0
    hit = await cache.get("k", "", l1_ttl=FRESH, loader=origin, stale=early)  # starts it
    clock.advance(FRESH)  # expired while the origin is slow
    late = asyncio.create_task(cache.get("k", "", l1_ttl=FRESH, loader=origin, stale=early))
    await settle()
    assert not late.done()
    origin.gate.set()
    found = await late
    assert (hit.source, hit.entry.body) == (Source.L1, b"v1")
    assert (found.source, found.entry.body) == (Source.LOADER, b"v2")


async def test_a_refresh_the_origin_answers_with_something_not_to_keep_drops_the_entry(
    cache: TieredCache, clock: FakeClock
) -> None:
    origin = Origin(clock)
    await cache.get("k", "", l1_ttl=FRESH, loader=origin, stale=SWR)
    clock.advance(FRESH + 1)

    async def gone() -> Loaded:  # the resource was deleted: a 404 the route does not keep
        origin.calls += 1
        return Loaded(Entry(404, (), b"", clock.time(), 0), detail="status")

    stale = await cache.get("k", "", l1_ttl=FRESH, loader=gone, stale=SWR)
    await settle()
    after = await cache.get("k", "", l1_ttl=FRESH, loader=gone, stale=SWR)
    assert (stale.source, stale.entry.status) == (Source.STALE, 200)
    assert (after.source, after.entry.status) == (Source.LOADER, 404)  # not the old 200


async def test_closing_waits_for_a_refresh_still_running(
    cache: TieredCache, clock: FakeClock
) -> None:
    origin = Origin(clock)
    await cache.get("k", "", l1_ttl=FRESH, loader=origin, stale=SWR)
    clock.advance(FRESH + 1)
    origin.gate = asyncio.Event()
    await cache.get("k", "", l1_ttl=FRESH, loader=origin, stale=SWR)  # the refresh, held
    await settle()
    closing = asyncio.create_task(cache.aclose())
    await settle()
    assert not closing.done()  # a refresh is not cut off by a stop; it is bounded by its loader
    origin.gate.set()
    await closing
    assert origin.version == 2
