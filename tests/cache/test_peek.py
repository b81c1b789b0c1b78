"""The hit path's read (``cache.peek``, a ``TieredCache``'s ``hit_path``): L1 at once, else L2
sent with the other reads of the round, counted once whoever answers, and never storing what a
write replaced."""

from __future__ import annotations

import asyncio

import fakeredis
import pytest

from cache.breaker import Breaker
from cache.entry import Entry
from cache.lookup import Loaded, Source
from cache.memory import MemoryTier
from cache.peek import KEEP_READ, L2Read
from cache.redis.tier import RedisTier, client_from_url
from cache.stale import NEVER
from cache.tier import Stored
from cache.tiered import TieredCache
from tests.fakes import FakeClock, RecordingObserver
from tests.ports import silent_port


class CountedTier(RedisTier):
    """L2 on fakeredis, counting the reads that reach Redis."""

    def __init__(self) -> None:
        client = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
        super().__init__(client, key_prefix="t:", timeout=1.0)
        self.reads = 0

    def get_soon(self, key: str, variant: str = "") -> asyncio.Future[Stored | None]:
        self.reads += 1
        return super().get_soon(key, variant)


@pytest.fixture
def l2() -> CountedTier:
    return CountedTier()


@pytest.fixture
def l1(clock: FakeClock, observer: RecordingObserver) -> MemoryTier:
    return MemoryTier(max_entries=100, max_bytes=1 << 20, clock=clock, observer=observer)


@pytest.fixture
def cache(
    l1: MemoryTier, l2: CountedTier, clock: FakeClock, observer: RecordingObserver
) -> TieredCache:
    return TieredCache(l1, l2, clock=clock, observer=observer)


def entry(clock: FakeClock, body: bytes = b"v1", ttl: float = 60.0) -> Entry:
    return Entry(200, (), body, clock.time(), ttl)


def origin(clock: FakeClock, body: bytes = b"from the origin") -> Loaded:
    return Loaded(entry(clock, body), l1_ttl=30, l2_ttl=60)


def render(entry: Entry) -> bytes:
    return b"rendered:" + entry.body


def peek(
    cache: TieredCache, key: str, *, l1_ttl: float | None = None
) -> tuple[Entry, bytes] | asyncio.Future[Entry | None] | None:
    """The hit path's read, its L2 answer (given to the read's ``then``) as a future."""
    found = cache.hit_path.peek(key, "", render, NEVER, l1_ttl)
    if found is None or isinstance(found, tuple):
        return found
    answered: asyncio.Future[Entry | None] = asyncio.get_running_loop().create_future()
    found.then = answered.set_result
    return answered


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_an_l2_hit_is_in_l1_before_its_answer_leaves(
    cache: TieredCache, l1: MemoryTier, l2: CountedTier, clock: FakeClock
) -> None:
    # The client's next request may come as soon as the answer is written: L1 must hold the
    # entry by then, not once some task gets round to it.
    await l2.set("users:1", "", entry(clock), 600)
    read = cache.hit_path.peek("users:1", "", render, NEVER, 30)
    assert isinstance(read, L2Read)
    held: asyncio.Future[Stored | None] = asyncio.get_running_loop().create_future()
    read.then = lambda found: held.set_result(l1.peek("users:1"))
    kept = await held
    assert kept is not None
    assert kept.entry == entry(clock)


async def test_an_l2_hit_is_answered_counted_once_and_kept_in_l1(
    cache: TieredCache,
    l1: MemoryTier,
    l2: CountedTier,
    clock: FakeClock,
    observer: RecordingObserver,
) -> None:
    await l2.set("users:1", "", entry(clock), 600)
    found = peek(cache, "users:1", l1_ttl=30)
    assert isinstance(found, asyncio.Future)
    assert await found == entry(clock)
    assert observer.lookups == {("l1", False): 1, ("l2", True): 1}
    await settle()
    kept = l1.peek("users:1")
    assert kept is not None
    assert kept.ttl_left == pytest.approx(30)
    # Now from L1, at once, with its rendering.
    assert peek(cache, "users:1", l1_ttl=30) == (entry(clock), b"rendered:v1")
    assert observer.lookups[("l1", True)] == 1


async def test_without_the_route_s_l1_ttl_only_l1_is_looked_at(
    cache: TieredCache, l2: CountedTier, clock: FakeClock
) -> None:
    await l2.set("users:1", "", entry(clock), 600)
    assert peek(cache, "users:1") is None
    assert l2.reads == 0


async def test_an_l2_miss_is_left_to_get_which_counts_it_and_does_not_ask_again(
    cache: TieredCache, l2: CountedTier, clock: FakeClock, observer: RecordingObserver
) -> None:
    found = peek(cache, "users:1", l1_ttl=30)
    assert isinstance(found, asyncio.Future)
    assert await found is None
    assert observer.lookups == {}

    async def load() -> Loaded:
        return origin(clock)

    lookup = await cache.get("users:1", "", l1_ttl=30, loader=load)
    assert lookup.source is Source.LOADER
    assert l2.reads == 1  # the hit path's read was the lookup's
    assert observer.lookups == {("l1", False): 1, ("l2", False): 1}


async def test_a_read_left_over_is_not_trusted_for_long(
    cache: TieredCache, l2: CountedTier, clock: FakeClock
) -> None:
    found = peek(cache, "users:1", l1_ttl=30)
    assert isinstance(found, asyncio.Future)
    assert await found is None
    await l2.set("users:1", "", entry(clock, b"filled meanwhile"), 600)
    clock.advance(KEEP_READ + 0.5)

    async def load() -> Loaded:
        return origin(clock)

    lookup = await cache.get("users:1", "", l1_ttl=30, loader=load)
    assert lookup.source is Source.L2
    assert lookup.entry.body == b"filled meanwhile"
    assert l2.reads == 2


@pytest.mark.parametrize("change", ["invalidate", "put"])
async def test_a_write_while_l2_is_read_keeps_the_old_value_out_of_l1(
    change: str, cache: TieredCache, l1: MemoryTier, l2: CountedTier, clock: FakeClock
) -> None:
    await l2.set("users:1", "", entry(clock, b"old"), 600)
    found = peek(cache, "users:1", l1_ttl=30)
    assert isinstance(found, asyncio.Future)
    if change == "invalidate":
        await cache.invalidate("users:1")
    else:
        await cache.put("users:1", "", entry(clock, b"new"), l1_ttl=30, l2_ttl=600)
    await found  # read before the write was made: it may answer, as a detached lookup does
    await settle()
    held = l1.peek("users:1")
    assert (held.entry.body if held else None) == (None if change == "invalidate" else b"new")
    lookup = await cache.get("users:1", "", l1_ttl=30, loader=lambda: _loaded(clock))
    assert lookup.entry.body == (b"from the origin" if change == "invalidate" else b"new")


async def _loaded(clock: FakeClock) -> Loaded:
    return origin(clock)


async def test_a_stale_l1_entry_is_left_to_get(
    cache: TieredCache, l1: MemoryTier, l2: CountedTier, clock: FakeClock
) -> None:
    await l1.set("users:1", "", entry(clock, ttl=1), 60)
    clock.advance(2)
    assert peek(cache, "users:1", l1_ttl=30) is None  # stale serving is get's
    assert l2.reads == 0


async def test_a_running_lookup_of_the_key_is_joined_by_get_not_read_again(
    cache: TieredCache, l2: CountedTier, clock: FakeClock
) -> None:
    gate = asyncio.Event()

    async def slow() -> Loaded:
        await gate.wait()
        return origin(clock)

    first = asyncio.create_task(cache.get("users:1", "", l1_ttl=30, loader=slow))
    await settle()
    assert peek(cache, "users:1", l1_ttl=30) is None
    gate.set()
    await first


async def test_one_failed_round_trip_is_one_failure_however_many_reads_it_carried(
    clock: FakeClock, observer: RecordingObserver
) -> None:
    async with silent_port() as port:
        client = client_from_url(f"redis://127.0.0.1:{port}", timeout=0.05)
        breaker = Breaker(failures=3, reset_after=10, clock=clock)
        cache = TieredCache(
            MemoryTier(max_entries=100, max_bytes=1 << 20, clock=clock),
            RedisTier(client, key_prefix="t:", timeout=0.05),
            clock=clock,
            observer=observer,
            breaker=breaker,
        )
        reads = [peek(cache, f"users:{i}", l1_ttl=30) for i in range(10)]
        assert all(isinstance(read, asyncio.Future) for read in reads)
        assert await asyncio.gather(*reads) == [None] * 10  # type: ignore[arg-type]
        assert observer.errors == {("l2", "get"): 1}
        assert not breaker.is_open

        # The lookups that follow take what the reads found (nothing), without asking again.
        async def l1_only() -> Loaded:
            return Loaded(entry(clock), l1_ttl=30)  # no fill: it would fail on its own

        for i in range(10):
            lookup = await cache.get(f"users:{i}", "", l1_ttl=30, loader=l1_only)
            assert lookup.source is Source.LOADER
        assert observer.errors == {("l2", "get"): 1}
        assert observer.lookups[("l2", False)] == 10
        await cache.aclose()
