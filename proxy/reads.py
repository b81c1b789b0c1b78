"""A read on a cached route, through the cache.

    GET/HEAD (no credentials the route does not key on, no If-Range: ``proxy.handler``
    checked)
      -> the key or a tag too long                      -> pass through (BYPASS, key-too-long)
      -> cache.get(key, variant): L1 -> L2 -> the origin (``_load``), one fetch per key at a
         time (``coalesce: cluster``: across replicas); write-behind routes read queued writes;
         an entry kept past its freshness is revalidated (``_load`` with it: its validators
         sent, a 304 refreshes it, ``_refresh``)
      -> answer from the entry: X-Cache, Cache-Status, Age; 304 when the validator matches;
         a GET's one byte range of a stored 200: 206 (416 when it asks for none of it)
      -> the origin failed: its error; an answer too large to keep: relayed whole, not kept

Only a cacheable miss is read whole, because it is about to be stored; the client's conditional
headers are not forwarded on it (the entry must be whole), only the stored entry's own.
"""

from __future__ import annotations

import functools
import logging

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from cache.clock import Clock
from cache.entry import Entry, Headers
from cache.lookup import REVALIDATING, Loaded, Loader, Lookup, Revalidator, Source
from cache.tiered import TieredCache
from cache.write_behind.writer import WriteBehind
from proxy import headers as forwarding
from proxy.answers import BYPASS_ROUTE, HIT_L1, HIT_L2, REVALIDATED, X_CACHE, error_response
from proxy.metrics import Metrics
from proxy.origin import OriginClient, OriginError, Oversized
from proxy.passthrough import Head, PassThrough, relay
from proxy.policy import (
    UNSATISFIABLE,
    Decision,
    age_of,
    byte_range,
    decide,
    not_modified,
    stale_allowed,
    stale_limits,
)
from proxy.request import CacheRequest
from proxy.routes import MAX_LEARNED, Route
from proxy.settings import Coalesce, Mode

logger = logging.getLogger("cachecar.proxy")

_KEEP_ON_304 = forwarding.NOT_MODIFIED_HEADERS | {"x-cache", "cache-status", "age"}


class Reads:
    def __init__(
        self,
        cache: TieredCache,
        origin: OriginClient,
        passthrough: PassThrough,
        *,
        clock: Clock,
        metrics: Metrics,
        write_behind: WriteBehind | None,
        max_cacheable: int | None,
    ) -> None:
        """``max_cacheable``: larger answers are relayed uncached."""
        self._cache = cache
        self._origin = origin
        self._passthrough = passthrough
        self._clock = clock
        self._metrics = metrics
        self._write_behind = write_behind
        self._max_cacheable = max_cacheable

    async def __call__(self, request: web.Request, cached: CacheRequest) -> web.StreamResponse:
        route = cached.route
        if cached.too_long:
            detail = f"{BYPASS_ROUTE}; detail=key-too-long"
            return await self._passthrough(request, route.name, cached.path, cached.query, detail)
        tags = cached.tags
        learned = route.learned.names  # as they are now: an answer may teach the route more
        loader: Loader = functools.partial(self._load, request, cached, tags, learned, None)
        revalidate: Revalidator | None = None
        if route.mode is Mode.WRITE_BEHIND and self._write_behind is not None:
            # Its unflushed writes come first, so its entries are never revalidated.
            loader = self._write_behind.loader(
                cached.key, loader, l1_ttl=route.l1_ttl, l2_ttl=route.l2_ttl, tags=tags
            )
        elif route.revalidate_within > 0:
            revalidate = functools.partial(self._load, request, cached, tags, learned)
        try:
            lookup = await self._cache.get(
                cached.key,
                cached.variant(request.headers, learned),
                l1_ttl=route.l1_ttl,
                loader=loader,
                lease=route.coalesce is Coalesce.CLUSTER,
                stale=route.stale,
                revalidate=revalidate,
            )
        except OriginError as exc:
            return error_response(exc.status, exc.title, str(exc), "cachecar; fwd=miss", "MISS")
        except Oversized as exc:
            return await self._relay_oversized(request, cached, exc)
        if lookup.coalesced and lookup.source is Source.LOADER:
            self._metrics.coalesced(route.name)  # waited for another request's origin fetch
        return self._answer(request, lookup)

    async def _relay_oversized(
        self, request: web.Request, cached: CacheRequest, exc: Oversized
    ) -> web.StreamResponse:
        """An answer too large to keep: relayed as it comes by the first request to take it;
        every other request that waited for that fetch (and a HEAD) gets its own, passed
        through. Only the taker closes it."""
        status = "cachecar; fwd=miss; detail=too-large"
        taken = exc.take()
        if taken is not None and request.method != "GET":
            exc.close()  # a HEAD wants no body: the connection is freed at once
            taken = None
        if taken is None:
            return await self._passthrough(
                request, cached.route.name, cached.path, cached.query, status, x_cache="MISS"
            )
        head = Head(taken.status, taken.reason, taken.headers)
        try:
            return await relay(request, head, taken.iter_any(), status, x_cache="MISS")
        finally:
            exc.close()

    async def _load(
        self,
        request: web.Request,
        cached: CacheRequest,
        tags: tuple[str, ...],
        learned: tuple[str, ...],
        previous: Entry | None,
    ) -> Loaded:
        """Fetch the entry for a cacheable miss (the client's conditional headers are not
        forwarded: the entry must be whole), sending the request headers its variant is made
        of (the route's vary and the ``learned`` ones). With ``previous`` (what the tiers hold,
        stale or due for a refresh), ask with its validators: a 304 refreshes it
        (``_refresh``). An answer that varies on a header the variant does not say teaches the
        route to key on it (``policy.decide``).

        It may run after the answer was sent (a refresh): it reads only what the request
        object keeps (headers, peer, scheme), never its connection.
        """
        started = self._clock.monotonic()
        route = cached.route
        keyed = route.vary + learned
        sent = forwarding.forward_fill(
            request.headers, keyed + route.forward_headers, request.remote, request.scheme
        )
        names = frozenset(name.lower() for name in sent)
        present = frozenset(name.lower() for name in request.headers)
        validators = (
            forwarding.validators(previous.headers)
            if previous is not None and previous.status == 200
            else {}
        )
        outgoing = sent
        if validators:
            outgoing = CIMultiDict(sent)
            outgoing.update(validators)
        response = await self._origin.fetch(
            "GET",
            self._origin.url(cached.path, cached.query),
            outgoing,
            route=route.name,
            limit=self._max_cacheable,
        )
        now = self._clock.time()
        took = self._clock.monotonic() - started
        age = age_of(response.headers)
        if response.status == 304 and previous is not None and validators:
            return self._refresh(
                previous, response.headers, cached, (names, present, keyed), now, age, took
            )
        decision = decide(response.status, response.headers, route, names, now, age, keyed, present)
        _learn(route, decision)
        stored = (response.status, forwarding.to_store(response.headers), response.body)
        return _loaded(
            route,
            stored,
            response.headers,
            decision,
            (now, age, took),
            tags,
            failed=response.status >= 500,
        )

    def _refresh(
        self,
        previous: Entry,
        answer: CIMultiDictProxy[str],
        cached: CacheRequest,
        request_names: tuple[frozenset[str], frozenset[str], tuple[str, ...]],
        now: float,
        age: float,
        took: float,
    ) -> Loaded:
        """The origin's 304 to a revalidation: ``previous`` with its headers updated by the
        304's and fresh again, for as long as those headers now say (RFC 9111 §4.3.4)."""
        route = cached.route
        headers = forwarding.refreshed(previous.headers, answer)
        merged = CIMultiDictProxy(CIMultiDict(headers))
        sent, present, keyed = request_names
        decision = decide(previous.status, merged, route, sent, now, age, keyed, present)
        _learn(route, decision)
        stored = (previous.status, headers, previous.body)
        return _loaded(
            route, stored, merged, decision, (now, age, took), cached.tags, revalidated=True
        )

    def _answer(self, request: web.Request, lookup: Lookup) -> web.Response:
        entry = lookup.entry
        headers = CIMultiDict(entry.headers)
        headers["X-Cache"] = REVALIDATED if lookup.revalidated else X_CACHE[lookup.source]
        now = self._clock.time()
        if lookup.source is Source.LOADER:
            headers["Cache-Status"] = _miss_status(lookup)
        elif lookup.source is Source.STALE:
            headers["Cache-Status"] = _stale_status(lookup, now)
        else:
            headers["Cache-Status"] = HIT_L1 if lookup.source is Source.L1 else HIT_L2
        age = int(entry.age(now))
        # Every cached answer has an Age (a revalidated one too: its stored body answered); a
        # miss has the one the origin sent (RFC 9111 §5.1).
        if age or lookup.source is not Source.LOADER or lookup.revalidated:
            headers["Age"] = str(age)
        if not_modified(request.headers, entry):
            kept = CIMultiDict((k, v) for k, v in headers.items() if k.lower() in _KEEP_ON_304)
            return web.Response(status=304, headers=kept)
        wanted = request.headers.get(forwarding.RANGE)
        if wanted is not None and request.method == "GET" and entry.status == 200:
            return _part(headers, entry.body, wanted)
        return web.Response(status=entry.status, headers=headers, body=entry.body)


def _stale_status(lookup: Lookup, now: float) -> str:
    """RFC 9211 for a stale answer: a hit while it is refreshed; else forwarded, and the
    origin failed. ``ttl`` is negative: how long ago it stopped being fresh."""
    ttl = int(lookup.entry.expires_at() - now)
    if lookup.detail == REVALIDATING:
        return f"cachecar; hit; ttl={ttl}; detail={lookup.detail}"
    return f"cachecar; fwd=stale; ttl={ttl}; detail={lookup.detail}"


def _part(headers: CIMultiDict[str], body: bytes, wanted: str) -> web.Response:
    """The part of a stored 200 a Range asks for (206), none of it (416), or all of it when
    the Range is one cachecar does not serve from the cache (several ranges, another unit)."""
    part = byte_range(wanted, len(body))
    if part is None:
        return web.Response(status=200, headers=headers, body=body)
    if part == UNSATISFIABLE:
        headers.popall("Content-Type", None)
        headers["Content-Range"] = f"bytes */{len(body)}"
        return web.Response(status=416, headers=headers)
    first, last = part
    headers["Content-Range"] = f"bytes {first}-{last}/{len(body)}"
    return web.Response(status=206, headers=headers, body=body[first : last + 1])


def _loaded(
    route: Route,
    stored: tuple[int, Headers, bytes],
    headers: CIMultiDictProxy[str],
    decision: Decision,
    times: tuple[float, float, float],
    tags: tuple[str, ...],
    *,
    failed: bool = False,
    revalidated: bool = False,
) -> Loaded:
    """The entry of ``stored`` (status, the headers to store, body) as the tiers take it: fresh
    from now as ``decision`` says, served stale only as its ``headers`` allow, kept past its
    freshness as ``_kept_stale`` says; ``times``: now, the answer's age, the fetch's seconds.
    Built once, here: a miss makes one entry.

    stored_at is when the origin (or a cache before it) produced the answer, so Age keeps
    counting from there; the entry is fresh until now + fresh_for."""
    status, kept, body = stored
    now, age, took = times
    entry = Entry(
        status,
        kept,
        body,
        now - age,
        decision.fresh_for + age,
        took if took > 0 else 0.0,
        not stale_allowed(status, headers),
        stale_limits(headers),
    )
    return Loaded(
        entry,
        decision.l1_ttl,
        decision.l2_ttl,
        decision.shared,
        decision.detail,
        tags,
        failed=failed,
        stale_for=_kept_stale(route, entry),
        revalidated=revalidated,
    )


def _learn(route: Route, decision: Decision) -> None:
    """The route keys on the headers an answer varied on from now on (``LearnedVary``)."""
    if not decision.learn:
        return
    left_out = route.learned.learn(decision.learn)
    learned = [name for name in decision.learn if name not in left_out]
    if learned:
        logger.info("route %s: the origin varies on %s; now keyed on it", route.name, learned)
    if left_out:
        logger.warning(
            "route %s: the origin varies on %s too, past the %d headers a route learns: "
            "such answers are not kept (name them in the route's vary)",
            route.name,
            list(left_out),
            MAX_LEARNED,
        )


def _kept_stale(route: Route, entry: Entry) -> float:
    """How long past its freshness the tiers keep ``entry``: to serve it stale, as the route
    allows and the origin did not forbid; to revalidate it, when it has a validator."""
    keep = 0.0 if entry.must_revalidate else route.stale.keep_for(entry)
    if route.revalidate_within > 0 and entry.status == 200 and forwarding.validators(entry.headers):
        keep = max(keep, route.revalidate_within)
    return keep


def _miss_status(lookup: Lookup) -> str:
    if lookup.revalidated:
        # The stored entry went forward to be validated, and the origin confirmed it.
        stored = "; stored" if lookup.stored else ""
        return f"cachecar; fwd=stale; fwd-status=304{stored}"
    status = "cachecar; fwd=miss"
    if lookup.stored:
        status += "; stored"
    if lookup.coalesced:
        status += "; collapsed"
    if lookup.detail:
        status += f"; detail={lookup.detail}"
    return status
