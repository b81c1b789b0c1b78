"""L1: the in-process tier, a time-aware LRU bounded by entry count and by bytes.

Each logical key holds its variants together, so dropping a key drops every variant in one step.
Expiry is per variant; the LRU item of a key lives as long as its longest-lived variant, and a
variant that is past its own expiry reads as a miss and is removed when read.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from cachetools import TLRUCache

from cache.clock import Clock
from cache.entry import Entry
from cache.observer import CacheObserver, Eviction, NullObserver
from cache.tier import Stored


class _Variants:
    """The variants of one key: variant → (entry, expiry on the monotonic clock)."""

    __slots__ = ("by_variant", "expires", "size")

    def __init__(self, by_variant: dict[str, tuple[Entry, float]]) -> None:
        self.by_variant = by_variant
        self.expires = max(expires for _, expires in by_variant.values())
        self.size = sum(entry.size() for entry, _ in by_variant.values())


def _time_to_use(_key: str, value: _Variants, _now: float) -> float:
    return value.expires


def _size_of(value: _Variants) -> int:
    return value.size


class _Store(TLRUCache[str, _Variants]):
    """cachetools' TLRU that tells its owner what it expires and evicts."""

    def __init__(
        self,
        max_bytes: int,
        timer: Callable[[], float],
        on_drop: Callable[[_Variants, Eviction], None],
    ) -> None:
        super().__init__(max_bytes, _time_to_use, timer, _size_of)
        self._on_drop = on_drop

    def expire(self, time: Any = None) -> list[tuple[str, _Variants]]:
        expired = list(super().expire(time))
        for _key, variants in expired:
            self._on_drop(variants, Eviction.EXPIRED)
        return expired

    def popitem(self) -> tuple[str, _Variants]:
        key, variants = super().popitem()
        self._on_drop(variants, Eviction.SIZE)
        return key, variants


class MemoryTier:
    """L1. Bounded by ``max_entries`` (variants) and ``max_bytes`` (``Entry.size``)."""

    name = "l1"

    def __init__(
        self,
        *,
        max_entries: int,
        max_bytes: int,
        clock: Clock,
        observer: CacheObserver | None = None,
    ) -> None:
        if max_entries < 1 or max_bytes < 1:
            raise ValueError("an L1 needs room for at least one entry and one byte")
        self._max_entries = max_entries
        self._observer: CacheObserver = observer or NullObserver()
        self._store = _Store(max_bytes, clock.monotonic, self._dropped)
        self._count = 0

    @property
    def max_entries(self) -> int:
        return self._max_entries

    @property
    def max_bytes(self) -> int:
        return int(self._store.maxsize)

    @property
    def entries(self) -> int:
        """Variants held, expired ones not yet swept included."""
        return self._count

    @property
    def bytes(self) -> int:
        """Bytes held, by ``Entry.size``."""
        return int(self._store.currsize)

    # Every method freezes the store's clock (``with self._store.timer``) so that one call sees
    # one instant: an item cannot expire between the check and the use.

    async def get(self, key: str, variant: str = "") -> Stored | None:
        return self.peek(key, variant)

    def peek(self, key: str, variant: str = "") -> Stored | None:
        """``get`` without a wait: what an answer that must not yield (a hit) reads."""
        with self._store.timer as now:
            try:
                # Indexing, not ``get``: get asks ``in`` first, which does the expiry check twice.
                variants = self._store[key]
            except KeyError:
                return None
            slot = variants.by_variant.get(variant)
            if slot is None:
                return None
            entry, expires = slot
            if expires <= now:
                self._drop_variant(key, variants, variant)
                return None
            return Stored(entry, expires - now)

    async def set(
        self,
        key: str,
        variant: str,
        entry: Entry,
        ttl: float,
        *,
        fetched_at: float | None = None,
        tags: Sequence[str] = (),  # indexed in L2 only: a purge by tag finds keys there
    ) -> None:
        # ``fetched_at`` needs no check here: this process's own writes detach its fills.
        if ttl <= 0:
            return
        with self._store.timer as now:
            current = self._store.pop(key, None)
            by_variant = dict(current.by_variant) if current is not None else {}
            if current is not None:
                # A replacement is not an eviction: take the old item out quietly.
                self._count -= len(current.by_variant)
            by_variant[variant] = (entry, now + ttl)
            try:
                self._store[key] = _Variants(by_variant)
            except ValueError:
                # Larger than max_bytes on its own: L1 cannot hold it, and the old variants must
                # not outlive the write that replaced them.
                if current is not None:
                    self._observer.evicted(Eviction.SIZE, len(current.by_variant))
                return
            self._count += len(by_variant)
            while self._count > self._max_entries:
                self._store.popitem()

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
        # One process orders its own writes (the write-behind lock), so no version is checked.
        with self._store.timer:
            dropped = self._store.pop(key, None)
        if dropped is not None:
            self._dropped(dropped, Eviction.INVALIDATED)
        await self.set(key, variant, entry, ttl)
        return True

    async def delete(self, key: str) -> bool:
        with self._store.timer:
            self._store.expire()
            variants = self._store.pop(key, None)
        if variants is None:
            return False
        self._dropped(variants, Eviction.INVALIDATED)
        return True

    async def delete_prefix(self, prefix: str) -> list[str]:
        """Drop every key starting with ``prefix``; returns them."""
        with self._store.timer:
            keys = [key for key in self._store if key.startswith(prefix)]
            for key in keys:
                self._dropped(self._store.pop(key), Eviction.INVALIDATED)
        return keys

    async def clear(self) -> int:
        """Drop everything (a replica that may have missed invalidations); returns how many."""
        dropped = self._count
        self._store.clear()
        self._count = 0
        if dropped:
            self._observer.evicted(Eviction.INVALIDATED, dropped)
        return dropped

    async def aclose(self) -> None:
        self._store.clear()
        self._count = 0

    def _dropped(self, variants: _Variants, reason: Eviction) -> None:
        self._count -= len(variants.by_variant)
        self._observer.evicted(reason, len(variants.by_variant))

    def _drop_variant(self, key: str, variants: _Variants, variant: str) -> None:
        del self._store[key]
        self._count -= len(variants.by_variant)
        self._observer.evicted(Eviction.EXPIRED, 1)
        rest = {name: slot for name, slot in variants.by_variant.items() if name != variant}
        if rest:
            self._store[key] = _Variants(rest)
            self._count += len(rest)
