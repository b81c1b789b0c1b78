"""L1: the in-process tier, a time-aware LRU bounded by entry count and by bytes.

Each logical key holds its variants together, so dropping a key drops every variant in one step.
Expiry is per variant; the LRU item of a key lives as long as its longest-lived variant, and a
variant that is past its own expiry reads as a miss and is removed when read.

``l1.max_bytes`` bounds the memory L1 really takes: each variant is counted, when stored, at what
its objects cost in this process (``Entry.size``, plus its slot, plus the rendering the proxy may
keep with it), and each key at its own objects plus cachetools' bookkeeping for it.
"""

from __future__ import annotations

import builtins
import sys
from collections.abc import Callable, Sequence
from typing import Any

from cachetools import TLRUCache

from cache.clock import Clock
from cache.entry import Entry, allocated
from cache.observer import CacheObserver, Eviction, NullObserver
from cache.tier import MAX_VARIANTS, Stored

# One variant: (entry, expiry on the monotonic clock, what ``peek_rendered`` rendered of it or
# None, the bytes it is counted at). A plain tuple: the hit path unpacks it on every hit.
_Slot = tuple[Entry, float, bytes | None, int]


class _Variants:
    """The variants of one key, by variant name."""

    __slots__ = ("by_variant", "expires", "key", "size")

    def __init__(self, key: str, by_variant: dict[str, _Slot]) -> None:
        # The key object the store holds: setting the item again with another (equal) string,
        # as a caller's lookup key is, would keep both alive (cachetools' expiry heap holds it).
        self.key = key
        self.by_variant = by_variant
        self.expires = max(slot[1] for slot in by_variant.values())
        self.size = _key_cost(key, by_variant) + sum(slot[3] for slot in by_variant.values())


# What L1 spends besides the entries, in bytes. Object sizes come from sys.getsizeof on this
# interpreter, rounded as the allocator rounds them (``allocated``):
#   per variant: its slot tuple, its expiry float, its cost int, its name (unless "", shared);
#   per key: the key string, the _Variants and its dict, the size int cachetools keeps, and
#   _TLRU_ITEM for cachetools' TLRU itself, which cannot be asked: a slot in each of its three
#   dicts (data, sizes, and the OrderedDict that orders the LRU, with its linked-list node), its
#   _Item in the expiry heap, and the dead _Items (with their keys) that replaced, re-set and
#   evicted keys leave in that heap until it holds twice the live ones and is cleaned.
# Measured with tracemalloc on CPython 3.11 (64 bit), fresh key strings, over an octave of L1
# sizes (8k-16k keys; 2k-150k gave the same picture): 290 bytes a key on average while L1 first
# fills, 418 once it is full and evicting (366-474 by where the key count falls between two dict
# resizes; 200-620 at single instants of the heap's clean-up cycle). 430 is the full L1's
# average plus allocator rounding: a full L1 is what runs for hours. The first fill is counted
# about 130 bytes a key high (L1 then holds up to 4 % less than it could, for 1 KB entries).
_TLRU_ITEM = 430
_SLOT = allocated(sys.getsizeof((None, None, None, None)))
_FLOAT = allocated(sys.getsizeof(0.5))
_INT = allocated(sys.getsizeof(1 << 20))
_VARIANTS = allocated(sys.getsizeof(_Variants.__new__(_Variants)))


def _slot(entry: Entry, expires: float, variant: str) -> _Slot:
    """A variant as L1 keeps it, counted once, now."""
    name = allocated(sys.getsizeof(variant)) if variant else 0
    return (entry, expires, None, entry.size() + _SLOT + _FLOAT + _INT + name)


def _key_cost(key: str, by_variant: dict[str, _Slot]) -> int:
    return (
        allocated(sys.getsizeof(key))
        + _VARIANTS
        + allocated(sys.getsizeof(by_variant))
        + _INT
        + _TLRU_ITEM
    )


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
    """L1. Bounded by ``max_entries`` (variants) and ``max_bytes`` (the memory it takes)."""

    name = "l1"

    def __init__(
        self,
        *,
        max_entries: int,
        max_bytes: int,
        clock: Clock,
        observer: CacheObserver | None = None,
        max_variants: int = MAX_VARIANTS,
    ) -> None:
        """``max_variants``: a key's most variants; a new one past them is not kept until one
        of the key's expires or the key is written (each variant a request header's value may
        select: unbounded, they would let one key take L1)."""
        if max_entries < 1 or max_bytes < 1 or max_variants < 1:
            raise ValueError("an L1 needs room for at least one entry, variant and byte")
        self._max_entries = max_entries
        self._max_variants = max_variants
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
        """Bytes of memory held: entries, renderings and bookkeeping (see the module's top)."""
        return int(self._store.currsize)

    # Every method freezes the store's clock (``with self._store.timer``) so that one call sees
    # one instant: an item cannot expire between the check and the use.

    async def get(self, key: str, variant: str = "") -> Stored | None:
        return self.peek(key, variant)

    def peek(self, key: str, variant: str = "") -> Stored | None:
        """``get`` without a wait: what an answer that must not yield (a hit) reads."""
        with self._store.timer as now:
            found = self._live(key, variant, now)
            if found is None:
                return None
            entry, expires, _, _ = found[1]
            return Stored(entry, expires - now)

    # ``builtins.bytes`` below: in this class ``bytes`` is the property.

    def peek_rendered(
        self, key: str, variant: str, render: Callable[[Entry], builtins.bytes]
    ) -> tuple[Entry, float, builtins.bytes] | None:
        """``peek`` for an answer that needs the entry in another form too: (entry, seconds
        left in L1, ``render(entry)``), None when ``peek`` finds nothing.

        ``render`` runs once per stored variant, on its first read here: its result is kept
        with the variant, dies with it, and counts against ``max_bytes`` (making room for it
        may evict other keys, least recently used first). It must be a pure function of the
        entry: a variant is rendered once, whoever asks, whatever ``render`` they pass.
        """
        with self._store.timer as now:
            found = self._live(key, variant, now)
            if found is None:
                return None
            variants, (entry, expires, rendered, _) = found
            if rendered is None:
                rendered = self._keep_rendering(variants, variant, render(entry))
            return entry, expires - now, rendered

    def _live(self, key: str, variant: str, now: float) -> tuple[_Variants, _Slot] | None:
        """The key's variants and the variant's slot, unless it is missing or past its expiry
        (then dropped); called with the store's clock frozen at ``now``."""
        try:
            # Indexing, not ``get``: get asks ``in`` first, which does the expiry check twice.
            variants = self._store[key]
        except KeyError:
            return None
        slot = variants.by_variant.get(variant)
        if slot is None:
            return None
        if slot[1] <= now:
            self._drop_variant(key, variants, variant)
            return None
        return variants, slot

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
        self.keep(key, variant, entry, ttl)

    def keep(self, key: str, variant: str, entry: Entry, ttl: float) -> None:
        if ttl <= 0:
            return
        with self._store.timer as now:
            held_now = self._store.get(key)
            if (
                held_now is not None
                and len(held_now.by_variant) >= self._max_variants
                and variant not in held_now.by_variant
            ):
                return  # no room for another variant of the key
            current = self._store.pop(key, None)
            by_variant = dict(current.by_variant) if current is not None else {}
            if current is not None:
                # A replacement is not an eviction: take the old item out quietly.
                self._count -= len(current.by_variant)
            by_variant[variant] = _slot(entry, now + ttl, variant)
            try:
                # The key object already held, if any: the expiry heap may still hold it too.
                held = key if current is None else current.key
                self._store[held] = _Variants(held, by_variant)
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
            self._store[variants.key] = _Variants(variants.key, rest)
            self._count += len(rest)

    def _keep_rendering(
        self, variants: _Variants, variant: str, rendered: builtins.bytes
    ) -> builtins.bytes:
        """Keep ``rendered`` with the variant, counted; called with the store's clock frozen,
        the variant fresh and its key the most recently used (``peek_rendered`` just read it)."""
        cost = allocated(sys.getsizeof(rendered))
        if variants.size + cost > self._store.maxsize:
            return rendered  # the key would no longer fit: rendered again on every read instead
        entry, expires, _, counted = variants.by_variant[variant]
        variants.by_variant[variant] = (entry, expires, rendered, counted + cost)
        variants.size += cost
        # Setting the same item again is how cachetools recounts its size: it evicts least
        # recently used keys until the total fits. Never this one (the most recently used, and
        # small enough alone), and neither its place in the LRU nor its expiry changes.
        self._store[variants.key] = variants
        return rendered
