"""Degraded mode (``cache.changes``): while coherence is lost, L1 still answers, but every entry
it keeps lives at most ``degraded_ttl``; entries from before the loss are gone, and the return
of coherence empties L1 once more. With ``degraded_ttl`` 0, L1 is unused meanwhile."""

from __future__ import annotations

from cache.entry import Entry
from cache.lookup import Loaded, Source
from cache.memory import MemoryTier
from cache.stale import NEVER
from cache.tiered import TieredCache
from tests.fakes import FakeClock, RecordingObserver

TTL = 60.0  # the route's: far longer than degraded_ttl


class Replica:
    """A tiered cache without L2 whose coherence the test turns off and on."""

    def __init__(self, *, degraded_ttl: float, subscribed: bool) -> None:
        self.clock = FakeClock()
        self.observer = RecordingObserver()
        self.l1 = MemoryTier(max_entries=100, max_bytes=1 << 20, clock=self.clock)
        self.cache = TieredCache(
            self.l1,
            None,
            clock=self.clock,
            observer=self.observer,
            trust_l1=subscribed,
            degraded_ttl=degraded_ttl,
        )
        self.loads = 0

    async def read(self, key: str = "users:1") -> Source:
        async def load() -> Loaded:
            self.loads += 1
            entry = Entry(200, (), b"v%d" % self.loads, self.clock.time(), TTL)
            return Loaded(entry, l1_ttl=TTL, l2_ttl=0)

        return (await self.cache.get(key, "", l1_ttl=TTL, loader=load)).source

    def state(self) -> tuple[bool, bool]:
        """(L1 used, degraded)."""
        return self.cache.l1_trusted, self.cache.degraded

    def peek(self, key: str = "users:1") -> bool:
        """An L1 hit on the hit path."""
        found = self.cache.hit_path.peek(key, "", lambda entry: entry.body, NEVER)
        return isinstance(found, tuple)


async def test_unsubscribed_l1_answers_but_each_entry_lives_degraded_ttl_at_most() -> None:
    replica = Replica(degraded_ttl=1.0, subscribed=False)  # a start without Redis
    assert replica.state() == (True, True)
    assert await replica.read() is Source.LOADER
    assert await replica.read() is Source.L1
    assert replica.peek()
    replica.clock.advance(0.99)
    assert await replica.read() is Source.L1
    assert replica.observer.degraded_reads == 3  # every L1 answer while degraded
    replica.clock.advance(0.02)
    assert await replica.read() is Source.LOADER  # 1 s after it was kept, not the route's 60
    assert replica.loads == 2


async def test_a_written_entry_is_capped_too() -> None:
    replica = Replica(degraded_ttl=1.0, subscribed=False)
    entry = Entry(200, (), b"written", replica.clock.time(), TTL)
    await replica.cache.put("users:1", "", entry, l1_ttl=TTL, l2_ttl=0)
    assert await replica.read() is Source.L1
    replica.clock.advance(1.01)
    assert await replica.read() is Source.LOADER


async def test_the_loss_empties_l1_once_and_a_failed_retry_keeps_what_degraded_mode_kept() -> None:
    replica = Replica(degraded_ttl=1.0, subscribed=True)
    assert replica.state() == (True, False)
    await replica.read()
    await replica.cache.distrust_l1()  # subscription lost
    assert replica.state() == (True, True)
    assert await replica.read() is Source.LOADER  # what L1 held before the loss is gone
    await replica.cache.distrust_l1()  # a retry to subscribe failed: nothing more is lost
    assert await replica.read() is Source.L1
    assert replica.loads == 2


async def test_subscribed_again_l1_is_emptied_and_entries_live_their_full_ttl() -> None:
    replica = Replica(degraded_ttl=1.0, subscribed=False)
    await replica.read()
    await replica.cache.trust_l1()
    assert replica.state() == (True, False)
    assert await replica.read() is Source.LOADER  # kept while deaf: may be what a change replaced
    replica.clock.advance(30)
    assert await replica.read() is Source.L1
    assert replica.peek()
    assert replica.observer.degraded_reads == 0  # trusted hits are not degraded ones


async def test_degraded_ttl_0_leaves_l1_unused_while_unsubscribed() -> None:
    replica = Replica(degraded_ttl=0.0, subscribed=False)
    assert replica.state() == (False, False)
    assert [await replica.read() for _ in range(3)] == [Source.LOADER] * 3
    assert not replica.peek()
    assert replica.observer.lookups["l1", True] + replica.observer.lookups["l1", False] == 0
    await replica.cache.trust_l1()
    await replica.read()
    assert await replica.read() is Source.L1


async def test_a_slow_fetch_is_kept_degraded_ttl_from_when_it_began() -> None:
    # A change another replica made while the fetch ran goes unheard: the old answer it may
    # bring must not outlive the change by more than degraded_ttl.
    replica = Replica(degraded_ttl=1.0, subscribed=False)

    async def slow() -> Loaded:
        entry = Entry(200, (), b"old", replica.clock.time(), TTL)
        replica.clock.advance(0.7)  # the origin took 0.7 s to answer
        return Loaded(entry, l1_ttl=TTL, l2_ttl=0)

    await replica.cache.get("users:1", "", l1_ttl=TTL, loader=slow)
    replica.clock.advance(0.29)
    assert await replica.read() is Source.L1
    replica.clock.advance(0.02)  # 1 s after the fetch began
    assert await replica.read() is Source.LOADER
