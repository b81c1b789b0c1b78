"""The tiers a read goes through, and every change of what they hold; ``TieredCache`` adds the
read (``cache.tiered``).

    invalidate(key), put(key, variant, entry), drop(key)
      -> running lookups of the key are detached: they answer whoever already waits, store nothing
      -> until L2 has dropped the key, reads do not trust L2 for it (nor fill it)
      -> L1 drops the key (put: holds ``entry`` as its only variant)
      -> pending L2 fills of the key, and its previous L2 drop or put, are waited for
      -> L2 drops the key (put: replaces it in one step, unless L2 holds a newer version; a put
         another replica's newer write beat is dropped from L1 too)
      -> L2 down: the key is remembered, reads skip L2 for it and the delete is retried as soon
         as L2 answers, so an outage cannot resurrect a value a write replaced
    purge(keys)        -> as invalidate, announced to the other replicas in one message
    forget(keys), forget_prefix(prefix)
                       -> another replica changed them: L1 drops them, L2 already knows
    distrust_l1(), trust_l1()
                       -> coherence lost, or back (see below)

While coherence is lost a change another replica makes goes unheard here. L1 is emptied at
the loss (what it holds may outlive a change it will not hear of), and then:

    degraded_ttl > 0 (degraded mode) -> L1 still read and filled, but every entry kept lives at
                                        most degraded_ttl: a missed change is served that
                                        long at most, and the origin sees about one request
                                        per key per degraded_ttl, not every read
    degraded_ttl = 0                 -> L1 neither read nor filled
    coherence back                   -> L1 emptied once more, entries live their full TTL

That side of L2 (fills, writes in order, deletes remembered through an outage) is
``cache.l2``'s.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from cache.breaker import Breaker
from cache.clock import Clock
from cache.entry import Entry
from cache.errors import TierUnavailable
from cache.flights import Flights
from cache.l2 import Announce, SharedTier, Written
from cache.observer import CacheObserver, Invalidation, NullObserver
from cache.peek import HitPath
from cache.redis.lease import Leases
from cache.tier import LocalTier, Tier


class Tiers:
    """L1, L2 (as ``SharedTier``), the lookups running over them and the hit path's read; and
    every change of what the tiers hold (the module docstring)."""

    def __init__(
        self,
        l1: LocalTier,
        l2: Tier | None = None,
        *,
        clock: Clock,
        observer: CacheObserver | None = None,
        breaker: Breaker | None = None,
        trust_l1: bool = True,
        degraded_ttl: float = 0.0,
        leases: Leases | None = None,
        rand: Callable[[], float] = random.random,
    ) -> None:
        """``trust_l1=False``: coherence not subscribed yet, as after ``distrust_l1()`` until
        ``trust_l1()``; ``degraded_ttl``: how L1 serves meanwhile (the module docstring).
        ``rand`` draws early refreshes (XFetch), uniform in [0, 1)."""
        self._l1 = l1
        self._rand = rand
        self._l2 = l2
        self._clock = clock
        self._observer: CacheObserver = observer or NullObserver()
        self._breaker = breaker
        self._leases = leases
        self._shared = (
            SharedTier(
                l2, clock=clock, observer=self._observer, breaker=breaker, superseded=l1.delete
            )
            if l2 is not None
            else None
        )
        # Its epoch moves on with every change of what the tiers hold for some key (a write, a
        # purge, another replica's change, L1 emptied): a read started before stores nothing.
        self._flights = Flights()
        self._background: set[asyncio.Task[Any]] = set()
        self._degraded_ttl = degraded_ttl
        self._hit_path = HitPath(
            l1,
            self._shared,
            self._flights,
            clock=clock,
            observer=self._observer,
            rand=rand,
            l1_trusted=trust_l1,
        )
        # Whether this replica hears the others' changes (coherence), and whether L1 is read
        # and filled (heard, or degraded mode): set by _hear.
        self._hearing = self._l1_trusted = trust_l1
        self._hear(trust_l1)
        self._announce: Announce | None = None

    @property
    def l1(self) -> LocalTier:
        return self._l1

    @property
    def l2(self) -> Tier | None:
        return self._l2

    @property
    def hit_path(self) -> HitPath:
        """The read of ``proxy.fastpath``, which must not wait on another lookup."""
        return self._hit_path

    @property
    def leases(self) -> Leases | None:
        return self._leases

    @property
    def l2_healthy(self) -> bool:
        """False while L2's breaker is open (Redis failing): callers may skip Redis too."""
        return self._breaker is None or not self._breaker.is_open

    @property
    def pending_deletes(self) -> int:
        """Keys whose L2 copy must be dropped before L2 may answer for them again."""
        return self._shared.pending_deletes if self._shared is not None else 0

    @property
    def announce(self) -> Announce | None:
        """Tells the other replicas which keys this one changed (coherence), once L2 has
        them."""
        return self._announce

    @announce.setter
    def announce(self, announce: Announce | None) -> None:
        self._announce = announce
        if self._shared is not None:
            self._shared.announce = announce

    async def invalidate(self, key: str, source: Invalidation = Invalidation.WRITE) -> None:
        """Drop ``key`` (every variant) from both tiers; see the module docstring for the order."""
        self._observer.invalidated(source)
        await self._replace(key, None)

    async def drop(self, key: str) -> None:
        """Drop ``key`` as ``invalidate`` does, without counting an invalidation: what the
        tiers hold no longer stands for the origin's answer (a refresh found it gone, or not
        to be kept), and no write replaced it."""
        await self._replace(key, None)

    async def put(
        self,
        key: str,
        variant: str,
        entry: Entry,
        *,
        l1_ttl: float,
        l2_ttl: float,
        version: int | None = None,
        tags: Sequence[str] = (),
    ) -> None:
        """Make ``entry`` the key's value (a written one): every other variant is dropped.

        ``version`` (the write-behind sequence number) keeps L2 from taking an older write
        after a newer one made by another replica.
        """
        self._observer.invalidated(Invalidation.WRITE)
        await self._replace(key, Written(variant, entry, l1_ttl, l2_ttl, version, tags))

    # -- other replicas' changes (coherence) ----------------------------------------------------

    async def forget(self, keys: Sequence[str]) -> None:
        """Drop ``keys`` from L1 only: another replica changed them, and L2 already knows."""
        for key in keys:
            self._detach(key)
            await self._l1.delete(key)
            self._observer.invalidated(Invalidation.REMOTE)

    async def forget_prefix(self, prefix: str, source: Invalidation = Invalidation.REMOTE) -> int:
        """Drop every key starting with ``prefix`` from L1 only; returns how many."""
        self._flights.detach_prefix(prefix)
        self._hit_path.forget(prefix=prefix)
        dropped = await self._l1.delete_prefix(prefix)
        for _ in dropped:
            self._observer.invalidated(source)
        return len(dropped)

    async def distrust_l1(self) -> None:
        """Changes may go unheard from now on: empty L1, then serve it degraded or not at all
        (the module docstring). Once per loss: a retry that fails again keeps what degraded
        mode has kept since."""
        if self._hearing:
            self._hear(False)
            await self._empty_l1()

    async def trust_l1(self) -> None:
        """Changes are heard again: empty L1 (it may hold what an unheard change dropped) and
        let its entries live their full TTL."""
        await self._empty_l1()
        self._hear(True)

    def _hear(self, hearing: bool) -> None:
        degraded = not hearing and self._degraded_ttl > 0
        self._hearing = hearing
        self._l1_trusted = self._hit_path.l1_trusted = hearing or degraded
        self._hit_path.degraded = degraded
        self._l1.ttl_cap = self._degraded_ttl if degraded else math.inf

    @property
    def l1_trusted(self) -> bool:
        """L1 is read and filled: coherence heard, or degraded mode."""
        return self._l1_trusted

    @property
    def degraded(self) -> bool:
        """Coherence lost, L1 served with its entries' lives capped at ``degraded_ttl``."""
        return self._hit_path.degraded

    async def _empty_l1(self) -> None:
        # Lookups under way may have read what an unheard change replaced: they answer their
        # callers but store nothing.
        self._flights.detach_prefix("")
        self._hit_path.forget(prefix="")
        await self._l1.clear()

    def _detach(self, key: str) -> None:
        """Running lookups of ``key`` answer whoever waits for them, and store nothing."""
        self._flights.detach(key)
        self._hit_path.forget(key)

    async def _replace(self, key: str, new: Written | None, *, announce: bool = True) -> bool:
        """True when a tier held something for ``key`` (a drop) or the write was stored."""
        self._detach(key)
        # L2 first (a task of its own, see SharedTier.write): from now on L2 is not trusted for
        # the key until it has the write.
        drop = self._shared.write(key, new, announce=announce) if self._shared else None
        if new is None:
            held = await self._l1.delete(key)
        else:
            held = await self._l1.replace(key, new.variant, new.entry, new.l1_ttl)
        if drop is not None:
            held = bool(await asyncio.shield(drop)) or held
        return held

    async def purge(self, keys: Sequence[str]) -> int:
        """Drop ``keys`` from both tiers and every replica's L1 (announced together); returns
        how many were held here. Raises ``TierUnavailable`` when L2 could not drop them all
        (they are dropped as soon as it answers)."""
        held = 0
        for key in keys:
            self._observer.invalidated(Invalidation.ADMIN)
            held += await self._replace(key, None, announce=False)
        if self.announce is not None:
            await self.announce(keys)  # in messages of many keys each
        shared = self._shared
        undone = sum(1 for key in keys if shared is not None and shared.pending(key))
        if undone:
            raise TierUnavailable(
                "purge", f"{undone} of {len(keys)} keys not dropped from L2 yet (retried)"
            )
        return held

    async def aclose(self) -> None:
        """Wait for refreshes still running (bounded by their loader) and background L2 work
        (each call is bounded), then close both tiers."""
        running = list(self._flights.tasks())
        if running:
            await asyncio.wait(running)
        if self._shared is not None:
            await self._shared.settle()
        while self._background:
            await asyncio.wait(list(self._background))
        await self._l1.aclose()
        if self._l2 is not None:
            await self._l2.aclose()
        if self._leases is not None:
            await self._leases.aclose()

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task
