"""The two aiohttp applications and what they share.

    proxy app (server.listen)   every path -> Proxy
    admin app (admin.listen)    /healthz, /readyz (and, later, /metrics, /admin/*)

The proxy app owns the runtime: its ``cleanup_ctx`` opens the origin client, the Redis client and
the cache, and closes them after the last in-flight request. The admin app reaches the runtime
through the proxy app, so both listeners see one cache.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

from aiohttp import web

from cache.breaker import Breaker
from cache.clock import Clock, SystemClock
from cache.errors import TierUnavailable
from cache.memory import MemoryTier
from cache.observer import CacheObserver, NullObserver
from cache.redis_tier import RedisTier, client_from_url
from cache.tiered import TieredCache, breaker_logger
from proxy.handler import Proxy
from proxy.origin import OriginClient
from proxy.routes import Router
from proxy.settings import Settings


@dataclasses.dataclass(frozen=True)
class Runtime:
    """Everything a running proxy holds open."""

    settings: Settings
    cache: TieredCache
    l2: RedisTier | None
    origin: OriginClient
    proxy: Proxy

    @classmethod
    def open(cls, settings: Settings, clock: Clock, observer: CacheObserver) -> Runtime:
        l1 = MemoryTier(
            max_entries=settings.l1.max_entries,
            max_bytes=settings.l1.max_bytes,
            clock=clock,
            observer=observer,
        )
        l2 = None
        if settings.l2.url is not None:
            client = client_from_url(settings.l2.url, timeout=settings.l2.timeout)
            l2 = RedisTier(client, key_prefix=settings.l2.key_prefix, timeout=settings.l2.timeout)
        breaker = Breaker(
            failures=settings.l2.breaker.failures,
            reset_after=settings.l2.breaker.reset_after,
            clock=clock,
            on_change=breaker_logger("l2", settings.l2.breaker.reset_after, observer),
        )
        cache = TieredCache(l1, l2, clock=clock, observer=observer, breaker=breaker)
        origin = OriginClient.create(
            settings.upstream.url,
            timeout=settings.upstream.timeout,
            max_connections=settings.upstream.max_connections,
        )
        proxy = Proxy(
            Router.from_settings(settings),
            cache,
            origin,
            max_body=settings.server.max_body,
            clock=clock,
        )
        return cls(settings, cache, l2, origin, proxy)

    async def aclose(self) -> None:
        await self.cache.aclose()
        await self.origin.aclose()


RUNTIME = web.AppKey("runtime", Runtime)
PROXY_APP = web.AppKey("proxy_app", web.Application)


def build_proxy_app(
    settings: Settings, *, clock: Clock | None = None, observer: CacheObserver | None = None
) -> web.Application:
    app = web.Application(client_max_size=settings.server.max_body)

    async def runtime(app: web.Application) -> AsyncIterator[None]:
        app[RUNTIME] = Runtime.open(settings, clock or SystemClock(), observer or NullObserver())
        yield
        await app[RUNTIME].aclose()

    async def handle(request: web.Request) -> web.StreamResponse:
        return await request.app[RUNTIME].proxy(request)

    app.cleanup_ctx.append(runtime)
    app.router.add_route("*", "/{path:.*}", handle)
    return app


def build_admin_app(proxy_app: web.Application) -> web.Application:
    """The admin listener's app; ``proxy_app`` must be started first."""
    app = web.Application()
    app[PROXY_APP] = proxy_app
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "alive"})


async def readyz(request: web.Request) -> web.Response:
    """200 when the origin and L2 answer; 503 naming what does not."""
    runtime = request.app[PROXY_APP][RUNTIME]
    checks = {"origin": runtime.origin.probe(runtime.settings.upstream.health_path)}
    if runtime.l2 is not None:
        checks["l2"] = _l2_problem(runtime.l2)
    results = dict(zip(checks, await asyncio.gather(*checks.values()), strict=True))
    problems = {name: problem for name, problem in results.items() if problem is not None}
    body = {name: problems.get(name, "up") for name in results}
    if problems:
        reason = "; ".join(f"{name}: {problem}" for name, problem in problems.items())
        return web.json_response({"status": "unavailable", "reason": reason, **body}, status=503)
    return web.json_response({"status": "ready", **body})


async def _l2_problem(l2: RedisTier) -> str | None:
    try:
        await l2.ping()
    except TierUnavailable as exc:
        return str(exc)
    return None
