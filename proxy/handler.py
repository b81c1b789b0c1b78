"""The full handler: one request, from aiohttp's request to the answer, counted once.

    request -> normalize the path (400 when it cannot be) -> ``proxy.request.locate``
      -> no route, a bypass route, or a method the cache does not answer -> pass through (BYPASS)
      -> GET/HEAD on a cached route
           -> credentials the route does not key on, or a Range          -> pass through (BYPASS)
           -> else                                                       -> ``proxy.reads``
      -> PUT/PATCH/POST/DELETE, or a method it does not know, on a cached route
                                                  -> by the route's mode: ``proxy.writes``

Everything passed through goes by ``proxy.passthrough`` (small bodies held whole, the rest
streamed). Each answer is counted once, by its X-Cache, in ``proxy.metrics`` (and in the access
log when it is on). The hit path (``proxy.fastpath``) answers the hits it can before a request
reaches this handler, from the same request model and the same answer lines (``proxy.answers``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from datetime import UTC, datetime

from aiohttp import web

from cache.clock import Clock
from cache.tiered import TieredCache
from cache.write_behind.writer import WriteBehind
from proxy.answers import BYPASS_METHOD, BYPASS_ROUTE, CLIENT_GONE, OUTCOMES, error_response
from proxy.metrics import Metrics
from proxy.origin import OriginClient
from proxy.passthrough import ClientGone, PassThrough
from proxy.paths import BadPath, normalize_path
from proxy.policy import bypass_reason
from proxy.reads import Reads
from proxy.request import CacheRequest, locate
from proxy.routes import UNMATCHED, Route, Router
from proxy.writes import Writes

logger = logging.getLogger("cachecar.proxy")
access_logger = logging.getLogger("cachecar.access")

READS = frozenset({"GET", "HEAD"})
# Safe methods (RFC 9110 §9.2.1) the cache does not answer: passed through, nothing dropped.
# Any other method, known or not, may change the resource: a write (RFC 9111 §4.4).
SAFE = READS | {"OPTIONS", "TRACE"}


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
        body_deadline: float = 60.0,
    ) -> None:
        """``max_cacheable``: larger answers are relayed uncached; ``max_key_length``: requests
        whose key or a tag is longer are not cached (a write-behind write is refused)."""
        self._router = router
        self._max_key_length = max_key_length
        self._metrics = metrics
        self._access_log = access_log
        self._passthrough = PassThrough(origin, max_body, body_timeout, body_deadline)
        self._clock = clock
        self._reads = Reads(
            cache,
            origin,
            self._passthrough,
            clock=clock,
            metrics=metrics,
            write_behind=write_behind,
            max_cacheable=max_cacheable,
        )
        self._writes = Writes(
            cache,
            origin,
            self._passthrough,
            clock=clock,
            write_behind=write_behind,
            max_key_length=max_key_length,
            router=router,
        )

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
            located = locate(self._router, path, query, self._max_key_length)
            route = located.route if isinstance(located, CacheRequest) else located
            try:
                response = await self._dispatch(request, located, path, query)
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
        self, request: web.Request, located: CacheRequest | Route | None, path: str, query: str
    ) -> web.StreamResponse:
        if not isinstance(located, CacheRequest):
            return await self._passthrough(request, _name(located), path, query, BYPASS_ROUTE)
        route = located.route
        method = request.method
        if method in READS:
            reason = bypass_reason(request.headers, route)
            if reason is not None:
                detail = f"{BYPASS_ROUTE}; detail={reason}"
                return await self._passthrough(request, route.name, path, query, detail)
            return await self._reads(request, located)
        if method in SAFE:
            return await self._passthrough(request, route.name, path, query, BYPASS_METHOD)
        return await self._writes(request, located)

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
        if outcome == "bypass" and cached_route and request.method not in SAFE:
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


def _name(route: Route | None) -> str:
    return route.name if route is not None else UNMATCHED


def _cancelled() -> bool:
    """Whether the running request is being cancelled (its client went away)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _utc(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds")
