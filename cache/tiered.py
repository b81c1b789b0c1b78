"""The tiered read: L1, then L2, then the loader, with one lookup per key at a time.

    get(key, variant)
      -> fresh in L1? --yes--> HIT-L1 (now and then refreshed early in the background: XFetch)
      -> no: a lookup of this key and variant already running? --yes--> wait for it (coalesced)
      -> no: start one (a task of its own, so a caller that goes away does not cancel it)
           -> in L2, fresh, breaker closed? --yes--> fill L1 with the time L2 has left --> HIT-L2
           -> no, or L2 failed (a counted miss) --> loader() --> L1 now, L2 in the background

    Past its freshness an entry the tiers still keep (``cache.stale``) answers instead of a miss:
    within stale-while-revalidate at once (STALE) while the lookup goes on as a refresh; within
    stale-if-error when the loader fails or reports a failed answer (STALE).

    peek(key, variant) (the hit path: no waiting on another lookup)
      -> fresh in L1? --yes--> HIT-L1, at once
      -> not in L1, no lookup of it running: L2's fresh entry as a future (sent with the other
         reads of this round of the event loop); what it does not answer with is kept for the
         ``get`` that follows

    invalidate(key), put(key, variant, entry)
      -> running lookups of the key are detached: they answer whoever already waits, store nothing
      -> until L2 has dropped the key, reads do not trust L2 for it (nor fill it)
      -> L1 drops the key (put: holds ``entry`` as its only variant)
      -> pending L2 fills of the key, and its previous L2 drop or put, are waited for
      -> L2 drops the key (put: replaces it in one step, unless L2 holds a newer version)
      -> L2 down: the key is remembered, reads skip L2 for it and the delete is retried as soon
         as L2 answers, so an outage cannot resurrect a value a write replaced

An L2 failure is never the caller's problem: it is counted, logged once per change of state, fed
to the breaker, and the read carries on as a miss. That side of L2 (reads, fills, writes in
order, deletes remembered through an outage) is ``cache.l2``'s.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import random
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from functools import partial
from typing import Any

from cache.breaker import Breaker
from cache.clock import Clock
from cache.entry import Entry
from cache.errors import LoadDeclined, TierUnavailable
from cache.l2 import Announce, SharedTier, Written
from cache.observer import CacheObserver, Invalidation, NullObserver
from cache.redis.lease import Leases
from cache.stale import NEVER, Staleness, refresh_early
from cache.tier import LocalTier, Stored, Tier

logger = logging.getLogger("cachecar.cache")


class Source(enum.Enum):
    L1 = "l1"  # the in-process tier had it
    L2 = "l2"  # Redis had it (and L1 has it now)
    LOADER = "loader"  # nobody had it; the loader (the origin) produced it
    STALE = "stale"  # past its freshness, served while it is refreshed or the loader failed


# Lookup.detail of a STALE answer: why a stale entry answered.
REVALIDATING = "stale-while-revalidate"
ORIGIN_FAILED = "stale-if-error"


@dataclasses.dataclass(frozen=True, slots=True)
class Loaded:
    """What a loader returns: the entry and how long each tier may keep it (0: not at all)."""

    entry: Entry
    l1_ttl: float = 0.0
    l2_ttl: float = 0.0
    shared: bool = True  # may be handed to callers waiting for the same key and variant
    detail: str = ""  # why it is not stored, for the caller to report
    tags: tuple[str, ...] = ()  # what L2 indexes the key under, for purge by tag
    failed: bool = False  # a failed answer (a 5xx): a stale entry may answer instead
    stale_for: float = 0.0  # how long past its freshness the tiers keep it, to serve it stale


@dataclasses.dataclass(frozen=True, slots=True)
class Lookup:
    """The answer to ``get``."""

    entry: Entry
    source: Source
    stored: bool = False  # LOADER only: a tier kept the loaded entry
    coalesced: bool = False  # this caller waited for another caller's lookup
    detail: str = ""


Loader = Callable[[], Awaitable[Loaded]]
Task = asyncio.Task[None]


class _Flight:
    """One running lookup of a key and variant.

    It may answer before it ends (``early``): with a stale entry while it refreshes it, or with
    a hit it goes on to refresh early. Callers take whichever comes first.
    """

    __slots__ = ("detached", "early", "shared", "task")

    def __init__(self) -> None:
        self.task: asyncio.Task[Lookup] | None = None
        self.early: asyncio.Future[Lookup] = asyncio.get_running_loop().create_future()
        self.detached = False  # detached by a change of its key: answer, but store nothing
        self.shared = True

    def answer_early(self, lookup: Lookup) -> None:
        if not self.early.done():
            self.early.set_result(lookup)

    @property
    def answered(self) -> bool:
        return self.early.done()

    async def answer(self, usable: Callable[[Lookup], bool]) -> Lookup:
        """The early answer while it is ``usable`` (still fresh, or within its stale window),
        else the lookup's; the caller leaving cancels neither."""
        task = self.task
        assert task is not None
        if not self.early.done():
            await asyncio.wait((task, self.early), return_when=asyncio.FIRST_COMPLETED)
        if self.early.done() and usable(self.early.result()):
            return self.early.result()
        if not task.done():
            await asyncio.wait((task,))
        return task.result()


class TieredCache:
    def __init__(
        self,
        l1: LocalTier,
        l2: Tier | None = None,
        *,
        clock: Clock,
        observer: CacheObserver | None = None,
        breaker: Breaker | None = None,
        trust_l1: bool = True,
        leases: Leases | None = None,
        rand: Callable[[], float] = random.random,
    ) -> None:
        """``trust_l1=False``: L1 unused until ``trust_l1()`` (coherence not subscribed yet).
        ``rand`` draws early refreshes (XFetch), uniform in [0, 1)."""
        self._l1 = l1
        self._rand = rand
        self._l2 = l2
        self._clock = clock
        self._observer: CacheObserver = observer or NullObserver()
        self._breaker = breaker
        self._leases = leases
        self._shared = (
            SharedTier(l2, l1=l1, clock=clock, observer=self._observer, breaker=breaker)
            if l2 is not None
            else None
        )
        self._flights: dict[str, dict[str, _Flight]] = {}
        self._background: set[asyncio.Task[Any]] = set()
        # False while this replica may be missing other replicas' changes (coherence): L1 is
        # then neither read nor filled.
        self._l1_trusted = trust_l1
        self._announce: Announce | None = None
        # Moves on with every change of what the tiers hold for some key (a write, a purge,
        # another replica's change, L1 emptied): a read started before must store nothing.
        self._epoch = 0

    @property
    def l1(self) -> LocalTier:
        return self._l1

    @property
    def l2(self) -> Tier | None:
        return self._l2

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

    async def get(
        self,
        key: str,
        variant: str,
        *,
        l1_ttl: float,
        loader: Loader,
        lease: bool = False,
        stale: Staleness = NEVER,
    ) -> Lookup:
        """The entry for ``key``/``variant`` from the first tier that has it, else ``loader``.

        ``l1_ttl`` caps how long an entry found in L2 is kept in L1; ``stale`` says how entries
        past their freshness may answer. Errors raised by the loader reach every caller waiting
        for that lookup (unless a stale entry answers instead); tier errors never do.
        """
        candidate: Entry | None = None  # past its freshness, still kept: may answer instead
        if self._l1_trusted:
            stored = await self._l1.get(key, variant)
            if stored is not None:
                entry = stored.entry
                time_left = entry.expires_at() - self._clock.time()
                if time_left > 0:
                    self._observer.lookup("l1", True)
                    hit = Lookup(entry, Source.L1)
                    if stale.early_refresh and refresh_early(
                        time_left, entry.fetch_seconds, stale.early_refresh, self._rand
                    ):
                        self._start(key, variant, l1_ttl, loader, lease, stale, hit, None)
                    return hit
                candidate = entry
            self._observer.lookup("l1", False)

        flights = self._flights.get(key)
        flight = flights.get(variant) if flights is not None else None
        if flight is not None and flight.task is not None:
            if candidate is not None and stale.revalidates(candidate, self._clock.time()):
                return Lookup(candidate, Source.STALE, detail=REVALIDATING)  # being refreshed
            result = await flight.answer(self._usable(stale))
            if not flight.shared:
                # The answer was for the caller that asked first alone (private, Set-Cookie):
                # this caller gets its own.
                loaded = await loader()
                return Lookup(loaded.entry, Source.LOADER, detail=loaded.detail)
            return dataclasses.replace(result, coalesced=True)

        flight = self._start(key, variant, l1_ttl, loader, lease, stale, None, candidate)
        return await flight.answer(self._usable(stale))

    def peek(
        self,
        key: str,
        variant: str,
        render: Callable[[Entry], bytes],
        stale: Staleness = NEVER,
        *,
        l1_ttl: float | None = None,
    ) -> tuple[Entry, bytes] | asyncio.Future[Entry | None] | None:
        """For an answer that must not wait on ``get`` (``proxy.fastpath``): a fresh L1 entry
        with ``render(entry)`` (made once per entry and kept in L1 with it), counted as an L1
        hit. Not in L1 and ``l1_ttl`` given (the route's): L2's fresh entry, as a future,
        counted as an L2 hit (and kept in L1 for ``l1_ttl`` at most) when it answers with one.

        None, and nothing counted, when ``get`` must run instead: in L1 but not fresh or due
        for an early refresh (which ``get`` starts), no L2, a lookup of the key under way
        (``get`` joins it), L2 not to be asked now. A future answering None (L2 has no fresh
        entry, failed, or it is due for an early refresh) counts nothing either: its read is
        kept for ``get``, which counts it and does not ask Redis again."""
        if self._l1_trusted:
            held = self._l1.peek_rendered(key, variant, render)
            if held is not None:
                entry, _, rendered = held
                time_left = entry.stored_at + entry.ttl - self._clock.time()
                if time_left <= 0:
                    return None
                beta = stale.early_refresh
                if beta and refresh_early(time_left, entry.fetch_seconds, beta, self._rand):
                    return None
                self._observer.lookup("l1", True)
                return entry, rendered
        shared = self._shared
        if l1_ttl is None or shared is None or key in self._flights:
            return None
        read = shared.read_soon(key, variant)
        if read is None:
            return None
        found: asyncio.Future[Entry | None] = asyncio.get_running_loop().create_future()
        read.add_done_callback(
            partial(self._peeked, key, variant, l1_ttl, stale, self._epoch, found)
        )
        return found

    def _peeked(
        self,
        key: str,
        variant: str,
        l1_ttl: float,
        stale: Staleness,
        epoch: int,
        found: asyncio.Future[Entry | None],
        read: asyncio.Future[Stored | None],
    ) -> None:
        shared = self._shared
        assert shared is not None
        stored = read.result()
        fresh, _ = shared.fresh(stored, stale.keep)
        changed = epoch != self._epoch  # the key may have been written since the read left
        if fresh is None or key in self._flights or self._refreshes_early(fresh.entry, stale):
            if not changed and key not in self._flights:
                shared.keep(key, variant, stored)
            if not found.done():
                found.set_result(None)
            return
        if self._l1_trusted:
            self._observer.lookup("l1", False)
        self._observer.lookup("l2", True)
        if not changed and self._l1_trusted and l1_ttl > 0:
            ttl = min(l1_ttl, fresh.ttl_left)
            self._spawn(self._promote(key, variant, fresh.entry, ttl, epoch))
        if not found.done():
            found.set_result(fresh.entry)

    async def _promote(self, key: str, variant: str, entry: Entry, ttl: float, epoch: int) -> None:
        """Keep an entry the hit path found in L2 in L1, unless anything changed since it was
        read (as a lookup detached by a write stores nothing)."""
        if epoch == self._epoch and key not in self._flights and self._l1_trusted:
            await self._l1.set(key, variant, entry, ttl)

    def _start(
        self,
        key: str,
        variant: str,
        l1_ttl: float,
        loader: Loader,
        lease: bool,
        stale: Staleness,
        early: Lookup | None,
        candidate: Entry | None,
    ) -> _Flight:
        """A lookup of its own (none runs for ``key``/``variant``); ``early``: what it has
        already answered, a hit it is to refresh (no-op when a lookup runs already)."""
        flights = self._flights.get(key)
        if flights is None:
            flights = self._flights[key] = {}
        elif variant in flights:
            return flights[variant]
        flight = _Flight()
        flights[variant] = flight
        if early is not None:
            flight.answer_early(early)
        task = asyncio.create_task(
            self._resolve(key, variant, l1_ttl, loader, flight, lease, stale, candidate)
        )
        flight.task = task
        task.add_done_callback(partial(self._landed, key, variant, flight))
        return flight

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
        for key in [key for key in self._flights if key.startswith(prefix)]:
            self._detach(key)
        self._epoch += 1
        if self._shared is not None:
            self._shared.forget(prefix=prefix)
        dropped = await self._l1.delete_prefix(prefix)
        for _ in dropped:
            self._observer.invalidated(source)
        return len(dropped)

    async def distrust_l1(self) -> None:
        """Stop using L1 (changes may go unheard from now on) and empty it."""
        if self._l1_trusted:
            self._l1_trusted = False
            await self._empty_l1()

    async def trust_l1(self) -> None:
        """Use L1 again, emptied: it may hold what an unheard change dropped."""
        await self._empty_l1()
        self._l1_trusted = True

    @property
    def l1_trusted(self) -> bool:
        return self._l1_trusted

    async def _empty_l1(self) -> None:
        # Lookups under way may have read what an unheard change replaced: they answer their
        # callers but store nothing.
        for key in list(self._flights):
            self._detach(key)
        self._epoch += 1
        if self._shared is not None:
            self._shared.forget(prefix="")
        await self._l1.clear()

    def _detach(self, key: str) -> None:
        """Running lookups of ``key`` answer whoever waits for them, and store nothing."""
        self._epoch += 1
        if self._shared is not None:
            self._shared.forget(key)
        flights = self._flights.pop(key, None)
        if flights is not None:
            for flight in flights.values():
                flight.detached = True

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
        running = [f.task for fs in self._flights.values() for f in fs.values() if f.task]
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

    # -- the lookup ----------------------------------------------------------------------------

    async def _resolve(
        self,
        key: str,
        variant: str,
        l1_ttl: float,
        loader: Loader,
        flight: _Flight,
        lease: bool,
        stale: Staleness,
        candidate: Entry | None,
    ) -> Lookup:
        """Find or load the entry. A flight that answered early (a hit to refresh) goes on to
        the loader unless L2 holds something fresher; a stale candidate answers at once within
        stale-while-revalidate, and when the loader fails within stale-if-error."""
        if candidate is not None and stale.revalidates(candidate, self._clock.time()):
            flight.answer_early(Lookup(candidate, Source.STALE, detail=REVALIDATING))
        refreshing = flight.early.result().entry if flight.answered else None
        shared = self._shared
        stored, old = await shared.get(key, variant, stale.keep) if shared else (None, None)
        if stored is not None and (
            refreshing is None or stored.entry.expires_at() > refreshing.expires_at()
        ):
            if not flight.detached and self._l1_trusted:
                await self._l1.set(key, variant, stored.entry, min(l1_ttl, stored.ttl_left))
            hit = Lookup(stored.entry, Source.L2)
            if flight.answered or not self._refreshes_early(stored.entry, stale):
                return hit
            flight.answer_early(hit)  # and go on to refresh it
            refreshing = stored.entry
        if old is not None and (candidate is None or old.expires_at() > candidate.expires_at()):
            candidate = old
        if candidate is not None and stale.revalidates(candidate, self._clock.time()):
            flight.answer_early(Lookup(candidate, Source.STALE, detail=REVALIDATING))

        token = ""  # the lease this lookup holds, if any ("": none)
        if lease:
            found = await self._lease_or_fill(key, variant)
            if isinstance(found, Stored):
                if not flight.detached and self._l1_trusted:
                    await self._l1.set(key, variant, found.entry, min(l1_ttl, found.ttl_left))
                return Lookup(found.entry, Source.L2, coalesced=True)
            token = found
        try:
            fetched_at = self._clock.time()
            started = self._clock.monotonic()
            try:
                loaded = await loader()
            except LoadDeclined as exc:
                if not flight.answered:
                    raise  # for the callers to handle (an answer too large: relayed)
                # A refresh whose answer is not for the cache: nobody takes it, and what the
                # tiers hold no longer stands for the origin's answer.
                exc.discard()
                await self.drop(key)
                return flight.early.result()
            except Exception as exc:
                fallback = self._instead_of_failure(flight, stale, candidate)
                if fallback is None:
                    raise
                logger.debug("loading %r failed (%s); a stale entry answers", key, exc)
                return fallback
            if loaded.failed:
                fallback = self._instead_of_failure(flight, stale, candidate)
                if fallback is not None:
                    return fallback
            flight.shared = loaded.shared
            if flight.detached:
                return Lookup(loaded.entry, Source.LOADER, detail=loaded.detail or "invalidated")
            if loaded.l1_ttl <= 0 and loaded.l2_ttl <= 0 and (candidate or refreshing):
                # The origin's answer now is one not to keep (a 404, private, no-store): the
                # entry the tiers hold must not keep answering for it, stale or fresh.
                await self.drop(key)
            took = self._clock.monotonic() - started
            if took > 0 and (loaded.l1_ttl > 0 or loaded.l2_ttl > 0):
                loaded = dataclasses.replace(
                    loaded, entry=dataclasses.replace(loaded.entry, fetch_seconds=took)
                )
            now = self._clock.time()
            l1_keep = _keep(loaded.l1_ttl, loaded, now)
            if l1_keep > 0 and self._l1_trusted:
                await self._l1.set(key, variant, loaded.entry, l1_keep)
            stored_l2 = loaded.l2_ttl > 0 and shared is not None
            if shared is not None and stored_l2:
                # The lease is released once the fill is in L2, where the waiters look.
                release = None
                if token and self._leases is not None:
                    release = partial(self._leases.release, key, variant, token)
                shared.fill(
                    key,
                    variant,
                    loaded.entry,
                    _keep(loaded.l2_ttl, loaded, now),
                    fetched_at=fetched_at,
                    tags=loaded.tags,
                    wanted=lambda: not flight.detached,
                    then=release,
                )
                token = ""
            return Lookup(
                loaded.entry,
                Source.LOADER,
                stored=loaded.l1_ttl > 0 or stored_l2,
                detail=loaded.detail,
            )
        finally:
            if token and self._leases is not None:
                self._spawn(self._leases.release(key, variant, token))

    def _usable(self, stale: Staleness) -> Callable[[Lookup], bool]:
        """Whether an early answer may still be given: a hit while fresh, a stale entry
        within its window."""

        def usable(lookup: Lookup) -> bool:
            now = self._clock.time()
            if lookup.source is not Source.STALE:
                return lookup.entry.expires_at() > now
            if lookup.detail == REVALIDATING:
                return stale.revalidates(lookup.entry, now)
            return stale.covers_error(lookup.entry, now)

        return usable

    def _refreshes_early(self, entry: Entry, stale: Staleness) -> bool:
        if not stale.early_refresh:
            return False
        time_left = entry.expires_at() - self._clock.time()
        return refresh_early(time_left, entry.fetch_seconds, stale.early_refresh, self._rand)

    def _instead_of_failure(
        self, flight: _Flight, stale: Staleness, candidate: Entry | None
    ) -> Lookup | None:
        """What answers when the loader failed: the early answer while it is usable (a refresh
        failed; its callers have their answer), a stale entry within stale-if-error, or
        nothing."""
        if flight.answered and self._usable(stale)(flight.early.result()):
            return flight.early.result()
        if candidate is not None and stale.covers_error(candidate, self._clock.time()):
            return Lookup(candidate, Source.STALE, detail=ORIGIN_FAILED)
        return None

    async def _lease_or_fill(self, key: str, variant: str) -> Stored | str:
        """Another replica's fetch of the key, waited for (its entry, from L2); or the lease
        token this one fetches under ("" when there is no lease to be had)."""
        shared, leases = self._shared, self._leases
        # The leases ask the shared breaker themselves; asking it here too would take the
        # half-open probe from them.
        if shared is None or leases is None or not shared.trusted(key) or not self.l2_healthy:
            return ""
        token = await leases.acquire(key, variant)
        if token is not None:
            return token
        found = await leases.wait_for_fill(key, variant, partial(self._fresh_in_l2, key, variant))
        if found is not None and found.entry.expires_at() > self._clock.time():
            return found
        return ""  # the winner stored nothing, failed or died: fetch without a lease

    async def _fresh_in_l2(self, key: str, variant: str) -> Stored | None:
        """L2's entry while it is fresh: a stale one kept for stale serving is no fill."""
        assert self._l2 is not None
        stored = await self._l2.get(key, variant)
        if stored is None or stored.entry.expires_at() <= self._clock.time():
            return None
        return stored

    def _landed(self, key: str, variant: str, flight: _Flight, task: asyncio.Task[Lookup]) -> None:
        flights = self._flights.get(key)
        if flights is not None and flights.get(variant) is flight:
            del flights[variant]
            if not flights:
                del self._flights[key]
        if not task.cancelled():
            # Retrieved here so an error nobody waited for (every caller left) is not reported
            # as "never retrieved"; the callers that did wait got it through shield().
            task.exception()

    # -- L2, bounded and breaker-guarded --------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task


def _keep(ttl: float, loaded: Loaded, now: float) -> float:
    """How long a tier whose TTL is ``ttl`` keeps a loaded entry: past its freshness by
    ``stale_for`` when the tier keeps it to its end, else ``ttl``."""
    if ttl <= 0 or not loaded.stale_for:
        return ttl
    fresh_left = loaded.entry.expires_at() - now
    return ttl + loaded.stale_for if ttl >= fresh_left - _SLACK else ttl


_SLACK = 0.001  # seconds: the tier TTL and the freshness are computed apart
