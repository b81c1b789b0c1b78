"""L1 beyond the tier contract: both bounds, and why each entry left."""

from __future__ import annotations

from cache.entry import Entry
from cache.memory import MemoryTier
from cache.observer import Eviction
from tests.fakes import FakeClock, RecordingObserver


def entry(body_size: int = 10) -> Entry:
    return Entry(200, (), b"x" * body_size, 0.0, 600.0)


def l1(clock: FakeClock, observer: RecordingObserver, **bounds: int) -> MemoryTier:
    limits = {"max_entries": 1000, "max_bytes": 1 << 30} | bounds
    return MemoryTier(clock=clock, observer=observer, **limits)


async def test_max_entries_evicts_the_least_recently_used(
    clock: FakeClock, observer: RecordingObserver
) -> None:
    tier = l1(clock, observer, max_entries=3)
    for key in ("a", "b", "c"):
        await tier.set(key, "", entry(), 60)
    assert await tier.get("a") is not None  # "b" is now the least recently used
    await tier.set("d", "", entry(), 60)
    assert await tier.get("b") is None
    assert all([await tier.get(key) for key in ("a", "c", "d")])
    assert tier.entries == 3
    assert observer.evictions == {Eviction.SIZE: 1}


async def test_variants_count_against_max_entries(
    clock: FakeClock, observer: RecordingObserver
) -> None:
    tier = l1(clock, observer, max_entries=3)
    await tier.set("a", "", entry(), 60)
    await tier.set("b", "json", entry(), 60)
    await tier.set("b", "xml", entry(), 60)
    assert tier.entries == 3
    await tier.set("c", "", entry(), 60)
    assert await tier.get("a") is None
    assert tier.entries == 3


async def test_max_bytes_evicts_until_the_new_entry_fits(
    clock: FakeClock, observer: RecordingObserver
) -> None:
    one = entry(1000).size()
    tier = l1(clock, observer, max_bytes=one * 3)
    for key in ("a", "b", "c"):
        await tier.set(key, "", entry(1000), 60)
    await tier.set("d", "", entry(1500), 60)  # needs the room of two
    assert await tier.get("a") is None
    assert await tier.get("b") is None
    assert await tier.get("c") is not None
    assert await tier.get("d") is not None
    assert tier.bytes <= one * 3
    assert observer.evictions == {Eviction.SIZE: 2}


async def test_an_entry_larger_than_max_bytes_is_not_kept_and_drops_the_old_one(
    clock: FakeClock, observer: RecordingObserver
) -> None:
    tier = l1(clock, observer, max_bytes=entry(100).size())
    await tier.set("a", "", entry(100), 60)
    await tier.set("a", "", entry(10_000), 60)
    assert await tier.get("a") is None  # the old body must not outlive the write
    assert tier.entries == 0
    assert tier.bytes == 0


async def test_each_variant_expires_on_its_own(
    clock: FakeClock, observer: RecordingObserver
) -> None:
    tier = l1(clock, observer)
    await tier.set("p", "short", entry(), 5)
    await tier.set("p", "long", entry(), 60)
    clock.advance(5)
    assert await tier.get("p", "short") is None
    assert await tier.get("p", "long") is not None
    assert tier.entries == 1
    assert observer.evictions == {Eviction.EXPIRED: 1}


async def test_expired_entries_are_swept_and_counted_as_expired(
    clock: FakeClock, observer: RecordingObserver
) -> None:
    tier = l1(clock, observer)
    await tier.set("a", "", entry(), 5)
    await tier.set("b", "", entry(), 5)
    clock.advance(6)
    await tier.set("c", "", entry(), 60)  # any write sweeps what has expired
    assert tier.entries == 1
    assert observer.evictions == {Eviction.EXPIRED: 2}


async def test_ttl_left_counts_down_with_the_clock(
    clock: FakeClock, observer: RecordingObserver
) -> None:
    tier = l1(clock, observer)
    await tier.set("a", "", entry(), 30)
    clock.advance(12)
    found = await tier.get("a")
    assert found is not None
    assert found.ttl_left == 18


async def test_delete_and_clear_count_as_invalidated(
    clock: FakeClock, observer: RecordingObserver
) -> None:
    tier = l1(clock, observer)
    await tier.set("a", "v1", entry(), 60)
    await tier.set("a", "v2", entry(), 60)
    await tier.set("b", "", entry(), 60)
    await tier.set("c", "", entry(), 60)
    assert await tier.delete("a") is True
    assert await tier.clear() == 2
    assert tier.entries == 0
    assert tier.bytes == 0
    assert observer.evictions == {Eviction.INVALIDATED: 4}


async def test_replacing_an_entry_is_not_an_eviction(
    clock: FakeClock, observer: RecordingObserver
) -> None:
    tier = l1(clock, observer)
    await tier.set("a", "", entry(10), 60)
    await tier.set("a", "", entry(20), 60)
    assert tier.entries == 1
    assert tier.bytes == entry(20).size()
    assert not observer.evictions
