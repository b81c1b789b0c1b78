"""The tiered read: L1, then L2, then the loader, with one lookup per key at a time.

    get(key, variant)
      -> fresh in L1? --yes--> HIT-L1 (now and then refreshed early in the background: XFetch)
      -> no: a lookup of this key and variant already running? --yes--> wait for it (coalesced)
      -> no: start one (a task of its own, so a caller that goes away does not cancel it)
           -> in L2, fresh, breaker closed? --yes--> fill L1 with the time L2 has left --> HIT-L2
           -> no, or L2 failed (a counted miss) --> loader() --> L1 now, L2 in the background
              (revalidate(previous) instead, when given and the tiers hold an entry of the
              key past its freshness or due for a refresh: the origin may confirm it)

    Past its freshness an entry the tiers still keep (``cache.stale``) answers instead of a miss:
    within stale-while-revalidate at once (STALE) while the lookup goes on as a refresh; within
    stale-if-error when the loader fails or reports a failed answer (STALE).

    hit_path.peek(key, variant) (no waiting on another lookup): ``cache.peek``

    invalidate(key), put(key, variant, entry), ... : ``cache.changes``, the base of the class

An L2 failure is never the caller's problem: it is counted, logged once per change of state, fed
to the breaker, and the read carries on as a miss. That side of L2 (reads, fills, writes in
order, deletes remembered through an outage) is ``cache.l2``'s; the running lookups are
``cache.flights``'; what a read answers and a loader returns, ``cache.lookup``'s.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from functools import partial

from cache.changes import Tiers
from cache.entry import Entry
from cache.errors import LoadDeclined
from cache.flights import Flight
from cache.l2 import Read
from cache.lookup import (
    ORIGIN_FAILED,
    REVALIDATING,
    Loaded,
    Loader,
    Lookup,
    Revalidator,
    Source,
)
from cache.stale import DUE, EXPIRED, NEVER, Staleness, judge
from cache.tier import Stored

logger = logging.getLogger("cachecar.cache")


class TieredCache(Tiers):
    """The tiered read (the module docstring) over ``Tiers``."""

    async def get(
        self,
        key: str,
        variant: str,
        *,
        l1_ttl: float,
        loader: Loader,
        lease: bool = False,
        stale: Staleness = NEVER,
        revalidate: Revalidator | None = None,
    ) -> Lookup:
        """The entry for ``key``/``variant`` from the first tier that has it, else ``loader``.

        ``l1_ttl`` caps how long an entry found in L2 is kept in L1; ``stale`` says how entries
        past their freshness may answer; ``revalidate`` loads instead of ``loader`` when the
        tiers hold an entry of the key to refresh. Errors raised by the loader reach every
        caller waiting for that lookup (unless a stale entry answers instead); tier errors
        never do.
        """
        candidate: Entry | None = None  # past its freshness, still kept: may answer instead
        if self._l1_trusted:
            stored = await self._l1.get(key, variant)
            if stored is not None:
                entry = stored.entry
                verdict = judge(entry, self._clock.time(), stale.early_refresh, self._rand)
                if verdict != EXPIRED:
                    self._observer.lookup("l1", True)
                    if self._hit_path.degraded:
                        self._observer.degraded_read()
                    hit = Lookup(entry, Source.L1)
                    if verdict == DUE:
                        self._start(key, variant, l1_ttl, (loader, revalidate), lease, stale, hit)
                    return hit
                candidate = entry
            self._observer.lookup("l1", False)

        flight = self._flights.get(key, variant)
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

        flight = self._start(
            key, variant, l1_ttl, (loader, revalidate), lease, stale, None, candidate
        )
        return await flight.answer(self._usable(stale))

    def _start(
        self,
        key: str,
        variant: str,
        l1_ttl: float,
        loaders: tuple[Loader, Revalidator | None],
        lease: bool,
        stale: Staleness,
        early: Lookup | None,
        candidate: Entry | None = None,
    ) -> Flight:
        """A lookup of its own (none runs for ``key``/``variant``); ``early``: what it has
        already answered, a hit it is to refresh (no-op when a lookup runs already)."""
        run = partial(
            self._resolve,
            key,
            variant,
            l1_ttl,
            loaders,
            lease=lease,
            stale=stale,
            candidate=candidate,
        )
        return self._flights.start(key, variant, run, early)

    # -- the lookup ----------------------------------------------------------------------------

    async def _resolve(
        self,
        key: str,
        variant: str,
        l1_ttl: float,
        loaders: tuple[Loader, Revalidator | None],
        flight: Flight,
        *,
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
        stored, old = await self._read_l2(key, variant, stale.keep)
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
        loader, revalidate = loaders
        previous = refreshing or candidate  # what the origin may confirm instead of resending
        try:
            fetched_at = self._clock.time()
            started = self._clock.monotonic()
            try:
                if revalidate is not None and previous is not None:
                    loaded = await revalidate(previous)
                else:
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
            if (
                took > 0
                and not loaded.entry.fetch_seconds
                and (loaded.l1_ttl > 0 or loaded.l2_ttl > 0)
            ):
                # Timed here unless the loader timed its fetch (the proxy's loaders do).
                loaded = dataclasses.replace(
                    loaded, entry=dataclasses.replace(loaded.entry, fetch_seconds=took)
                )
            now = self._clock.time()
            l1_keep = _keep(loaded.l1_ttl, loaded, now)
            if self._hit_path.degraded:
                # Counted from when the fetch began: a change another replica made while it
                # ran goes unheard, and must not be served for longer than degraded_ttl.
                l1_keep = min(l1_keep, self._degraded_ttl - (now - fetched_at))
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
                revalidated=loaded.revalidated,
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
        return judge(entry, self._clock.time(), stale.early_refresh, self._rand) == DUE

    async def _read_l2(self, key: str, variant: str, keep_stale: float) -> Read:
        """L2's answer for a lookup: what the hit path read and kept for it, else a read."""
        shared = self._shared
        if shared is None:
            return None, None
        was_kept, kept = self._hit_path.take(key, variant)
        if was_kept:
            return shared.counted(key, kept, keep_stale)
        return await shared.get(key, variant, keep_stale)

    def _instead_of_failure(
        self, flight: Flight, stale: Staleness, candidate: Entry | None
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


def _keep(ttl: float, loaded: Loaded, now: float) -> float:
    """How long a tier whose TTL is ``ttl`` keeps a loaded entry: past its freshness by
    ``stale_for`` when the tier keeps it to its end, else ``ttl``."""
    if ttl <= 0 or not loaded.stale_for:
        return ttl
    fresh_left = loaded.entry.expires_at() - now
    return ttl + loaded.stale_for if ttl >= fresh_left - _SLACK else ttl


_SLACK = 0.001  # seconds: the tier TTL and the freshness are computed apart
