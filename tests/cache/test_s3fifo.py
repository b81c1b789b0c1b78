"""L1's store, S3-FIFO: what it keeps when it must make room, its expiry, its byte bound."""

from __future__ import annotations

import gc
import random
import tracemalloc

import pytest

from cache.observer import Eviction
from cache.s3fifo import S3FIFO
from tests.fakes import FakeClock


class Item:
    def __init__(self, size: int = 10, expires: float = 1e9) -> None:
        self.size = size
        self.expires = expires


def store(
    clock: FakeClock, maxsize: int = 100, maxcount: int | None = None
) -> tuple[S3FIFO[str, Item], list[tuple[Item, Eviction]]]:
    dropped: list[tuple[Item, Eviction]] = []
    made: S3FIFO[str, Item] = S3FIFO(
        maxsize,
        lambda item: item.expires,
        clock.monotonic,
        lambda item: item.size,
        lambda item, reason: dropped.append((item, reason)),
        maxcount,
    )
    return made, dropped


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_a_key_read_while_new_outlives_a_scan_of_keys_read_once(clock: FakeClock) -> None:
    cache, dropped = store(clock)  # room for 10
    cache["hot"] = Item()
    assert cache["hot"].size == 10
    for n in range(50):  # five times the store in keys read once each
        cache[f"scan:{n}"] = Item()
    assert "hot" in cache
    assert len(cache) == 10
    assert {reason for _, reason in dropped} == {Eviction.SIZE}
    assert len(dropped) == 41


def test_a_key_evicted_while_new_and_stored_again_goes_to_main(clock: FakeClock) -> None:
    cache, _ = store(clock)  # room for 10
    for n in range(11):  # "0" goes unread, remembered in ghost
        cache[str(n)] = Item()
    assert "0" not in cache
    cache["0"] = Item()  # wanted again soon: main, though never read
    for n in range(100, 150):  # a scan of keys read once
        cache[str(n)] = Item()
    assert "0" in cache
    assert "1" not in cache  # stored once, never read: gone with the scan


def test_storing_a_key_again_keeps_its_place_and_its_reads(clock: FakeClock) -> None:
    cache, _ = store(clock, maxsize=30)
    cache["a"] = Item()
    cache["b"] = Item()
    cache["c"] = Item()
    assert cache["a"] is not None  # read: it will move to main
    cache["a"] = Item(size=10)  # the same key again: in place, still read
    cache["d"] = Item()
    assert "a" in cache
    assert "b" not in cache


def test_a_value_grown_in_place_evicts_others_never_itself(clock: FakeClock) -> None:
    cache, dropped = store(clock, maxsize=30)
    for key in ("a", "b", "c"):
        cache[key] = Item()
    grown = Item(size=25)
    cache["c"] = grown
    assert cache.held("c") is grown
    assert cache.currsize <= 30
    assert [reason for _, reason in dropped] == [Eviction.SIZE, Eviction.SIZE]
    with pytest.raises(ValueError, match="does not fit"):
        cache["d"] = Item(size=31)


def test_a_value_grown_in_place_makes_room_past_keys_read_many_times(clock: FakeClock) -> None:
    cache, _ = store(clock, maxsize=30)
    cache["p"] = Item()
    cache["a"] = Item()
    assert cache["p"] is not None
    assert cache["a"] is not None
    cache["b"] = Item()
    cache["c"] = Item()  # "p" and "a", read while new, go to main; "b" goes
    for _ in range(3):
        assert cache["a"] is not None
    cache.pop("c")
    cache["p"] = Item(size=25)  # "a" goes round main three times before it can go
    assert cache.currsize <= cache.maxsize
    assert "a" not in cache
    assert "p" in cache


def test_expired_items_are_dropped_as_expired_by_expire_a_read_or_eviction(
    clock: FakeClock,
) -> None:
    cache, dropped = store(clock)
    now = clock.monotonic()
    cache["soon"] = Item(expires=now + 5)
    cache["later"] = Item(expires=now + 50)
    cache["read"] = Item(expires=now + 5)
    clock.advance(10)
    with pytest.raises(KeyError):
        cache["read"]
    assert [item.expires for _, item in cache.expire()] == [now + 5]
    assert len(cache) == 1
    assert [reason for _, reason in dropped] == [Eviction.EXPIRED, Eviction.EXPIRED]
    assert cache.currsize == 10


def test_a_key_dropped_and_stored_again_is_not_evicted_for_its_old_place(
    clock: FakeClock,
) -> None:
    cache, _ = store(clock, maxsize=30)
    cache["a"] = Item()
    cache.pop("a")
    cache["b"] = Item()
    cache["a"] = Item()  # a new place, behind "b"
    cache["c"] = Item()
    cache["d"] = Item()
    assert "b" not in cache
    assert "a" in cache


def test_max_count_gives_small_its_share_by_count(clock: FakeClock) -> None:
    # A byte budget far above what is held: small's tenth is counted in items instead.
    cache, _ = store(clock, maxsize=1 << 30, maxcount=3)
    for key in ("a", "b", "c"):
        cache[key] = Item()
    assert cache["a"] is not None
    cache["d"] = Item()
    key, _ = cache.popitem()
    assert key == "b"


def test_the_byte_bound_holds_whatever_the_traffic(clock: FakeClock) -> None:
    cache, dropped = store(clock, maxsize=1_000)
    rng = random.Random(7)
    held: dict[str, Item] = {}
    for _ in range(20_000):
        key = str(int(rng.paretovariate(1.0) * 10) % 400)
        if rng.random() < 0.5 and key in cache:
            assert cache[key] is not None  # a read
            continue
        if rng.random() < 0.05:
            cache.pop(key)
            held.pop(key, None)
            continue
        item = Item(size=rng.randint(1, 120), expires=clock.monotonic() + rng.uniform(1, 50))
        cache[key] = item
        held[key] = item
        clock.advance(0.01)
        assert cache.currsize <= cache.maxsize
    alive = {key: item for key, item in held.items() if cache.held(key) is item}
    assert cache.currsize == sum(item.size for item in alive.values())
    assert len(cache) == len(alive)
    assert dropped


def test_keys_dropped_and_stored_again_under_budget_take_no_memory_for_it(
    clock: FakeClock,
) -> None:
    """A store that never fills evicts nothing, so nothing passes its queues: a key invalidated
    and stored again on every write must not leave its old place behind each time."""
    cache, _ = store(clock, maxsize=1 << 30)
    for n in range(100):
        cache[f"k{n}"] = Item()

    def churn(times: int) -> None:
        for n in range(times):
            key = f"k{n % 100}"
            cache.pop(key)
            cache[key] = Item()
            assert cache[key] is not None

    churn(2_000)  # the queues at their working size
    gc.collect()
    tracemalloc.start()
    try:
        churn(20_000)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    # 20,000 places left behind would be 1.6 MB and more; the queues' own swing is a few KB.
    assert grown < 100_000
    assert len(cache) == 100
