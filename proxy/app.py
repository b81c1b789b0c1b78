"""The proxy application and the runtime it owns.

    proxy app (server.listen)   every path -> Proxy
    admin app (admin.listen)    see ``proxy.admin``

The proxy app owns the runtime: its ``cleanup_ctx`` opens the origin client, the Redis clients,
the cache and the write-behind flusher, and closes them after the last in-flight request (the
flusher first drains the queue within what is left of the grace). The admin app reaches the
runtime through the proxy app, so both listeners see one cache.

One L2 circuit breaker per process: the tiered cache asks it itself; the write-behind queue,
leases, coherence's announcements, purges and /readyz reach it through one ``Guard``. Startup
needs no Redis: the clients connect when first used, and the breaker decides when to try again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Awaitable

from aiohttp import web
from prometheus_client import CollectorRegistry

from cache.breaker import Breaker, Guard, breaker_logger
from cache.clock import Clock, SystemClock
from cache.memory import MemoryTier
from cache.observer import CacheObserver, Observers
from cache.purge import Purger
from cache.redis.coherence import Coherence, listener_client, replica_name
from cache.redis.lease import Leases
from cache.redis.tier import MEMORY_URL, RedisTier, client_from_url
from cache.tiered import TieredCache
from cache.write_behind.flusher import Backoff, Flusher
from cache.write_behind.queue import WriteQueue
from cache.write_behind.writer import WriteBehind
from proxy.handler import Proxy
from proxy.metrics import Metrics
from proxy.origin import OriginClient
from proxy.routes import Router
from proxy.settings import Coalesce, Mode, Settings
from proxy.writes import OriginSink


@dataclasses.dataclass
class Runtime:
    """Everything a running proxy holds open."""

    settings: Settings
    cache: TieredCache
    l2: RedisTier | None
    origin: OriginClient
    proxy: Proxy
    write_behind: WriteBehind | None
    metrics: Metrics
    coherence: Coherence | None
    purger: Purger
    # Every L2 call made beside the tiered cache's goes through it (the one L2 breaker).
    guard: Guard
    # When the stop began (loop time): the write-behind drain gets what is left of the grace.
    stopping_since: float | None = None
    # False for a runtime that serves no traffic (the workers' supervisor): it reads and
    # replays the write-behind queue but neither flushes nor drains it.
    flushes: bool = True

    @classmethod
    def open(
        cls, settings: Settings, clock: Clock, metrics: Metrics, observer: CacheObserver | None
    ) -> Runtime:
        """``observer``, when given, hears the engine's events beside ``metrics``."""
        observer = Observers(metrics, observer) if observer is not None else metrics
        l1 = MemoryTier(
            max_entries=settings.l1.max_entries,
            max_bytes=settings.l1.max_bytes,
            clock=clock,
            observer=observer,
            max_variants=settings.l1.max_variants,
        )
        l2 = None
        if settings.l2.url is not None:
            client = client_from_url(settings.l2.url, timeout=settings.l2.timeout)
            l2 = RedisTier(
                client,
                key_prefix=settings.l2.key_prefix,
                timeout=settings.l2.timeout,
                clock=clock,
                # A write's mark must outlast any origin fetch that began before it.
                fence=settings.upstream.timeout + 60.0,
                max_variants=settings.l2.max_variants,
            )
        breaker = Breaker(
            failures=settings.l2.breaker.failures,
            reset_after=settings.l2.breaker.reset_after,
            clock=clock,
            on_change=breaker_logger("l2", settings.l2.breaker.reset_after, observer),
        )
        guard = Guard(breaker, observer=observer)
        coherent = (
            settings.coherence.enabled
            and settings.l2.url is not None
            and not settings.l2.url.startswith(MEMORY_URL)  # in this process only: no replicas
        )
        cache = TieredCache(
            l1,
            l2,
            clock=clock,
            observer=observer,
            breaker=breaker,
            # Until subscribed, another replica's change could go unheard.
            trust_l1=not coherent,
            degraded_ttl=settings.coherence.degraded_ttl,
            leases=_leases(settings, guard),
        )
        coherence = _coherence(settings, cache, clock, observer, guard) if coherent else None
        origin = OriginClient.create(
            settings.upstream.url,
            timeout=settings.upstream.timeout,
            max_connections=settings.upstream.max_connections,
            keepalive_timeout=settings.upstream.keepalive_timeout,
            on_origin=metrics.origin_request,
        )
        router = Router.from_settings(settings)
        write_behind = None
        if settings.l2.url is not None and any(
            route.mode is Mode.WRITE_BEHIND for route in router.routes
        ):
            write_behind = _write_behind(settings, cache, origin, router, clock, observer, guard)
        proxy = Proxy(
            router,
            cache,
            origin,
            max_body=settings.server.max_body,
            max_cacheable=settings.server.max_cacheable,
            max_key_length=settings.server.max_key_length,
            body_timeout=settings.server.body_timeout,
            body_deadline=settings.server.body_deadline,
            clock=clock,
            metrics=metrics,
            access_log=settings.server.access_log,
            write_behind=write_behind,
        )
        metrics.routes([route.name for route in router.routes if route.cached])
        metrics.watch(
            l1,
            l2=l2 is not None,
            coherence=coherence is not None,
            degraded_ttl=settings.coherence.degraded_ttl,
            queue=write_behind.queue if write_behind is not None else None,
        )
        purger = Purger(cache, l2, coherence, guard)
        return cls(
            settings, cache, l2, origin, proxy, write_behind, metrics, coherence, purger, guard
        )

    async def start(self) -> None:
        if self.coherence is not None:
            self.coherence.start()
        # Each Redis client connects (a Cluster client learns its slots) before traffic comes:
        # a first burst would otherwise pay for that inside l2.timeout, and a call that runs
        # out of it counts against the breaker, or loses a cluster lease. With Redis up, L1 is
        # trusted from the first request; without, it serves in degraded mode until subscribed.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(SUBSCRIBE_WAIT):
                await asyncio.gather(*self._connections())
        if self.write_behind is not None and self.flushes:
            self.write_behind.start()

    def _connections(self) -> list[Awaitable[object]]:
        waits: list[Awaitable[object]] = []
        if self.coherence is not None:
            waits.append(self.coherence.first_attempt())
        if self.l2 is not None:
            waits.append(self.l2.connect())
        if self.cache.leases is not None:
            waits.append(self.cache.leases.connect())
        if self.write_behind is not None:
            waits.append(self.write_behind.queue.connect())
        return waits

    async def aclose(self) -> None:
        if self.write_behind is not None and not self.flushes:
            await self.write_behind.queue.aclose()
        elif self.write_behind is not None:
            grace = self.settings.server.shutdown_grace
            if self.stopping_since is not None:
                grace -= asyncio.get_running_loop().time() - self.stopping_since
            await self.write_behind.aclose(max(0.0, grace))
        await self.cache.aclose()
        # Last: the drain and the cache's last L2 deletes still announce their changes.
        if self.coherence is not None:
            await self.coherence.aclose()
        await self.origin.aclose()


def _leases(settings: Settings, guard: Guard) -> Leases | None:
    """Leases for the routes with ``coalesce: cluster``; None without any."""
    url = settings.l2.url
    if url is None or all(route.coalesce is Coalesce.LOCAL for route in settings.routes):
        return None
    return Leases(
        client_from_url(url, timeout=settings.l2.timeout),
        key_prefix=settings.l2.key_prefix,
        timeout=settings.l2.timeout,
        # Longer than the winner's fetch may take: past it, the others fetch themselves.
        hold=settings.upstream.timeout + 1.0,
        guard=guard,
    )


def _coherence(
    settings: Settings, cache: TieredCache, clock: Clock, observer: CacheObserver, guard: Guard
) -> Coherence:
    assert settings.l2.url is not None
    replica = replica_name()
    coherence = Coherence(
        client_from_url(settings.l2.url, timeout=settings.l2.timeout),
        listener_client(
            settings.l2.url, name=f"cachecar-coherence-{replica}", timeout=settings.l2.timeout
        ),
        settings.coherence.channel,
        local=cache,
        clock=clock,
        timeout=settings.l2.timeout,
        replica=replica,
        observer=observer,
        guard=guard,
        degraded_ttl=settings.coherence.degraded_ttl,
    )
    cache.announce = coherence.publish
    return coherence


def _write_behind(
    settings: Settings,
    cache: TieredCache,
    origin: OriginClient,
    router: Router,
    clock: Clock,
    observer: CacheObserver,
    guard: Guard,
) -> WriteBehind:
    assert settings.l2.url is not None
    config = settings.write_behind
    queue = WriteQueue(
        # A client of its own: queue calls have their own timeout, longer than a cache read's.
        client_from_url(settings.l2.url, timeout=config.timeout),
        key_prefix=settings.l2.key_prefix,
        timeout=config.timeout,
        clock=clock,
        max_pending=config.max_pending,
        # Writes of a key within one interval become one origin write.
        coalesce_for=config.flush_interval,
        guard=guard,
        shards=config.shards,
        reshard=config.reshard,
    )
    flusher = Flusher(
        queue,
        OriginSink(origin, router.name_of),
        clock=clock,
        interval=config.flush_interval,
        batch_size=config.batch_size,
        concurrency=config.concurrency,
        max_attempts=config.max_attempts,
        backoff=Backoff(config.backoff.initial, config.backoff.max),
        send_timeout=settings.upstream.timeout + 1.0,
        on_dead=cache.invalidate,
        observer=observer,
    )
    return WriteBehind(cache, queue, flusher, observer)


RUNTIME = web.AppKey("runtime", Runtime)
SUBSCRIBE_WAIT = 2.0  # seconds a start waits for Redis: its connections, the subscription


def build_proxy_app(
    settings: Settings,
    *,
    clock: Clock | None = None,
    observer: CacheObserver | None = None,
    registry: CollectorRegistry | None = None,
    flushes: bool = True,
) -> web.Application:
    """The proxy app; its metrics go to ``registry`` (a new one when not given). ``flushes``:
    whether it flushes the write-behind queue (False: a supervisor's, serving no traffic)."""
    app = web.Application(client_max_size=settings.server.max_body)
    clock = clock or SystemClock()

    async def runtime(app: web.Application) -> AsyncIterator[None]:
        metrics = Metrics(clock, registry)
        app[RUNTIME] = Runtime.open(settings, clock, metrics, observer)
        app[RUNTIME].flushes = flushes
        await app[RUNTIME].start()
        yield
        await app[RUNTIME].aclose()

    async def handle(request: web.Request) -> web.StreamResponse:
        return await request.app[RUNTIME].proxy(request)

    app.cleanup_ctx.append(runtime)
    app.router.add_route("*", "/{path:.*}", handle)
    return app
