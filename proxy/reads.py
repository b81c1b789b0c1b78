"""A read on a cached route, through the cache.

    GET/HEAD (no credentials the route does not key on, no Range: ``proxy.handler`` checked)
      -> the key or a tag too long                      -> pass through (BYPASS, key-too-long)
      -> cache.get(key, variant): L1 -> L2 -> the origin (``_load``), one fetch per key at a
         time (``coalesce: cluster``: across replicas); write-behind routes read queued writes
      -> answer from the entry: X-Cache, Cache-Status, Age; 304 when the validator matches
      -> the origin failed: its error; an answer too large to keep: relayed whole, not kept

Only a cacheable miss is read whole, because it is about to be stored; conditional headers are
not forwarded on it (the entry must be whole).
"""

from __future__ import annotations

import functools

from aiohttp import web
from multidict import CIMultiDict

from cache.clock import Clock
from cache.entry import Entry
from cache.lookup import REVALIDATING, Loaded, Loader, Lookup, Source
from cache.tiered import TieredCache
from cache.write_behind.writer import WriteBehind
from proxy import headers as forwarding
from proxy.answers import BYPASS_ROUTE, HIT_L1, HIT_L2, X_CACHE, error_response
from proxy.metrics import Metrics
from proxy.origin import OriginClient, OriginError, Oversized
from proxy.passthrough import PassThrough, relay
from proxy.policy import decide, delta_seconds, not_modified, stale_allowed
from proxy.request import CacheRequest
from proxy.settings import Coalesce, Mode

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
        loader: Loader = functools.partial(self._load, request, cached, tags)
        if route.mode is Mode.WRITE_BEHIND and self._write_behind is not None:
            loader = self._write_behind.loader(
                cached.key, loader, l1_ttl=route.l1_ttl, l2_ttl=route.l2_ttl, tags=tags
            )
        try:
            lookup = await self._cache.get(
                cached.key,
                cached.variant(request.headers),
                l1_ttl=route.l1_ttl,
                loader=loader,
                lease=route.coalesce is Coalesce.CLUSTER,
                stale=route.stale,
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
        upstream, prefix = taken
        try:
            return await relay(request, upstream, status, x_cache="MISS", prefix=prefix)
        finally:
            exc.close()

    async def _load(
        self, request: web.Request, cached: CacheRequest, tags: tuple[str, ...]
    ) -> Loaded:
        """Fetch the entry for a cacheable miss (conditional headers are not forwarded).

        It may run after the answer was sent (a refresh): it reads only what the request
        object keeps (headers, peer, scheme), never its connection.
        """
        route = cached.route
        sent = forwarding.forward_fill(
            request.headers, route.vary + route.forward_headers, request.remote, request.scheme
        )
        response = await self._origin.fetch(
            "GET",
            self._origin.url(cached.path, cached.query),
            sent,
            route=route.name,
            limit=self._max_cacheable,
        )
        now = self._clock.time()
        age = delta_seconds(response.headers.get("Age")) or 0.0
        decision = decide(
            response.status,
            response.headers,
            route,
            frozenset(name.lower() for name in sent),
            now,
            age,
        )
        # stored_at is when the origin (or a cache before it) produced the answer, so Age keeps
        # counting from there; the entry is fresh until now + fresh_for.
        revalidate = not stale_allowed(response.status, response.headers)
        entry = Entry(
            status=response.status,
            headers=forwarding.to_store(response.headers),
            body=response.body,
            stored_at=now - age,
            ttl=decision.fresh_for + age,
            must_revalidate=revalidate,
        )
        return Loaded(
            entry,
            decision.l1_ttl,
            decision.l2_ttl,
            decision.shared,
            decision.detail,
            tags,
            failed=response.status >= 500,
            stale_for=0.0 if revalidate else route.stale.keep,
        )

    def _answer(self, request: web.Request, lookup: Lookup) -> web.Response:
        entry = lookup.entry
        headers = CIMultiDict(entry.headers)
        headers["X-Cache"] = X_CACHE[lookup.source]
        if lookup.source is Source.LOADER:
            headers["Cache-Status"] = _miss_status(lookup)
        else:
            now = self._clock.time()
            if lookup.source is Source.STALE:
                headers["Cache-Status"] = _stale_status(lookup, now)
            else:
                headers["Cache-Status"] = HIT_L1 if lookup.source is Source.L1 else HIT_L2
            headers["Age"] = str(int(entry.age(now)))
        if not_modified(request.headers, entry):
            kept = CIMultiDict((k, v) for k, v in headers.items() if k.lower() in _KEEP_ON_304)
            return web.Response(status=304, headers=kept)
        return web.Response(status=entry.status, headers=headers, body=entry.body)


def _stale_status(lookup: Lookup, now: float) -> str:
    """RFC 9211 for a stale answer: a hit while it is refreshed; else forwarded, and the
    origin failed. ``ttl`` is negative: how long ago it stopped being fresh."""
    ttl = int(lookup.entry.expires_at() - now)
    if lookup.detail == REVALIDATING:
        return f"cachecar; hit; ttl={ttl}; detail={lookup.detail}"
    return f"cachecar; fwd=stale; ttl={ttl}; detail={lookup.detail}"


def _miss_status(lookup: Lookup) -> str:
    status = "cachecar; fwd=miss"
    if lookup.stored:
        status += "; stored"
    if lookup.coalesced:
        status += "; collapsed"
    if lookup.detail:
        status += f"; detail={lookup.detail}"
    return status
