"""The hit path's read (``proxy.fastpath``): an answer that must not wait on another lookup.

    peek(key, variant, render, stale, l1_ttl)
      -> fresh in L1, not due for an early refresh --> (entry, render(entry)): an L1 hit
         (``render`` runs once per entry; L1 keeps what it made)
      -> in L1 but past its freshness or due for an early refresh, a lookup of the key under
         way, no L2, L2 not to be asked now --> None: ``TieredCache.get`` answers instead
      -> else --> an ``L2Read``: L2 is asked with the other reads of this round of the event
         loop, and ``then`` of the read is called with L2's fresh entry, or None

An L2 hit takes one future and three calls, each in the module that owns the step:

    the read's future (``cache.redis.reads``: one round trip for the reads of the round)
      -> ``L2Read.landed`` (here): the outcome told to the breaker (``SharedTier.outcome``),
         its freshness judged, counted as an L2 hit, kept in L1 for ``l1_ttl`` at most (at
         once, before the answer leaves: the client's next request finds it there)
      -> ``then``: ``Hits`` (``proxy.fastpath``) makes the answer's bytes and counts it
      -> ``FastPath`` writes them to the connection

A read that answers None counts nothing: what it found is kept (``take``) for the ``get``
that follows, which counts it and does not ask Redis again. A change of the key after the read
left (``Flights.epoch`` moved on) means it keeps nothing, in L1 or for ``get``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from cache.clock import Clock
from cache.entry import Entry
from cache.flights import Flights
from cache.l2 import SharedTier
from cache.observer import CacheObserver
from cache.stale import DUE, FRESH, Staleness, judge
from cache.tier import LocalTier, Stored

# A read the hit path made and did not answer with is kept this long (seconds) for the lookup
# that follows it, and at most this many: the lookup comes within a round of the event loop,
# or never (it joined another's, or L1 had the entry by then).
KEEP_READ = 1.0
MAX_KEPT = 10_000

Then = Callable[[Entry | None], None]


def _ignore(entry: Entry | None) -> None:
    """What an ``L2Read`` calls when its caller gave no ``then``."""


class L2Read:
    """One hit-path read of L2 under way: ``then`` is called with its answer, once."""

    __slots__ = ("epoch", "hit_path", "key", "l1_ttl", "stale", "then", "variant")

    def __init__(
        self, hit_path: HitPath, key: str, variant: str, l1_ttl: float, stale: Staleness
    ) -> None:
        self.hit_path = hit_path
        self.key = key
        self.variant = variant
        self.l1_ttl = l1_ttl
        self.stale = stale
        self.epoch = hit_path.flights.epoch
        self.then: Then = _ignore  # set by the caller before the loop runs on

    def landed(self, sent: asyncio.Future[Stored | None]) -> None:
        self.then(self.hit_path.landed(self, sent))


class HitPath:
    """The hit path's read over a tiered cache's L1, L2 and running lookups."""

    def __init__(
        self,
        l1: LocalTier,
        shared: SharedTier | None,
        flights: Flights,
        *,
        clock: Clock,
        observer: CacheObserver,
        rand: Callable[[], float],
        l1_trusted: bool,
    ) -> None:
        self._l1 = l1
        self._shared = shared
        self.flights = flights
        self._clock = clock
        self._observer = observer
        self._rand = rand
        self.l1_trusted = l1_trusted  # set by the tiered cache whenever it changes
        self.degraded = False  # coherence lost, L1 served in degraded mode (cache.changes)
        self._kept: dict[str, dict[str, tuple[float, Stored | None]]] = {}

    def peek(
        self,
        key: str,
        variant: str,
        render: Callable[[Entry], bytes],
        stale: Staleness,
        l1_ttl: float | None = None,
    ) -> tuple[Entry, bytes] | L2Read | None:
        """See the module docstring; ``l1_ttl`` None: L1 only."""
        if self.l1_trusted:
            held = self._l1.peek_rendered(key, variant, render)
            if held is not None:
                entry, _, rendered = held
                if judge(entry, self._clock.time(), stale.early_refresh, self._rand) != FRESH:
                    return None
                self._observer.lookup("l1", True)
                if self.degraded:
                    self._observer.degraded_read()
                return entry, rendered
        shared = self._shared
        if l1_ttl is None or shared is None or key in self.flights:
            return None
        sent = shared.read_soon(key, variant)
        if sent is None:
            return None
        read = L2Read(self, key, variant, l1_ttl, stale)
        sent.add_done_callback(read.landed)
        return read

    def landed(self, read: L2Read, sent: asyncio.Future[Stored | None]) -> Entry | None:
        """What ``read`` answers with, once L2 answered ``sent``."""
        key, variant, stale = read.key, read.variant, read.stale
        shared = self._shared
        assert shared is not None
        stored = shared.outcome(key, sent)
        fresh, _ = shared.fresh(stored, stale.keep)
        changed = read.epoch != self.flights.epoch  # the key may have been written meanwhile
        running = key in self.flights
        if (
            fresh is None
            or running
            or judge(fresh.entry, self._clock.time(), stale.early_refresh, self._rand) == DUE
        ):
            if not changed and not running:
                self._keep(key, variant, stored)
            return None
        if self.l1_trusted:
            self._observer.lookup("l1", False)
        self._observer.lookup("l2", True)
        if not changed and self.l1_trusted:
            # Kept in L1 before the answer leaves: the client's next request finds it there.
            # Not when anything changed since the read left (as a detached lookup stores
            # nothing).
            self._l1.keep(key, variant, fresh.entry, min(read.l1_ttl, fresh.ttl_left))
        return fresh.entry

    # -- kept reads ---------------------------------------------------------------------------

    def _keep(self, key: str, variant: str, stored: Stored | None) -> None:
        """Keep what a read found for the ``get`` of the same key and variant that follows
        (``KEEP_READ`` seconds at most); a change of the key (``forget``) drops it."""
        if len(self._kept) >= MAX_KEPT:
            self._kept.clear()  # never taken: their lookups went elsewhere; each is re-read
        self._kept.setdefault(key, {})[variant] = (self._clock.monotonic(), stored)

    def take(self, key: str, variant: str) -> tuple[bool, Stored | None]:
        """Whether a read of ``key`` and ``variant`` was kept, and what it found (its TTL
        counted down since); taken once."""
        if not self._kept:
            return False, None
        kept = self._kept.get(key)
        if kept is None:
            return False, None
        found = kept.pop(variant, None)
        if not kept:
            del self._kept[key]
        if found is None:
            return False, None
        took = self._clock.monotonic() - found[0]
        if took > KEEP_READ:
            return False, None
        stored = found[1]
        return True, None if stored is None else Stored(stored.entry, stored.ttl_left - took)

    def forget(self, key: str | None = None, *, prefix: str = "") -> None:
        """Drop the kept reads of ``key`` (None: of every key starting with ``prefix``)."""
        if key is not None:
            self._kept.pop(key, None)
        elif not prefix:
            self._kept.clear()
        else:
            for kept in [k for k in self._kept if k.startswith(prefix)]:
                del self._kept[kept]
