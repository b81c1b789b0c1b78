"""Test doubles: a clock the test drives, an observer that records, a tier that can fail."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Sequence

from cache.entry import Entry
from cache.errors import TierUnavailable
from cache.observer import Eviction, Invalidation
from cache.tier import Stored, Tier


class FakeClock:
    """Both clocks, moved only by ``advance``."""

    def __init__(self, wall: float = 1_700_000_000.0) -> None:
        self.wall = wall
        self.mono = 1_000.0

    def time(self) -> float:
        return self.wall

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds


class RecordingObserver:
    """Counts every event the engine reports."""

    def __init__(self) -> None:
        self.lookups: Counter[tuple[str, bool]] = Counter()
        self.evictions: Counter[Eviction] = Counter()
        self.errors: Counter[tuple[str, str]] = Counter()
        self.breaker: list[tuple[str, bool]] = []
        self.writes_queued: Counter[bool] = Counter()
        self.flushes: Counter[str] = Counter()
        self.invalidations: Counter[Invalidation] = Counter()
        self.subscribed: list[bool] = []
        self.lags: list[float] = []
        self.degraded_reads = 0

    def lookup(self, tier: str, hit: bool) -> None:
        self.lookups[tier, hit] += 1

    def evicted(self, reason: Eviction, count: int) -> None:
        self.evictions[reason] += count

    def tier_error(self, tier: str, op: str) -> None:
        self.errors[tier, op] += 1

    def breaker_changed(self, tier: str, is_open: bool) -> None:
        self.breaker.append((tier, is_open))

    def queued(self, coalesced: bool) -> None:
        self.writes_queued[coalesced] += 1

    def flushed(self, result: str) -> None:
        self.flushes[result] += 1

    def invalidated(self, source: Invalidation) -> None:
        self.invalidations[source] += 1

    def coherence_changed(self, subscribed: bool) -> None:
        self.subscribed.append(subscribed)

    def coherence_lag(self, seconds: float) -> None:
        self.lags.append(seconds)

    def degraded_read(self) -> None:
        self.degraded_reads += 1


class FlakyTier:
    """Wraps a tier: while ``down`` every call fails; ops named in ``hold`` wait for ``released``."""

    name = "l2"

    def __init__(self, inner: Tier) -> None:
        self.inner = inner
        self.down = False
        self.calls: Counter[str] = Counter()
        self.hold: set[str] = set()
        self.released = asyncio.Event()

    def _check(self, op: str) -> None:
        self.calls[op] += 1
        if self.down:
            raise TierUnavailable(op, "down for the test")

    async def get(self, key: str, variant: str = "") -> Stored | None:
        self._check("get")
        return await self.inner.get(key, variant)

    async def set(
        self,
        key: str,
        variant: str,
        entry: Entry,
        ttl: float,
        *,
        fetched_at: float | None = None,
        tags: Sequence[str] = (),
    ) -> None:
        self._check("set")
        if "set" in self.hold:
            await self.released.wait()
        await self.inner.set(key, variant, entry, ttl, fetched_at=fetched_at, tags=tags)

    async def replace(
        self,
        key: str,
        variant: str,
        entry: Entry,
        ttl: float,
        *,
        version: int | None = None,
        tags: Sequence[str] = (),
    ) -> bool:
        self._check("replace")
        return await self.inner.replace(key, variant, entry, ttl, version=version, tags=tags)

    async def delete(self, key: str) -> bool:
        self._check("delete")
        if "delete" in self.hold:
            await self.released.wait()
        return await self.inner.delete(key)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def until(predicate: Callable[[], bool], within: float = 5.0, what: str = "") -> None:
    """Wait for ``predicate`` to hold, polling; fail the test after ``within`` seconds."""
    for _ in range(int(within / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"not true within {within:g}s: {what or predicate}")
