"""L1: the in-process tier, an S3-FIFO store (``cache.s3fifo``) bounded by entry count and by
bytes, with an expiry per item.

Each logical key holds its variants together, so dropping a key drops every variant in one step.
Expiry is per variant; the store's item of a key lives as long as its longest-lived variant, and
a variant that is past its own expiry reads as a miss and is removed when read.

``l1.max_bytes`` bounds the memory L1 really takes: each variant is counted, when stored, at what
its objects cost in this process (``Entry.size``, plus its slot, plus the rendering the proxy may
keep with it), and each key at its own objects plus the store's bookkeeping for it.
"""

from __future__ import annotations

import builtins
import math
import sys
from collections.abc import Callable, Sequence

from cache.clock import Clock
from cache.entry import Entry, allocated
from cache.observer import CacheObserver, Eviction, NullObserver
from cache.s3fifo import S3FIFO
from cache.tier import MAX_VARIANTS, Stored


class _Held:
    """One variant as L1 keeps it. A key's only variant (most keys have one) is the store's value
    itself: one object a key, besides the entry, for the collector to walk and for
    ``max_bytes`` to count."""

    __slots__ = ("cost", "entry", "expires", "key", "rendered", "variant")

    def __init__(self, entry: Entry, expires: float, key: str, variant: str) -> None:
        self.entry = entry
        self.expires = expires  # on the monotonic clock
        self.key = key  # the key object the store holds (see _Variants.key)
        self.variant = variant
        self.rendered: bytes | None = None  # what ``peek_rendered`` rendered of the entry
        name = allocated(sys.getsizeof(variant)) if variant else 0
        self.cost = entry.size() + _HELD + _FLOAT + _INT + name  # its bytes, counted once


class _Variants:
    """The variants of a key that has more than one, by variant name."""

    __slots__ = ("by_variant", "expires", "key", "size")

    def __init__(self, key: str, by_variant: dict[str, _Held]) -> None:
        # The key object the store holds: setting the item again with another (equal) string,
        # as a caller's lookup key is, would keep both alive (the store's queues hold it).
        self.key = key
        self.by_variant = by_variant
        self.expires = max(held.expires for held in by_variant.values())
        self.size = _key_cost(key, by_variant) + sum(held.cost for held in by_variant.values())


# A key in the store: its only variant, or its variants.
_Value = _Held | _Variants


def _value(key: str, by_variant: dict[str, _Held]) -> _Value:
    if len(by_variant) == 1:
        (held,) = by_variant.values()
        return held
    return _Variants(key, by_variant)


def _variants(value: _Value) -> dict[str, _Held]:
    """The key's variants by name (the dict a _Variants holds: not to be changed)."""
    return {value.variant: value} if isinstance(value, _Held) else value.by_variant


# What L1 spends besides the entries, in bytes. Object sizes come from sys.getsizeof on this
# interpreter, rounded as the allocator rounds them (``allocated``):
#   per variant: its _Held, its expiry float, its cost int, its name (unless "", shared);
#   per key: the key string, the size int the store keeps, and _STORE_ITEM for the store's own
#   bookkeeping (cache/s3fifo.py), which cannot be asked: its node, a slot in its dict and in a
#   queue, its item in the expiry heap (a tuple), the dead places and items that replaced and
#   evicted keys leave until the queues pass them or are compacted and the heap is rebuilt, and
#   its share of ghost: as many keys as the store holds, each a slot of an ordered dict and a
#   hash; and for a key of several variants, its _Variants, their dict and its size int.
# Measured with tracemalloc on CPython 3.11 (64 bit), fresh key strings, L1 full and evicting
# (4 MiB and 32 MiB, 100 B and 1 KB entries, from 1,370 to 21,200 keys): 220-400 bytes a key,
# 280 on average (the store's before was 550, with four dicts and a set where its node is now;
# the old cachetools TLRU's 430). 300 is that with allocator rounding: a full L1 is what runs
# for hours.
_STORE_ITEM = 300
_HELD = allocated(sys.getsizeof(_Held.__new__(_Held)))
_FLOAT = allocated(sys.getsizeof(0.5))
_INT = allocated(sys.getsizeof(1 << 20))
_VARIANTS = allocated(sys.getsizeof(_Variants.__new__(_Variants)))


def _key_cost(key: str, by_variant: dict[str, _Held] | None = None) -> int:
    """A key's bytes besides its variants'; ``by_variant``: a key of several."""
    cost = allocated(sys.getsizeof(key)) + _INT + _STORE_ITEM
    if by_variant is not None:
        cost += _VARIANTS + allocated(sys.getsizeof(by_variant)) + _INT
    return cost


def _time_to_use(value: _Value) -> float:
    return value.expires


def _size_of(value: _Value) -> int:
    if isinstance(value, _Held):
        return value.cost + _key_cost(value.key)
    return value.size


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
        self._now = clock.monotonic
        self._store: S3FIFO[str, _Value] = S3FIFO(
            max_bytes, _time_to_use, clock.monotonic, _size_of, self._dropped, max_entries
        )
        self._count = 0
        self.ttl_cap = math.inf  # see LocalTier.ttl_cap

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

    # Every method that changes the store freezes its clock (``with self._store.timer``) so that
    # one call sees one instant: an item cannot expire between the check and the use. A read
    # reads the clock once and gives that time to the store.

    async def get(self, key: str, variant: str = "") -> Stored | None:
        return self.peek(key, variant)

    def peek(self, key: str, variant: str = "") -> Stored | None:
        """``get`` without a wait: what an answer that must not yield (a hit) reads."""
        now = self._now()
        found = self._live(key, variant, now)
        if found is None:
            return None
        held = found[1]
        return Stored(held.entry, held.expires - now)

    # ``builtins.bytes`` below: in this class ``bytes`` is the property.

    def peek_rendered(
        self, key: str, variant: str, render: Callable[[Entry], builtins.bytes]
    ) -> tuple[Entry, float, builtins.bytes] | None:
        """``peek`` for an answer that needs the entry in another form too: (entry, seconds
        left in L1, ``render(entry)``), None when ``peek`` finds nothing.

        ``render`` runs once per stored variant, on its first read here: its result is kept
        with the variant, dies with it, and counts against ``max_bytes`` (making room for it
        may evict other keys, as the store's policy picks them). It must be a pure function of the
        entry: a variant is rendered once, whoever asks, whatever ``render`` they pass.
        """
        now = self._now()
        found = self._live(key, variant, now)
        if found is None:
            return None
        value, held = found
        rendered = held.rendered
        if rendered is None:
            rendered = self._keep_rendering(value, held, render(held.entry))
        return held.entry, held.expires - now, rendered

    def _live(self, key: str, variant: str, now: float) -> tuple[_Value, _Held] | None:
        """The key's value in the store and the variant, unless it is missing or past its
        expiry (then dropped)."""
        value = self._store.read(key, now)
        if value is None:
            return None
        if isinstance(value, _Held):
            held: _Held | None = value if value.variant == variant else None
        else:
            held = value.by_variant.get(variant)
        if held is None:
            return None
        if held.expires <= now:
            with self._store.timer:
                self._drop_variant(key, value, variant)
            return None
        return value, held

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
        ttl = min(ttl, self.ttl_cap)
        if ttl <= 0:
            return
        with self._store.timer as now:
            current = self._store.held(key)
            if current is not None and current.expires <= now:
                # Every variant past its expiry: dropped as expired, and the key stored anew
                # (the store would drop it while taking the new one, mid-store).
                self._store.pop(key)
                self._dropped(current, Eviction.EXPIRED)
                current = None
            before = {} if current is None else _variants(current)
            if len(before) >= self._max_variants and variant not in before:
                return  # no room for another variant of the key
            # The key object already held, if any: the store's queues hold it too. Stored in
            # place: the key keeps its place and its reads.
            held = key if current is None else current.key
            by_variant = dict(before)
            by_variant[variant] = _Held(entry, now + ttl, held, variant)
            try:
                self._store[held] = _value(held, by_variant)
            except ValueError:
                # Larger than max_bytes on its own: L1 cannot hold it, and the old variants must
                # not outlive the write that replaced them.
                if current is not None:
                    self._store.pop(key)
                    self._dropped(current, Eviction.SIZE)
                return
            self._count += len(by_variant) - len(before)
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
                variants = self._store.pop(key)
                if variants is not None:
                    self._dropped(variants, Eviction.INVALIDATED)
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

    def _dropped(self, value: _Value, reason: Eviction) -> None:
        count = 1 if isinstance(value, _Held) else len(value.by_variant)
        self._count -= count
        self._observer.evicted(reason, count)

    def _drop_variant(self, key: str, value: _Value, variant: str) -> None:
        self._store.pop(key)
        by_variant = _variants(value)
        self._count -= len(by_variant)
        self._observer.evicted(Eviction.EXPIRED, 1)
        rest = {name: held for name, held in by_variant.items() if name != variant}
        if rest:
            self._store[value.key] = _value(value.key, rest)
            self._count += len(rest)

    def _keep_rendering(
        self, value: _Value, held: _Held, rendered: builtins.bytes
    ) -> builtins.bytes:
        """Keep ``rendered`` with the variant ``held`` of the key whose value is ``value``,
        counted; the variant was fresh and its key the most recently used (``peek_rendered``
        just read it)."""
        cost = allocated(sys.getsizeof(rendered))
        with self._store.timer as now:
            if held.expires <= now or _size_of(value) + cost > self._store.maxsize:
                # It expired since the read (it is dropped at the next), or the key would no
                # longer fit: rendered again on every read instead.
                return rendered
            held.rendered = rendered
            held.cost += cost
            if isinstance(value, _Variants):
                value.size += cost
            # Setting the same item again is how the store recounts its size: it evicts other
            # keys until the total fits, never this one, and neither its place nor its expiry
            # changes.
            self._store[value.key] = value
        return rendered
