"""One request, from the client's bytes to the answer.

    request -> normalize the path (400 when it cannot be) -> first matching route
      -> no route, a bypass route, or a method the cache does not answer -> pass through (BYPASS)
      -> GET/HEAD on a cached route
           -> credentials the route does not key on, or a Range          -> pass through (BYPASS)
           -> cache.get(key, variant): L1 -> L2 -> origin, one fetch per key at a time
           -> answer from the entry: X-Cache, Cache-Status, Age; 304 when the validator matches
      -> PUT/PATCH/POST/DELETE on a cached route -> by the route's mode (see ``proxy.writes``)

Everything passed through is streamed both ways (``proxy.passthrough``); only a cacheable miss is
read whole, because it is about to be stored. Each answer is counted once, by its X-Cache, in
``proxy.metrics`` (and in the access log when it is on).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from datetime import UTC, datetime

from aiohttp import web
from multidict import CIMultiDict

from cache.clock import Clock
from cache.entry import Entry
from cache.errors import CacheError, TierError
from cache.locks import KeyLocks
from cache.lookup import REVALIDATING, Loaded, Loader, Lookup, Source
from cache.tiered import TieredCache
from cache.write_behind.records import QueuedWrite
from cache.write_behind.writer import WriteBehind
from proxy import headers as forwarding
from proxy.answers import (
    BYPASS_METHOD,
    BYPASS_ROUTE,
    CLIENT_GONE,
    HIT_L1,
    HIT_L2,
    OUTCOMES,
    WRITTEN,
    X_CACHE,
    error_response,
)
from proxy.metrics import Metrics
from proxy.origin import OriginClient, OriginError, Oversized
from proxy.passthrough import ClientGone, PassThrough, relay
from proxy.paths import BadPath, normalize_path
from proxy.policy import bypass_reason, decide, delta_seconds, not_modified, stale_allowed
from proxy.routes import UNMATCHED, Route, Router
from proxy.settings import Coalesce, Mode
from proxy.writes import tombstone, validators_of, written_entry

logger = logging.getLogger("cachecar.proxy")
access_logger = logging.getLogger("cachecar.access")

READS = frozenset({"GET", "HEAD"})
WRITES = frozenset({"PUT", "PATCH", "POST", "DELETE"})

_KEEP_ON_304 = forwarding.NOT_MODIFIED_HEADERS | {"x-cache", "cache-status", "age"}


class Proxy:
    def __init__(
        self,
        router: Router,
        cache: TieredCache,
        origin: OriginClient,
        *,
        max_body: int,
        clock: Clock,
        metrics: Metrics,
        access_log: bool = False,
        write_behind: WriteBehind | None = None,
        max_cacheable: int | None = None,
        max_key_length: int = 1024,
        body_timeout: float = 30.0,
    ) -> None:
        """``max_cacheable``: larger answers are relayed uncached; ``max_key_length``: requests
        whose key or a tag is longer are not cached (a write-behind write is refused)."""
        self._router = router
        self._max_cacheable = max_cacheable
        self._max_key_length = max_key_length
        self._metrics = metrics
        self._access_log = access_log
        self._cache = cache
        self._origin = origin
        self._passthrough = PassThrough(origin, max_body, body_timeout)
        self._clock = clock
        self._write_behind = write_behind
        self._write_through_locks = KeyLocks()

    @property
    def router(self) -> Router:
        return self._router

    @property
    def clock(self) -> Clock:
        return self._clock

    @property
    def routes(self) -> tuple[Route, ...]:
        return self._router.routes

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        path, _, query = request.raw_path.partition("?")
        route: Route | None = None
        response: web.StreamResponse | None = None
        try:
            try:
                path = normalize_path(path)
            except BadPath as exc:
                response = error_response(400, "bad request path", str(exc), BYPASS_ROUTE)
                return response
            found = self._router.match(path)
            route, params = found if found is not None else (None, {})
            try:
                response = await self._dispatch(request, route, params, path, query)
            except ClientGone as exc:
                # Nobody is left to answer; counted (and logged) as nginx does, 499.
                response = error_response(
                    CLIENT_GONE, "client closed request", str(exc), BYPASS_METHOD
                )
            return response
        finally:
            if response is not None or not _cancelled():
                status = response.status if response is not None else 500  # aiohttp's answer
                self._report(request, route, status, response, time.perf_counter() - started)

    async def _dispatch(
        self,
        request: web.Request,
        route: Route | None,
        params: dict[str, str],
        path: str,
        query: str,
    ) -> web.StreamResponse:
        if route is None or not route.cached:
            return await self._passthrough(request, _name(route), path, query, BYPASS_ROUTE)
        method = request.method
        if method in READS:
            reason = bypass_reason(request.headers, route)
            if reason is not None:
                detail = f"{BYPASS_ROUTE}; detail={reason}"
                return await self._passthrough(request, _name(route), path, query, detail)
            return await self._read(request, route, params, path, query)
        if method in WRITES:
            return await self._write(request, route, params, path, query)
        return await self._passthrough(request, _name(route), path, query, BYPASS_METHOD)

    def _report(
        self,
        request: web.Request,
        route: Route | None,
        status: int,
        response: web.StreamResponse | None,
        seconds: float,
    ) -> None:
        """Count the answer, by the X-Cache it carried; log it when asked to."""
        x_cache = response.headers.get("X-Cache", "BYPASS") if response is not None else "BYPASS"
        outcome = OUTCOMES.get(x_cache, "bypass")
        cached_route = route is not None and route.cached
        if outcome == "bypass" and cached_route and request.method in WRITES:
            outcome = "write"
        name = _name(route)
        self._metrics.request(name, request.method, status, outcome, seconds)
        if self._access_log:
            access_logger.info(
                "%s",
                json.dumps(
                    {
                        "time": _utc(self._clock.time()),
                        "remote": request.remote,
                        "method": request.method,
                        "path": request.path,
                        "route": name,
                        "status": status,
                        "outcome": outcome,
                        "cache": x_cache,
                        "duration_ms": round(seconds * 1000, 3),
                    },
                    separators=(",", ":"),
                ),
            )

    # -- cached reads ----------------------------------------------------------------------------

    async def _read(
        self, request: web.Request, route: Route, params: dict[str, str], path: str, query: str
    ) -> web.StreamResponse:
        key = route.key_for(params, path, query)
        tags = route.tags_for(params)
        if route.too_long(key, tags, self._max_key_length):
            detail = f"{BYPASS_ROUTE}; detail=key-too-long"
            return await self._passthrough(request, route.name, path, query, detail)
        variant = route.variant_for(request.headers, query, params)
        loader: Loader = functools.partial(self._load, request, route, path, query, tags)
        if route.mode is Mode.WRITE_BEHIND and self._write_behind is not None:
            loader = self._write_behind.loader(
                key, loader, l1_ttl=route.l1_ttl, l2_ttl=route.l2_ttl, tags=tags
            )
        try:
            lookup = await self._cache.get(
                key,
                variant,
                l1_ttl=route.l1_ttl,
                loader=loader,
                lease=route.coalesce is Coalesce.CLUSTER,
                stale=route.stale,
            )
        except OriginError as exc:
            return error_response(exc.status, exc.title, str(exc), "cachecar; fwd=miss", "MISS")
        except Oversized as exc:
            return await self._relay_oversized(request, route, path, query, exc)
        if lookup.coalesced and lookup.source is Source.LOADER:
            self._metrics.coalesced(route.name)  # waited for another request's origin fetch
        return self._answer(request, lookup)

    async def _relay_oversized(
        self, request: web.Request, route: Route, path: str, query: str, exc: Oversized
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
            return await self._passthrough(request, route.name, path, query, status, x_cache="MISS")
        upstream, prefix = taken
        try:
            return await relay(request, upstream, status, x_cache="MISS", prefix=prefix)
        finally:
            exc.close()

    async def _load(
        self, request: web.Request, route: Route, path: str, query: str, tags: tuple[str, ...]
    ) -> Loaded:
        """Fetch the entry for a cacheable miss (conditional headers are not forwarded).

        It may run after the answer was sent (a refresh): it reads only what the request
        object keeps (headers, peer, scheme), never its connection.
        """
        sent = forwarding.forward_fill(
            request.headers, route.vary + route.forward_headers, request.remote, request.scheme
        )
        response = await self._origin.fetch(
            "GET", self._origin.url(path, query), sent, route=route.name, limit=self._max_cacheable
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

    # -- writes ----------------------------------------------------------------------------------

    async def _write(
        self, request: web.Request, route: Route, params: dict[str, str], path: str, query: str
    ) -> web.StreamResponse:
        key = route.key_for(params, path, query)
        method = request.method
        if route.too_long(key, route.tags_for(params), self._max_key_length):
            if route.mode is Mode.WRITE_BEHIND and method in {"PUT", "DELETE"}:
                return error_response(
                    414,
                    "key too long",
                    f"the key of this write has {len(key)} characters (or one of its tags has "
                    f"more than server.max_key_length, {self._max_key_length}); a write-behind "
                    "write cannot be queued under it",
                    BYPASS_METHOD,
                )
            # Never cached (reads of it are passed through too): nothing to drop or store.
            return await self._passthrough(request, route.name, path, query, BYPASS_METHOD)
        if route.mode is Mode.WRITE_BEHIND and self._write_behind is not None:
            if method in {"PUT", "DELETE"}:
                return await self._queue(request, route, params, key, path, query)
            conflict = await self._still_queued(key)
            if conflict is not None:
                return conflict
        elif route.mode is Mode.WRITE_THROUGH and method == "PUT":
            return await self._write_through(request, route, params, key, path, query)

        async def invalidate(status: int | None) -> None:
            # Dropped on success, and also when the outcome is unknown (the origin may have
            # applied a write it never confirmed): a needless miss is cheap, a stale hit is not.
            if status is None or 200 <= status < 300:
                await self._cache.invalidate(key)

        return await self._passthrough(
            request, _name(route), path, query, BYPASS_METHOD, on_answer=invalidate
        )

    async def _write_through(
        self,
        request: web.Request,
        route: Route,
        params: dict[str, str],
        key: str,
        path: str,
        query: str,
    ) -> web.StreamResponse:
        body = await self._passthrough.read_body(request, BYPASS_METHOD)
        if isinstance(body, web.Response):
            return body
        sent = forwarding.forward_uncached(request.headers, request.remote, request.scheme)
        # One PUT of a key at a time from here: the cache ends with what the origin got last.
        async with self._write_through_locks.hold(key):
            try:
                response = await self._origin.fetch(
                    "PUT", self._origin.url(path, query), sent, body, route=route.name
                )
            except OriginError as exc:
                await self._cache.invalidate(key)  # the origin may have applied it: unknown
                return error_response(exc.status, exc.title, str(exc), BYPASS_METHOD)
            stored = 200 <= response.status < 300
            if stored:
                entry = written_entry(
                    body,
                    request.headers.get("Content-Type"),
                    self._clock.time(),
                    max(route.l1_ttl, route.l2_ttl),
                    validators_of(response.headers),
                )
                variant = route.variant_for(request.headers, query, params)
                await self._cache.put(
                    key,
                    variant,
                    entry,
                    l1_ttl=route.l1_ttl,
                    l2_ttl=route.l2_ttl,
                    tags=route.tags_for(params),
                )
        headers = forwarding.to_pass(response.headers)
        headers.popall("Content-Length", None)
        headers["X-Cache"] = "BYPASS"
        headers["Cache-Status"] = WRITTEN if stored else BYPASS_METHOD
        return web.Response(status=response.status, headers=headers, body=response.body)

    async def _queue(
        self,
        request: web.Request,
        route: Route,
        params: dict[str, str],
        key: str,
        path: str,
        query: str,
    ) -> web.StreamResponse:
        assert self._write_behind is not None
        sent_credentials = sorted(
            name for name in forwarding.CREDENTIALS if name in request.headers
        )
        if sent_credentials:
            # The flusher sends the body later, without them (credentials are never stored):
            # acknowledging now would let readers see a write the origin never authorized.
            return error_response(
                400,
                "credentials on a write-behind write",
                f"{' and '.join(sent_credentials)} cannot be kept for the later origin write; "
                "send the write without them (the origin must accept writes from cachecar), or "
                "use mode: write-through",
                BYPASS_METHOD,
            )
        now = self._clock.time()
        ttl = max(route.l1_ttl, route.l2_ttl)
        if request.method == "PUT":
            body = await self._passthrough.read_body(request, BYPASS_METHOD)
            if isinstance(body, web.Response):
                return body
            entry = written_entry(body, request.headers.get("Content-Type"), now, ttl)
        else:
            entry = tombstone(key, now, ttl)
        target = f"{path}?{query}" if query else path
        write = QueuedWrite(key, request.method, target, entry)
        variant = route.variant_for(request.headers, query, params)
        try:
            await self._write_behind.write(
                write,
                variant,
                l1_ttl=route.l1_ttl,
                l2_ttl=route.l2_ttl,
                tags=route.tags_for(params),
            )
        except CacheError as exc:  # unavailable, full, or its keys are not ours to read
            response = error_response(
                503, "write-behind queue unavailable", f"not accepted: {exc}", BYPASS_METHOD
            )
            response.headers["Retry-After"] = "1"
            return response
        return web.json_response(
            {"queued": request.method, "key": key},
            status=202,
            headers={"X-Cache": "BYPASS", "Cache-Status": WRITTEN, "X-Cache-Write": "queued"},
        )

    async def _still_queued(self, key: str) -> web.Response | None:
        """A 409 when ``key`` has a queued write a PATCH or POST would race; else None."""
        assert self._write_behind is not None
        try:
            pending = await self._write_behind.queue.pending(key)
        except TierError as exc:
            response = error_response(
                503,
                "write-behind queue unavailable",
                f"cannot tell whether a write of {key} is still queued: {exc}",
                BYPASS_METHOD,
            )
            response.headers["Retry-After"] = "1"
            return response
        if pending is None:
            return None
        return error_response(
            409,
            "write still queued",
            f"a {pending.method} of {key} has not reached the origin yet; retry once it is "
            "flushed, or PUT the whole value",
            BYPASS_METHOD,
        )


def _name(route: Route | None) -> str:
    return route.name if route is not None else UNMATCHED


def _cancelled() -> bool:
    """Whether the running request is being cancelled (its client went away)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _utc(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds")


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
