"""Running the proxy: two listeners, one cache, a clean stop on SIGTERM or SIGINT.

start: proxy app (opens origin client, Redis client, cache) -> admin app -> both listen
SIGTERM/SIGINT: stop accepting -> finish in-flight requests within server.shutdown_grace
                -> flush the write-behind queue within what is left of the grace (the rest stays
                   queued in Redis for the next start) -> wait for background L2 writes
                -> close clients
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from importlib.metadata import version
from pathlib import Path

from aiohttp import web
from prometheus_client import disable_created_metrics

from cache.redis.tier import MEMORY_URL
from proxy.admin import build_admin_app, build_worker_app
from proxy.app import RUNTIME, build_proxy_app
from proxy.listen import WORKER_SOCKET, listen_on, proxy_site
from proxy.logs import AccessLog, quiet_malformed_requests, redact
from proxy.settings import Settings
from proxy.workers import supervise

logger = logging.getLogger("cachecar")


async def serve(
    settings: Settings, *, stop: asyncio.Event | None = None, config: Path | None = None
) -> None:
    """Serve until ``stop`` is set (or a signal arrives), then stop gracefully.

    With ``server.workers`` above 1 this process supervises that many workers (``proxy.workers``,
    each started with ``config``) and serves the admin listener for all of them.
    """
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    # Installed for the life of the loop: a second signal while stopping is absorbed, so the
    # graceful stop is never cut short by the default handler (it is bounded by the grace).
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    # One series per metric: the *_created timestamps only double what a scrape transfers.
    disable_created_metrics()  # type: ignore[no-untyped-call]
    quiet_malformed_requests()
    worker = os.environ.get(WORKER_SOCKET)
    if settings.server.workers > 1 and worker is None:
        await supervise(settings, config, stop)
        logger.info("stopped")
        return
    orphaned = asyncio.create_task(_stop_when_orphaned(stop)) if worker else None
    with AccessLog() if settings.server.access_log else contextlib.nullcontext():
        await _run(settings, stop, worker)
    if orphaned is not None:
        orphaned.cancel()
    logger.info("stopped")


async def _stop_when_orphaned(stop: asyncio.Event) -> None:
    """A worker whose supervisor died (kill -9 leaves no time to stop it) stops by itself."""
    parent = os.getppid()
    while parent != 1:  # 1: adopted by init already, the supervisor gone before we looked
        await asyncio.sleep(1.0)  # no event tells of a parent's death: look once a second
        if os.getppid() != parent:
            break
    logger.warning("the supervisor (pid %d) is gone: stopping", parent)
    stop.set()


async def _run(settings: Settings, stop: asyncio.Event, worker: str | None) -> None:
    """The proxy and admin listeners; a worker (``worker``: its socket) serves the proxy port
    beside the other workers, and its figures to the supervisor on that socket."""
    loop = asyncio.get_running_loop()
    grace = settings.server.shutdown_grace
    proxy_app = build_proxy_app(settings)
    limits = settings.server
    proxy_runner = web.AppRunner(
        proxy_app,
        access_log=None,
        shutdown_timeout=grace,
        # aiohttp answers 400 naming the limit ("Got more than N bytes when reading ...").
        max_line_size=limits.max_header_size,
        max_field_size=limits.max_header_size,
        max_headers=limits.max_headers,
        # Closes a connection that has not sent a whole request head for this long: idle
        # keep-alive connections, and heads sent a byte at a time (slowloris).
        keepalive_timeout=limits.idle_timeout,
    )
    await proxy_runner.setup()
    admin_app = build_admin_app(proxy_app) if worker is None else build_worker_app(proxy_app)
    admin_runner = web.AppRunner(admin_app, access_log=None, shutdown_timeout=1)
    await admin_runner.setup()
    try:
        address = settings.server.listen
        await listen_on(proxy_site(proxy_app, proxy_runner, settings, worker is not None), address)
        if worker is None:
            admin = settings.admin.listen
            await listen_on(web.TCPSite(admin_runner, admin.host, admin.port), admin)
            cached = sum(route.cached for route in proxy_app[RUNTIME].proxy.routes)
            _announce(settings, cached, proxy_app[RUNTIME].write_behind is not None)
        else:
            # "@name": the abstract socket "\0name" (the supervisor's way to say it).
            path = "\0" + worker[1:] if worker.startswith("@") else worker
            await web.UnixSite(admin_runner, path).start()
            logger.info("worker %d serving http://%s", os.getpid(), address)
        await stop.wait()
        proxy_app[RUNTIME].stopping_since = loop.time()
        logger.info("stopping: finishing in-flight requests (up to %gs)", grace)
    finally:
        await admin_runner.cleanup()
        await proxy_runner.cleanup()


def _announce(settings: Settings, routes: int, write_behind: bool) -> None:
    logger.info(
        "cachecar %s proxying http://%s -> %s (%d cached route%s, others passed through)",
        version("cachecar"),
        settings.server.listen,
        settings.upstream.url,
        routes,
        "" if routes == 1 else "s",
    )
    logger.info(
        "admin on http://%s: /dashboard, /metrics, /admin/stats, /healthz, /readyz",
        settings.admin.listen,
    )
    url = settings.l2.url
    if url is None:
        logger.info("L2: none (l2.url is not set): L1 and the origin only")
    elif url.startswith(MEMORY_URL):
        logger.info("L2: memory:// (in this process only: not shared between replicas)")
    else:
        logger.info("L2: %s, keys under %r", redact(url), settings.l2.key_prefix)
    if write_behind and url is not None and url.startswith(MEMORY_URL):
        logger.warning(
            "write-behind queue is in memory:// (in this process): writes acknowledged but not "
            "yet flushed are LOST if the process dies; set l2.url to a Redis for a durable queue"
        )
    elif write_behind:
        logger.info(
            "write-behind queue in Redis: acknowledged writes survive a crash of this process"
        )
