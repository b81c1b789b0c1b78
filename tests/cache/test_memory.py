"""L1 beyond the tier contract: both bounds, why each entry left, and kept renderings."""

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


async def held(stored: Entry, key: str = "a", render: bytes | None = None) -> int:
    """The bytes L1 counts for ``key`` holding only ``stored`` (rendered as ``render``)."""
    tier = MemoryTier(max_entries=1, max_bytes=1 << 30, clock=FakeClock())
    await tier.set(key, "", stored, 60)
    if render is not None:
        tier.peek_rendered(key, "", lambda _: render)
    return tier.bytes


class Renderer:
    """A ``render`` that counts its calls and renders ``size`` bytes per entry."""

    def __init__(self, size: int = 300) -> None:
        self.size = size
        self.calls = 0

    def __call__(self, stored: Entry) -> bytes:
        self.calls += 1
        return b"%d " % len(stored.body) + b"h" * self.size


async def test_max_entries_evicts_the_oldest_key_not_read_since_it_came(
    clock: FakeClock, observer: RecordingObserver
) -> None:
    tier = l1(clock, observer, max_entries=3)
    for key in ("a", "b", "c"):
        await tier.set(key, "", entry(), 60)
    assert await tier.get("a") is not None  # read while new: "a" will stay, "b" is next to go
    await tier.set("d", "", entry(), 60)
    assert await tier.get("b") is None
    assert all([await tier.get(key) for key in ("a", "c", "d")])
    assert tier.entries == 3
    assert observer.evictions == {Eviction.SIZE: 1}


async def test_entries_stay_counted_when_variants_expire_and_keys_are_stored_again(
    clock: FakeClock, observer: RecordingObserver
) -> None:
    tier = l1(clock, observer)
    await tier.set("a", "json", entry(), 10)
    await tier.set("a", "xml", entry(), 30)
    clock.advance(20)  # "json" is past its expiry, "xml" is not
    assert await tier.get("a", "json") is None
    assert tier.entries == 1
    clock.advance(20)  # the whole key is past its expiry
    await tier.set("a", "json", entry(), 10)  # stored anew, the expired variant not kept
    assert tier.entries == 1
    assert await tier.get("a", "xml") is None
    await tier.set("b", "", entry(), 10)
    assert tier.entries == 2
    assert observer.evictions == {Eviction.EXPIRED: 2}  # "json" when read, "xml" when replaced


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
    one = await held(entry(1000))
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
    tier = l1(clock, observer, max_bytes=await held(entry(100)))
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
    assert tier.bytes == await held(entry(20))
    assert not observer.evictions


async def test_bytes_count_more_than_the_body_and_grow_with_it() -> None:
    # What an entry costs in memory beyond its body (objects, L1's bookkeeping) is counted too.
    assert await held(entry(0)) > 500
    assert await held(entry(1000)) - await held(entry(0)) >= 1000


async def test_a_rendering_is_made_once_and_counted(
    clock: FakeClock, observer: RecordingObserver
) -> None:
    tier = l1(clock, observer)
    await tier.set("a", "", entry(), 60)
    unrendered = tier.bytes
    render = Renderer(300)
    first = tier.peek_rendered("a", "", render)
    second = tier.peek_rendered("a", "", render)
    assert first is not None
    assert second is not None
    assert first[0] is second[0]
    assert first[2] == render(entry())
    assert second[2] is first[2]
    assert render.calls == 2  # one by the tier, one just above
    assert tier.bytes - unrendered >= 300
    assert tier.bytes == await held(entry(), render=first[2])
    assert (await tier.get("a")) is not None
    assert tier.entries == 1


async def test_a_missing_key_or_variant_renders_nothing(
    clock: FakeClock, observer: RecordingObserver
) -> None:
    tier = l1(clock, observer)
    render = Renderer()
    await tier.set("a", "json", entry(), 60)
    assert tier.peek_rendered("b", "", render) is None
    assert tier.peek_rendered("a", "xml", render) is None
    assert render.calls == 0


async def test_making_room_for_a_rendering_evicts_by_the_policy(
    clock: FakeClock, observer: RecordingObserver
) -> None:
    one = await held(entry(1000))
    tier = l1(clock, observer, max_bytes=one * 3 + 100)
    for key in ("a", "b", "c"):
        await tier.set(key, "", entry(1000), 60)
    assert tier.peek("a") is not None  # read while new: it moves to main when room is made
    assert tier.peek_rendered("c", "", Renderer(500)) is not None
    assert tier.peek("b") is None  # never read: it goes first
    assert tier.peek("a") is not None  # read again, in main now
    assert tier.peek("c") is not None
    assert tier.entries == 2
    assert tier.bytes <= tier.max_bytes
    assert observer.evictions == {Eviction.SIZE: 1}
    # And the bound still holds for what is stored next: the rendered key counts at its size.
    # "c", read only while new, moves to main and is passed over there by "a", read since.
    await tier.set("d", "", entry(1000), 60)
    assert tier.bytes <= tier.max_bytes
    assert tier.peek("c") is None
    assert tier.peek_rendered("a", "", Renderer()) is not None
    assert tier.peek("d") is not None
    assert tier.entries == 2
    assert observer.evictions == {Eviction.SIZE: 2}


async def test_a_rendering_that_would_not_fit_is_not_kept(
    clock: FakeClock, observer: RecordingObserver
) -> None:
    tier = l1(clock, observer, max_bytes=await held(entry(100)) + 50)
    await tier.set("a", "", entry(100), 60)
    counted = tier.bytes
    render = Renderer(500)
    found = tier.peek_rendered("a", "", render)
    assert found is not None
    assert found[2] == render(entry(100))
    assert tier.peek_rendered("a", "", render) is not None
    assert render.calls == 3  # made on every read, never kept
    assert tier.bytes == counted
    assert tier.entries == 1
    assert not observer.evictions


async def test_an_evicted_entry_takes_its_rendering_with_it(
    clock: FakeClock, observer: RecordingObserver
) -> None:
    one = await held(entry(1000), render=Renderer()(entry(1000)))
    tier = l1(clock, observer, max_bytes=one * 2)
    render = Renderer()
    await tier.set("a", "", entry(1000), 60)
    assert tier.peek_rendered("a", "", render) is not None
    await tier.set("b", "", entry(1000), 60)
    assert tier.peek_rendered("b", "", render) is not None
    await tier.set("c", "", entry(1000), 60)  # "a" goes, rendering and all
    assert tier.peek_rendered("a", "", render) is None
    assert tier.bytes == one + await held(entry(1000), key="c")
    # "c", never read, goes before "b", read while new; "a" is rendered anew.
    await tier.set("a", "", entry(1000), 60)
    assert tier.peek_rendered("a", "", render) is not None
    assert render.calls == 3
    assert tier.peek("c") is None
    assert tier.peek("b") is not None
    assert tier.bytes == 2 * one
    assert observer.evictions == {Eviction.SIZE: 2}


async def test_a_new_entry_is_rendered_anew(clock: FakeClock, observer: RecordingObserver) -> None:
    tier = l1(clock, observer)
    render = Renderer()
    await tier.set("a", "", entry(10), 60)
    old = tier.peek_rendered("a", "", render)
    await tier.set("a", "", entry(20), 60)
    new = tier.peek_rendered("a", "", render)
    assert old is not None
    assert new is not None
    assert new[2] != old[2]
    assert new[2] == render(entry(20))
    assert tier.bytes == await held(entry(20), render=new[2])


async def test_rendering_keeps_expiry_and_ttl_left(
    clock: FakeClock, observer: RecordingObserver
) -> None:
    tier = l1(clock, observer)
    await tier.set("a", "", entry(), 30)
    render = Renderer()
    clock.advance(12)
    found = tier.peek_rendered("a", "", render)
    assert found is not None
    assert found[1] == 18
    clock.advance(17)
    found = tier.peek_rendered("a", "", render)
    assert found is not None
    assert found[1] == 1
    clock.advance(1)
    assert tier.peek_rendered("a", "", render) is None
    assert render.calls == 1
    await tier.set("b", "", entry(), 60)  # sweeps the expired key, rendering and all
    assert tier.entries == 1
    assert tier.bytes == await held(entry(), key="b")
    assert observer.evictions == {Eviction.EXPIRED: 1}


async def test_an_expired_variant_leaves_the_others_and_their_renderings(
    clock: FakeClock, observer: RecordingObserver
) -> None:
    tier = l1(clock, observer)
    render = Renderer()
    await tier.set("p", "short", entry(10), 5)
    await tier.set("p", "long", entry(20), 60)
    assert tier.peek_rendered("p", "short", render) is not None
    long = tier.peek_rendered("p", "long", render)
    assert long is not None
    clock.advance(5)
    assert tier.peek_rendered("p", "short", render) is None
    again = tier.peek_rendered("p", "long", render)
    assert again is not None
    assert again[2] is long[2]
    assert render.calls == 2
    assert tier.entries == 1
    assert observer.evictions == {Eviction.EXPIRED: 1}
    # A rendered key still expires with its longest-lived variant, swept by any write.
    clock.advance(56)
    await tier.set("q", "", entry(), 60)
    assert tier.entries == 1
    assert observer.evictions == {Eviction.EXPIRED: 2}
