"""The admin listener (``admin.listen``, 127.0.0.1 by default).

    GET  /healthz                       200 while the process lives
    GET  /readyz                        200 when the origin and L2 answer; 503 naming what does not
                                        (L2's ping may be the L2 breaker's probe), and
                                        how L1 serves (coherence: subscribed, degraded ...)
    GET  /metrics                       Prometheus exposition (``proxy.metrics``)
    GET  /admin/stats                   the same figures as JSON: last minute and since start
    GET  /dashboard                     a live page over /admin/stats (``proxy/static``)
    POST /admin/purge                   a key, prefix or tag dropped everywhere   (bearer token)
    GET  /admin/write-behind            queue depth, oldest pending age, dead letters
    POST /admin/write-behind/replay     dead letters queued again          (bearer token)

Read-only calls need no token. A mutating call answers 401 without ``Authorization: Bearer``,
403 with a wrong token, and 403 while ``admin.token`` is empty: no token configured means no
one may mutate, never that anyone may.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
from importlib import resources
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from cache.breaker import Guard
from cache.errors import CacheError, CircuitOpen, TierError, TierUnavailable
from cache.redis.tier import RedisTier
from cache.write_behind.records import describe
from proxy.app import RUNTIME, Runtime
from proxy.stats import coherence_state

PROXY_APP = web.AppKey("proxy_app", web.Application)
_NO_STORE = {"Cache-Control": "no-store"}
DEAD_LETTERS_SHOWN = 100


class Aggregate(Protocol):
    """The figures of several worker processes as one (``proxy.workers``)."""

    async def registry(self) -> CollectorRegistry: ...

    async def stats(self) -> dict[str, Any]: ...

    @property
    def up(self) -> int: ...


WORKERS = web.AppKey("workers", Aggregate)


def build_admin_app(
    proxy_app: web.Application, workers: Aggregate | None = None
) -> web.Application:
    """The admin listener's app; ``proxy_app`` must be started first. With ``workers``, the
    figures are theirs (``proxy_app`` serves no traffic: it is the supervisor's, for the admin
    calls that act through Redis)."""
    app = web.Application()
    app[PROXY_APP] = proxy_app
    if workers is not None:
        app[WORKERS] = workers
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/admin/stats", stats)
    app.router.add_get("/dashboard", dashboard)
    app.router.add_post("/admin/purge", purge)
    app.router.add_get("/admin/write-behind", write_behind)
    app.router.add_post("/admin/write-behind/replay", replay)
    return app


def build_worker_app(proxy_app: web.Application) -> web.Application:
    """A worker's figures for its supervisor (``proxy.workers``), on a Unix socket."""
    app = web.Application()
    app[PROXY_APP] = proxy_app
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/worker/stats", worker_stats)
    return app


async def worker_stats(request: web.Request) -> web.Response:
    runtime = request.app[PROXY_APP][RUNTIME]
    await runtime.metrics.refresh()
    return web.json_response(
        {"snapshot": runtime.metrics.snapshot(), "window": runtime.metrics.window.dump()}
    )


def _error(status: int, error: str, detail: str) -> web.Response:
    return web.json_response({"error": error, "detail": detail}, status=status)


def _refused(request: web.Request) -> web.Response | None:
    """Why a mutating call may not proceed, or None when its bearer token is right."""
    token = request.app[PROXY_APP][RUNTIME].settings.admin.token
    if not token:
        return _error(
            403, "admin calls disabled", "no admin.token is configured, so mutating calls are off"
        )
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given:
        response = _error(401, "unauthorized", "send Authorization: Bearer <admin.token>")
        response.headers["WWW-Authenticate"] = 'Bearer realm="cachecar admin"'
        return response
    if not hmac.compare_digest(given.strip().encode(), token.encode()):
        return _error(403, "forbidden", "the bearer token is not admin.token")
    return None


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "alive"})


async def readyz(request: web.Request) -> web.Response:
    """200 when the origin and L2 answer; 503 naming what does not."""
    runtime = request.app[PROXY_APP][RUNTIME]
    checks = {"origin": runtime.origin.probe(runtime.settings.upstream.health_path)}
    if runtime.l2 is not None:
        checks["l2"] = _l2_problem(runtime.l2, runtime.guard)
    workers = request.app.get(WORKERS)
    state = asyncio.ensure_future(_coherence(runtime, workers))  # asked beside the checks
    results = dict(zip(checks, await asyncio.gather(*checks.values()), strict=True))
    problems = {name: problem for name, problem in results.items() if problem is not None}
    body = {name: problems.get(name, "up") for name in results}
    if workers is not None:  # the supervisor's: ready while any worker serves the port
        running, wanted = workers.up, runtime.settings.server.workers
        body["workers"] = f"{running} of {wanted} up"
        if running == 0:
            problems["workers"] = f"none of {wanted} workers is running"
    # Not a reason to be unready: degraded mode serves, and L2's own check says why.
    body["coherence"] = await state
    if problems:
        reason = "; ".join(f"{name}: {problem}" for name, problem in problems.items())
        return web.json_response({"status": "unavailable", "reason": reason, **body}, status=503)
    return web.json_response({"status": "ready", **body})


async def _coherence(runtime: Runtime, workers: Aggregate | None) -> str:
    """How L1 serves (``proxy.stats.coherence_state``); the supervisor's: every worker's,
    "subscribed" only while all of them are."""
    if workers is not None:
        return str((await workers.stats())["coherence"]["state"])
    return coherence_state(runtime.metrics.figures())


async def metrics(request: web.Request) -> web.Response:
    runtime = request.app[PROXY_APP][RUNTIME]
    workers = request.app.get(WORKERS)
    if workers is not None:
        registry = await workers.registry()  # every worker's, added up
    else:
        await runtime.metrics.refresh()
        registry = runtime.metrics.registry
    # Prometheus asks for OpenMetrics or the text format in Accept; either is served.
    encode, content_type = choose_encoder(request.headers.get("Accept", ""))
    return web.Response(body=encode(registry), headers={"Content-Type": content_type})


async def stats(request: web.Request) -> web.Response:
    runtime = request.app[PROXY_APP][RUNTIME]
    workers = request.app.get(WORKERS)
    await runtime.metrics.refresh()
    snapshot = await workers.stats() if workers is not None else runtime.metrics.snapshot()
    return web.json_response(snapshot, headers=_NO_STORE)


async def dashboard(request: web.Request) -> web.Response:
    return web.Response(body=_page(), content_type="text/html", charset="utf-8", headers=_NO_STORE)


@functools.cache
def _page() -> bytes:
    return resources.files("proxy").joinpath("static/dashboard.html").read_bytes()


async def _l2_problem(l2: RedisTier, guard: Guard) -> str | None:
    """Why L2 is not ready, or None: a ping within ``l2.timeout``.

    The ping is one of the process's L2 calls while the breaker lets calls through: it counts
    towards opening it, and in half-open it may be the probe, so a proxy that gets no traffic
    (a load balancer holds it back until it is ready) still closes its breaker. While the
    breaker refuses calls, a plain ping still says whether Redis answers now, and tells the
    breaker nothing: readiness is not traffic, and a PING answered is weaker evidence than
    the calls that opened it (a Redis too slow for scripts may still answer PING).
    """
    try:
        async with guard.call("ping"):
            await l2.ping()
    except CircuitOpen:
        try:
            await l2.ping()
        except TierUnavailable as exc:
            return f"{exc} (circuit breaker open)"
    except TierUnavailable as exc:
        return str(exc)
    return None


PURGE_BY = ("key", "prefix", "tag")


async def purge(request: web.Request) -> web.Response:
    """Drop a key, every key with a prefix, or every key with a tag, on every replica."""
    refused = _refused(request)
    if refused is not None:
        return refused
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError):
        return _error(400, "bad purge", 'the body is not JSON; send {"key": "users:1"}')
    if not isinstance(body, dict):
        return _error(400, "bad purge", 'send a JSON object: {"key"|"prefix"|"tag": "..."}')
    unknown = sorted(set(body) - set(PURGE_BY))
    if unknown:
        return _error(400, "bad purge", f"unknown field {unknown[0]!r}: use key, prefix or tag")
    if len(body) != 1:
        return _error(400, "bad purge", "give exactly one of key, prefix or tag")
    ((by, value),) = body.items()
    if not isinstance(value, str) or not value:
        return _error(400, "bad purge", f"{by} must be a non-empty string")
    purger = request.app[PROXY_APP][RUNTIME].purger
    try:
        if by == "key":
            purged = await purger.key(value)
        elif by == "prefix":
            purged = await purger.prefix(value)
        else:
            purged = await purger.tag(value)
    except TierError as exc:
        return _error(503, "purge incomplete", f"{exc}; what was dropped stays dropped: retry")
    return web.json_response({"purged": purged})


async def write_behind(request: web.Request) -> web.Response:
    """The queue as every replica sees it (it lives in Redis): depth, lag, dead letters."""
    wb = request.app[PROXY_APP][RUNTIME].write_behind
    if wb is None:
        return web.json_response(
            {
                "enabled": False,
                "queue_depth": 0,
                "oldest_pending_age_seconds": 0.0,
                "dead_letter_count": 0,
                "dead_letters": [],
            }
        )
    try:
        stats = await wb.queue.stats()
        letters = await wb.queue.dead_letters(DEAD_LETTERS_SHOWN)
    except TierError as exc:
        return _error(503, "write-behind queue unavailable", str(exc))
    return web.json_response({"enabled": True, **describe(stats, letters)})


async def replay(request: web.Request) -> web.Response:
    refused = _refused(request)
    if refused is not None:
        return refused
    wb = request.app[PROXY_APP][RUNTIME].write_behind
    if wb is None:
        return _error(404, "write-behind not enabled", "no route has mode: write-behind")
    try:
        replayed = await wb.replay()
    except CacheError as exc:
        return _error(503, "write-behind queue unavailable", str(exc))
    return web.json_response({"replayed": replayed})
