"""The metrics and /admin/stats: exact figures after known sequences of requests."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.parser import text_string_to_metric_families
from pytest_aiohttp import AiohttpClient
from redis.asyncio import Redis

from cache.errors import TierUnavailable
from cache.memory import MemoryTier
from cache.write_behind.records import QueueStats
from proxy.admin import build_admin_app
from proxy.app import RUNTIME, build_proxy_app
from proxy.metrics import REQUEST_BUCKETS, Metrics, method_label, origin_failed
from proxy.stats import LATENCY_BOUNDS, OUTCOMES, Window
from tests.fakes import FakeClock, RecordingObserver
from tests.ports import free_port
from tests.proxy.conftest import ROUTES, MakeProxy, Origin, raw, settings_for

Client = TestClient[web.Request, web.Application]

USERS = "/users/{id}"

# The contract: the metric table of docs/observability.md, as the exposition names its families
# (a counter's family drops ``_total``).
OBSERVABILITY = Path(__file__).resolve().parents[2] / "docs" / "observability.md"


def documented_metrics() -> dict[str, str]:
    """Every metric the table of docs/observability.md lists, with its type."""
    found: dict[str, str] = {}
    for row in re.finditer(
        r"^\| (`[a-z0-9_]+`(?:, `[a-z0-9_]+`)*) \| (\w+) \|", OBSERVABILITY.read_text(), re.M
    ):
        for name in re.findall(r"`([a-z0-9_]+)`", row.group(1)):
            kind = row.group(2)
            found["cachecar_" + (name.removesuffix("_total") if kind == "counter" else name)] = kind
    return found


def registry_of(proxy: Client | web.Application) -> CollectorRegistry:
    app = proxy if isinstance(proxy, web.Application) else proxy.app
    return app[RUNTIME].metrics.registry


def value(proxy: Client | web.Application, name: str, **labels: str) -> float:
    """One sample's value; 0 when the series does not exist."""
    found = registry_of(proxy).get_sample_value(name, labels)
    return 0.0 if found is None else found


def total(proxy: Client | web.Application, name: str, **labels: str) -> float:
    """The sum of every series of ``name`` whose labels include ``labels``."""
    return sum(
        sample.value
        for family in registry_of(proxy).collect()
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


def hit_ratio(proxy: Client) -> float:
    """docs/observability.md's PromQL hit ratio, on the counters themselves instead of their
    rates."""
    count = "cachecar_request_duration_seconds_count"
    hits = total(proxy, count, outcome="hit_l1") + total(proxy, count, outcome="hit_l2")
    reads = hits + sum(
        total(proxy, count, outcome=outcome) for outcome in ("miss", "stale", "revalidated")
    )
    return hits / reads


def tier_ratio(proxy: Client, tier: str) -> float:
    hits = value(proxy, "cachecar_cache_lookups_total", tier=tier, result="hit")
    misses = value(proxy, "cachecar_cache_lookups_total", tier=tier, result="miss")
    return hits / (hits + misses)


async def admin_of(aiohttp_client: AiohttpClient, proxy: Client) -> Client:
    return await aiohttp_client(build_admin_app(proxy.app))


async def test_a_miss_nine_l1_hits_then_two_l2_hits_after_a_restart_are_counted_exactly(
    make_proxy: MakeProxy,
    origin: Origin,
    redis_url: str,
    key_prefix: str,
    redis_client: Redis,
    aiohttp_client: AiohttpClient,
) -> None:
    first = await make_proxy(l2=redis_url, key_prefix=key_prefix)
    answers = [(await first.get("/users/1")).headers["X-Cache"] for _ in range(10)]
    assert answers == ["MISS"] + ["HIT-L1"] * 9
    await asyncio.sleep(0.05)  # the L2 fill finishes after the response
    assert (await first.get("/users/2")).headers["X-Cache"] == "MISS"
    await asyncio.sleep(0.05)

    count = "cachecar_request_duration_seconds_count"
    assert value(first, count, route=USERS, outcome="miss") == 2
    assert value(first, count, route=USERS, outcome="hit_l1") == 9
    assert value(first, count, route=USERS, outcome="hit_l2") == 0
    assert value(first, "cachecar_requests_total", route=USERS, method="GET", status="200") == 11
    assert value(first, "cachecar_cache_lookups_total", tier="l1", result="hit") == 9
    assert value(first, "cachecar_cache_lookups_total", tier="l1", result="miss") == 2
    assert value(first, "cachecar_cache_lookups_total", tier="l2", result="miss") == 2
    assert value(first, "cachecar_cache_lookups_total", tier="l2", result="hit") == 0
    assert (
        value(first, "cachecar_origin_requests_total", route=USERS, method="GET", status="200") == 2
    )
    assert value(first, "cachecar_origin_request_duration_seconds_count", route=USERS) == 2
    assert hit_ratio(first) == 9 / 11
    assert tier_ratio(first, "l1") == 9 / 11
    assert tier_ratio(first, "l2") == 0

    restarted = await make_proxy(l2=redis_url, key_prefix=key_prefix)
    assert (await restarted.get("/users/1")).headers["X-Cache"] == "HIT-L2"
    assert (await restarted.get("/users/2")).headers["X-Cache"] == "HIT-L2"
    assert value(restarted, count, route=USERS, outcome="hit_l2") == 2
    assert value(restarted, count, route=USERS, outcome="miss") == 0
    assert value(restarted, "cachecar_cache_lookups_total", tier="l1", result="miss") == 2
    assert value(restarted, "cachecar_cache_lookups_total", tier="l2", result="hit") == 2
    assert total(restarted, "cachecar_origin_requests_total") == 0
    assert hit_ratio(restarted) == 1.0
    assert tier_ratio(restarted, "l1") == 0
    assert tier_ratio(restarted, "l2") == 1.0

    stats = await (await (await admin_of(aiohttp_client, first)).get("/admin/stats")).json()
    assert stats["hit_ratio"]["overall"]["since_start"] == 9 / 11
    assert stats["hit_ratio"]["l1"]["since_start"] == 9 / 11
    assert stats["hit_ratio"]["l2"]["since_start"] == 0
    assert stats["requests_total"] == {
        "hit_l1": 9, "hit_l2": 0, "miss": 2, "stale": 0, "revalidated": 0, "bypass": 0,
        "write": 0, "total": 11,
    }  # fmt: skip
    assert stats["origin"]["requests_total"] == 2
    assert stats["origin"]["errors_total"] == 0


async def test_metrics_endpoint_exports_every_documented_metric_with_its_type(
    make_proxy: MakeProxy, aiohttp_client: AiohttpClient
) -> None:
    # A write-behind route: the queue's gauges are exported with a queue only.
    routes = ROUTES + "  - path: /carts/{id}\n    key: 'carts:{id}'\n    mode: write-behind\n"
    proxy = await make_proxy(routes=routes)
    await proxy.get("/users/1")
    response = await (await admin_of(aiohttp_client, proxy)).get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain;")
    families = {f.name: f.type for f in text_string_to_metric_families(await response.text())}
    documented = documented_metrics()
    assert len(documented) >= 20, "the table of docs/observability.md was not read"
    for name, kind in documented.items():
        assert families.get(name) == kind, name
    # *_created: ``cachecar serve`` turns those off (proxy/server.py); this app did not.
    own = {n for n in families if n.startswith("cachecar_") and not n.endswith("_created")}
    assert own <= documented.keys(), "exported but not in docs/observability.md"


async def test_series_that_queries_divide_by_exist_at_zero_before_any_traffic(
    make_proxy: MakeProxy,
) -> None:
    proxy = await make_proxy()
    for tier in ("l1", "l2"):
        for result in ("hit", "miss"):
            assert (
                registry_of(proxy).get_sample_value(
                    "cachecar_cache_lookups_total", {"tier": tier, "result": result}
                )
                == 0
            )
    for source in ("write", "remote", "admin"):
        assert value(proxy, "cachecar_invalidations_total", source=source) == 0
    for result in ("ok", "retry", "dead"):
        assert (
            registry_of(proxy).get_sample_value(
                "cachecar_write_behind_flushed_total", {"result": result}
            )
            == 0
        )
    assert registry_of(proxy).get_sample_value("cachecar_l2_breaker_open") == 0


async def test_labels_stay_bounded_whatever_the_paths_and_methods(
    make_proxy: MakeProxy, origin: Origin
) -> None:
    proxy = await make_proxy()
    for n in range(5):
        await proxy.get(f"/nowhere/{n}")
        await proxy.get(f"/users/{n}")
    await proxy.request("PROPFIND", "/users/1")
    assert (await proxy.session.get(raw(proxy, "/users/%zz"))).status == 400  # cannot be normalized

    routes = {
        sample.labels["route"]
        for family in registry_of(proxy).collect()
        for sample in family.samples
        if "route" in sample.labels
    }
    configured = {route.name for route in proxy.app[RUNTIME].proxy.routes}
    assert {USERS, "unmatched"} <= routes <= configured | {"unmatched"}  # never /users/3
    assert (
        value(proxy, "cachecar_requests_total", route="unmatched", method="GET", status="200") == 5
    )
    assert (
        value(proxy, "cachecar_requests_total", route="unmatched", method="GET", status="400") == 1
    )
    assert value(proxy, "cachecar_requests_total", route=USERS, method="other", status="200") == 1
    count = "cachecar_request_duration_seconds_count"
    assert value(proxy, count, route="unmatched", outcome="bypass") == 6
    # PROPFIND, a method cachecar does not know, is taken for a write (RFC 9111 §4.4).
    assert value(proxy, count, route=USERS, outcome="write") == 1
    assert (
        value(
            proxy, "cachecar_origin_requests_total", route="unmatched", method="GET", status="200"
        )
        == 5
    )


async def test_writes_count_as_write_outcomes_and_invalidations(
    make_proxy: MakeProxy, origin: Origin
) -> None:
    proxy = await make_proxy()
    await proxy.get("/users/1")
    assert (await proxy.put("/users/1", data=b"{}")).status == 200
    assert (await proxy.delete("/users/2")).status == 200
    count = "cachecar_request_duration_seconds_count"
    assert value(proxy, count, route=USERS, outcome="write") == 2
    assert value(proxy, "cachecar_invalidations_total", source="write") == 2
    assert value(proxy, "cachecar_l1_evictions_total", reason="invalidated") == 1
    assert (
        value(proxy, "cachecar_origin_requests_total", route=USERS, method="PUT", status="200") == 1
    )


async def test_concurrent_misses_count_the_waiters_as_coalesced(
    make_proxy: MakeProxy, origin: Origin, observer: RecordingObserver
) -> None:
    proxy = await make_proxy()
    origin.gate = asyncio.Event()
    requests = [asyncio.create_task(proxy.get("/users/1")) for _ in range(10)]
    for _ in range(200):
        if observer.lookups["l1", False] == 10:
            break
        await asyncio.sleep(0.01)
    origin.gate.set()
    await asyncio.gather(*requests)
    assert value(proxy, "cachecar_coalesced_requests_total", route=USERS) == 9
    assert (
        value(proxy, "cachecar_origin_requests_total", route=USERS, method="GET", status="200") == 1
    )
    assert (
        value(proxy, "cachecar_request_duration_seconds_count", route=USERS, outcome="miss") == 10
    )


async def test_an_origin_that_does_not_answer_is_counted_by_why(make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(upstream=f"http://127.0.0.1:{free_port()}")
    assert (await proxy.get("/users/1")).status == 502
    assert (await proxy.get("/nowhere")).status == 502
    assert (
        value(
            proxy, "cachecar_origin_requests_total", route=USERS, method="GET", status="unreachable"
        )
        == 1
    )
    assert (
        value(
            proxy,
            "cachecar_origin_requests_total",
            route="unmatched",
            method="GET",
            status="unreachable",
        )
        == 1
    )
    assert value(proxy, "cachecar_requests_total", route=USERS, method="GET", status="502") == 1
    assert value(proxy, "cachecar_request_duration_seconds_count", route=USERS, outcome="miss") == 1


async def test_l1_size_gauges_and_expiry_evictions(
    make_proxy: MakeProxy, clock: FakeClock, aiohttp_client: AiohttpClient
) -> None:
    proxy = await make_proxy("l1: {ttl: 30s}\n", l2="")
    for n in range(3):
        await proxy.get(f"/users/{n}")
    l1 = proxy.app[RUNTIME].cache.l1
    assert isinstance(l1, MemoryTier)
    assert value(proxy, "cachecar_l1_entries") == l1.entries == 3
    assert value(proxy, "cachecar_l1_bytes") == l1.bytes > 0
    clock.advance(31)
    assert (await proxy.get("/users/0")).headers["X-Cache"] == "MISS"
    assert value(proxy, "cachecar_l1_evictions_total", reason="expired") >= 1
    stats = await (await (await admin_of(aiohttp_client, proxy)).get("/admin/stats")).json()
    assert stats["l1"]["entries"] == l1.entries
    assert stats["l1"]["max_entries"] == 10000
    assert stats["l2"] == {"enabled": False, "breaker": "closed", "errors_total": 0}


async def test_l2_failures_count_errors_and_open_the_breaker_gauge(
    make_proxy: MakeProxy, aiohttp_client: AiohttpClient
) -> None:
    dead = f"redis://127.0.0.1:{free_port()}"
    breaker = "{failures: 2, reset_after: 1h}"
    proxy = await make_proxy(f"l2: {{url: {dead!r}, timeout: 200ms, breaker: {breaker}}}\n", l2="")
    assert (await proxy.get("/users/0")).status == 200
    # The first miss: its L2 get fails, then its L2 fill, in the background; the breaker opens
    # on the second failure, and no later request asks Redis.
    for _ in range(200):
        if value(proxy, "cachecar_l2_errors_total", op="set"):
            break
        await asyncio.sleep(0.01)
    for n in range(1, 4):
        assert (await proxy.get(f"/users/{n}")).status == 200
    assert value(proxy, "cachecar_l2_errors_total", op="get") == 1
    assert value(proxy, "cachecar_l2_errors_total", op="set") == 1
    assert value(proxy, "cachecar_l2_breaker_open") == 1
    stats = await (await (await admin_of(aiohttp_client, proxy)).get("/admin/stats")).json()
    assert stats["l2"]["breaker"] == "open"
    assert stats["l2"]["errors_total"] == total(proxy, "cachecar_l2_errors_total")


WRITE_BEHIND = """
routes:
  - path: /carts/{id}
    key: "carts:{id}"
    mode: write-behind
"""


async def test_write_behind_figures_follow_the_queue(
    make_proxy: MakeProxy,
    origin: Origin,
    clock: FakeClock,
    redis_url: str,
    key_prefix: str,
    redis_client: Redis,
    aiohttp_client: AiohttpClient,
) -> None:
    proxy = await make_proxy(
        "write_behind: {flush_interval: 1h}\n",
        routes=WRITE_BEHIND,
        l2=redis_url,
        key_prefix=key_prefix,
    )
    admin = await admin_of(aiohttp_client, proxy)
    for body in (b"1", b"2", b"3"):
        assert (await proxy.put("/carts/1", data=body)).status == 202
    assert (await proxy.put("/carts/2", data=b"x")).status == 202
    clock.advance(5)

    metrics = {
        f.name: f
        for f in text_string_to_metric_families(await (await admin.get("/metrics")).text())
    }
    assert metrics["cachecar_write_behind_queue_depth"].samples[0].value == 2
    assert metrics["cachecar_write_behind_oldest_age_seconds"].samples[0].value == pytest.approx(5)
    assert value(proxy, "cachecar_write_behind_coalesced_total") == 2
    assert (
        value(
            proxy, "cachecar_request_duration_seconds_count", route="/carts/{id}", outcome="write"
        )
        == 4
    )

    clock.advance(3600)
    wb = proxy.app[RUNTIME].write_behind
    assert wb is not None
    assert await wb.flusher.flush_once() == 2
    stats = await (await admin.get("/admin/stats")).json()
    assert stats["write_behind"] == {
        "enabled": True, "available": True, "queue_depth": 0, "oldest_pending_age_seconds": 0.0,
        "dead_letters": 0, "flushed_total": {"ok": 2, "retry": 0, "dead": 0}, "coalesced_total": 2,
    }  # fmt: skip
    assert value(proxy, "cachecar_write_behind_flushed_total", result="ok") == 2
    assert (
        value(
            proxy, "cachecar_origin_requests_total", route="/carts/{id}", method="PUT", status="200"
        )
        == 2
    )


async def test_stats_window_reports_the_last_minute_second_by_second(
    make_proxy: MakeProxy, clock: FakeClock, aiohttp_client: AiohttpClient
) -> None:
    proxy = await make_proxy(l2="")
    admin = await admin_of(aiohttp_client, proxy)
    empty = await (await admin.get("/admin/stats")).json()
    assert empty["hit_ratio"]["overall"] == {"last_minute": None, "since_start": None}
    assert empty["latency_seconds"]["all"] is None
    assert empty["history"] == []  # no second has passed yet

    clock.advance(1)
    await proxy.get("/users/1")  # miss
    await proxy.get("/users/1")  # hit
    clock.advance(1)
    for _ in range(3):
        await proxy.get("/users/1")
    clock.advance(1)  # the seconds with traffic are complete now
    stats = await (await admin.get("/admin/stats")).json()
    # The first second (the proxy starting) was quiet: a point of no traffic.
    assert [point["requests"]["hit_l1"] for point in stats["history"]] == [0, 1, 3]
    assert [point["requests"]["miss"] for point in stats["history"]] == [0, 1, 0]
    assert [point["hit_ratio"]["overall"] for point in stats["history"]] == [None, 0.5, 1.0]
    assert [point["origin_requests"] for point in stats["history"]] == [0, 1, 0]
    assert stats["hit_ratio"]["overall"]["last_minute"] == 4 / 5
    assert stats["requests_per_second"]["hit_l1"] == 4 / 3  # 3 seconds since start
    assert set(stats["latency_seconds"]["hit_l1"]) == {"p50", "p95", "p99"}

    clock.advance(61)  # the minute has passed; since-start stays
    later = await (await admin.get("/admin/stats")).json()
    assert len(later["history"]) == 60
    assert sum(point["requests"]["hit_l1"] for point in later["history"]) == 0
    assert later["hit_ratio"]["overall"] == {"last_minute": None, "since_start": 4 / 5}
    assert later["requests_per_second"]["total"] == 0


async def test_access_log_writes_one_json_line_per_request(
    origin: Origin, aiohttp_client: AiohttpClient, caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings_for(origin, extra="server: {access_log: true}\n", l2="")
    proxy = await aiohttp_client(build_proxy_app(settings))
    with caplog.at_level(logging.INFO, logger="cachecar.access"):
        await proxy.get("/users/1?secret=1")
        await proxy.get("/users/1?secret=1")
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "cachecar.access"]
    assert [(line["outcome"], line["cache"], line["status"]) for line in lines] == [
        ("miss", "MISS", 200),
        ("hit_l1", "HIT-L1", 200),
    ]
    assert lines[0]["route"] == USERS
    assert lines[0]["method"] == "GET"
    assert lines[0]["path"] == "/users/1"  # never the query: it may carry secrets
    assert lines[0]["duration_ms"] >= 0


async def test_no_access_log_unless_asked(
    make_proxy: MakeProxy, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = await make_proxy()
    with caplog.at_level(logging.INFO, logger="cachecar.access"):
        await proxy.get("/users/1")
    assert [r for r in caplog.records if r.name == "cachecar.access"] == []


async def test_dashboard_page_is_served_whole_with_nothing_to_fetch_elsewhere(
    make_proxy: MakeProxy, aiohttp_client: AiohttpClient
) -> None:
    admin = await admin_of(aiohttp_client, await make_proxy())
    response = await admin.get("/dashboard")
    assert response.status == 200
    assert response.content_type == "text/html"
    assert response.headers["Cache-Control"] == "no-store"
    page = await response.text()
    assert "admin/stats" in page
    # No script, style, font or image from elsewhere: it works offline (the Chromium test
    # checks the requests the page really makes).
    assert re.findall(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", page) == []
    assert re.findall(r"@import|url\(\s*[\"']?(?:https?:)?//", page) == []


# -- what is not the origin's failure, and what is not a coalesced fetch -------------------------


async def test_a_streamed_body_over_max_body_is_a_413_not_an_origin_error(
    make_proxy: MakeProxy,
) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(8):
            yield b"x" * 512

    proxy = await make_proxy("server: {max_body: 1KiB}\n")
    assert (await proxy.post("/raw/upload", data=chunks())).status == 413
    assert total(proxy, "cachecar_origin_requests_total") == 0
    assert proxy.app[RUNTIME].metrics.snapshot()["origin"]["errors_total"] == 0


@contextlib.asynccontextmanager
async def served_like_cachecar(app: web.Application) -> AsyncIterator[int]:
    """``app`` on a port, served as ``cachecar serve`` serves it (handlers never cancelled)."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield port
    finally:
        await runner.cleanup()


async def test_a_client_that_leaves_mid_upload_is_counted_499_and_nothing_reaches_the_origin(
    origin: Origin, clock: FakeClock
) -> None:
    routes = """
    routes:
      - path: /users/{id}
        key: "users:{id}"
      - path: /items/{id}
        key: "items:{id}"
        mode: write-through
    """
    app = build_proxy_app(settings_for(origin, routes=routes), clock=clock)
    async with served_like_cachecar(app) as port:
        for path in ("/users/1", "/items/1"):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(
                f"PUT {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n".encode()
                + b"x" * 1000
            )
            await writer.drain()
            await asyncio.sleep(0.2)
            writer.transport.abort()  # gone, 99,000 bytes short
        for _ in range(100):
            if total(app, "cachecar_requests_total") == 2:
                break
            await asyncio.sleep(0.05)
    for route in ("/users/{id}", "/items/{id}"):
        assert value(app, "cachecar_requests_total", route=route, method="PUT", status="499") == 1
        assert (
            value(app, "cachecar_request_duration_seconds_count", route=route, outcome="write") == 1
        )
    assert total(app, "cachecar_origin_requests_total") == 0
    assert [r.method for r in origin.received] == []


async def test_an_origin_answer_that_breaks_off_after_its_head_is_an_origin_error(
    make_proxy: MakeProxy, origin: Origin
) -> None:
    async def broken(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": "100000"})
        await response.prepare(request)
        await response.write(b"x" * 10)
        assert request.transport is not None
        request.transport.abort()
        return response

    origin.handlers["/users/9"] = broken
    proxy = await make_proxy()
    assert (await proxy.get("/users/9")).status == 502
    labels = {"route": USERS, "method": "GET"}
    assert value(proxy, "cachecar_origin_requests_total", **labels, status="unreachable") == 1
    assert value(proxy, "cachecar_origin_requests_total", **labels, status="200") == 0


async def test_reads_that_wait_on_one_l2_lookup_are_not_coalesced_origin_fetches(
    make_proxy: MakeProxy, origin: Origin, redis_url: str, key_prefix: str, redis_client: Redis
) -> None:
    first = await make_proxy(l2=redis_url, key_prefix=key_prefix)
    assert (await first.get("/users/1")).headers["X-Cache"] == "MISS"
    await asyncio.sleep(0.1)  # the L2 fill
    second = await make_proxy(l2=redis_url, key_prefix=key_prefix)
    answers = await asyncio.gather(*(second.get("/users/1") for _ in range(20)))
    assert {a.headers["X-Cache"] for a in answers} == {"HIT-L2"}
    assert value(second, "cachecar_coalesced_requests_total", route=USERS) == 0


class FlakyQueue:
    """The queue's figures, or a failure while ``up`` is false."""

    def __init__(self) -> None:
        self.up = False

    async def stats(self) -> QueueStats:
        if not self.up:
            raise TierUnavailable("queue stats", "connection refused")
        return QueueStats(depth=3, oldest_age=1.5, dead=0)


async def test_queue_figures_that_cannot_be_read_say_so_and_the_first_failure_is_logged(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = Metrics(clock)
    queue = FlakyQueue()
    l1 = MemoryTier(max_entries=10, max_bytes=1000, clock=clock)
    metrics.watch(l1, l2=True, coherence=False, queue=queue)  # type: ignore[arg-type]
    readable = "cachecar_write_behind_queue_readable"
    with caplog.at_level(logging.INFO, logger="cachecar.metrics"):
        await metrics.refresh()  # Redis down since the start
        await metrics.refresh()
        assert metrics.registry.get_sample_value(readable) == 0
        assert metrics.snapshot()["write_behind"]["available"] is False
        queue.up = True
        await metrics.refresh()
    assert metrics.registry.get_sample_value(readable) == 1
    assert metrics.registry.get_sample_value("cachecar_write_behind_queue_depth") == 3
    assert metrics.snapshot()["write_behind"]["available"] is True
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [
        "write-behind queue figures unavailable",  # once, not once per scrape
        "write-behind queue figures available again",
    ]


def test_counts_kept_aside_on_the_hit_path_read_as_direct_observations() -> None:
    # request() and lookup() count into dictionaries; whoever reads the registry sees them as
    # if each had been observed at once, bucket by bucket.
    aside = Metrics(FakeClock(), CollectorRegistry())
    reference = CollectorRegistry()
    direct = Histogram("direct_seconds", "", buckets=REQUEST_BUCKETS, registry=reference)
    durations = [0.00005, 0.0001, 0.0003, 0.02, 7.0, 99.0]
    for seconds in durations:
        aside.request("/users/{id}", "GET", 200, "hit_l1", seconds)
        direct.observe(seconds)
    aside.lookup("l1", True)
    aside.lookup("l1", True)
    labels = {"route": "/users/{id}", "outcome": "hit_l1"}
    for bound in [*(str(b) for b in REQUEST_BUCKETS), "+Inf"]:
        expected = reference.get_sample_value("direct_seconds_bucket", {"le": bound})
        found = aside.registry.get_sample_value(
            "cachecar_request_duration_seconds_bucket", labels | {"le": bound}
        )
        assert found == expected, bound
    assert aside.registry.get_sample_value(
        "cachecar_request_duration_seconds_sum", labels
    ) == pytest.approx(sum(durations))
    assert aside.registry.get_sample_value(
        "cachecar_requests_total", {"route": "/users/{id}", "method": "GET", "status": "200"}
    ) == len(durations)
    assert (
        aside.registry.get_sample_value(
            "cachecar_cache_lookups_total", {"tier": "l1", "result": "hit"}
        )
        == 2
    )


# -- the hot path's counts, taken in lazily, read as if each had been counted at once ------------


class CountedAtOnce:
    """What ``Metrics`` must read like: each event counted when it happens, by prometheus_client
    itself and by the window's one-event calls."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("requests", "", ["route", "method", "status"], registry=r)
        self.duration = Histogram(
            "duration", "", ["route", "outcome"], buckets=REQUEST_BUCKETS, registry=r
        )
        self.lookups = Counter("lookups", "", ["tier", "result"], registry=r)
        self.window = Window(clock.time())

    def request(self, route: str, method: str, status: int, outcome: str, seconds: float) -> None:
        self.requests.labels(route, method_label(method), str(status)).inc()
        self.duration.labels(route, outcome).observe(seconds)
        self.window.request(outcome, seconds, self.clock.time())

    def lookup(self, tier: str, hit: bool) -> None:
        self.lookups.labels(tier, "hit" if hit else "miss").inc()
        self.window.lookup(tier, hit, self.clock.time())

    def origin(self, status: str, seconds: float) -> None:
        self.window.origin(origin_failed(status), seconds, self.clock.time())


# The families compared, by their name in each registry.
COMPARED = {
    "cachecar_requests": "requests",
    "cachecar_request_duration_seconds": "duration",
    "cachecar_cache_lookups": "lookups",
}


def counts_in(registry: CollectorRegistry) -> dict[tuple[str, frozenset[Any]], float]:
    """Every sample of the compared families that is not 0, by one name for both registries."""
    found = {}
    for family in registry.collect():
        name = COMPARED.get(family.name, family.name)
        if name not in COMPARED.values():
            continue
        for sample in family.samples:
            if sample.value and not sample.name.endswith("_created"):
                suffix = sample.name[len(family.name) :]
                found[name + suffix, frozenset(sample.labels.items())] = sample.value
    return found


def normalized(dumped: dict[str, Any]) -> dict[str, Any]:
    """A window's dump, with the order things were first counted in left out."""
    return {
        **dumped,
        "requests": {o: n for o, n in dumped["requests"].items() if n},
        "lookups": sorted(dumped["lookups"]),
        "seconds": [
            {
                **second,
                "requests": {o: dict(bins) for o, bins in second["requests"].items()},
                "lookups": sorted(second["lookups"]),
                "origin_bins": dict(second["origin_bins"]),
            }
            for second in dumped["seconds"]
        ],
    }


def assert_same_figures(metrics: Metrics, expected: CountedAtOnce, clock: FakeClock) -> None:
    found, wanted = counts_in(metrics.registry), counts_in(expected.registry)
    sums = {key for key in wanted if key[0] == "duration_sum"}
    assert {k: v for k, v in found.items() if k not in sums} == {
        k: v for k, v in wanted.items() if k not in sums
    }
    # Added in another order (per series, then into the child), so equal to rounding only.
    assert {k: found.get(k) for k in sums} == {
        k: pytest.approx(wanted[k], rel=1e-9, abs=1e-12) for k in sums
    }
    now = clock.time()
    assert metrics.window.snapshot(now) == expected.window.snapshot(now)
    assert normalized(metrics.window.dump()) == normalized(expected.window.dump())


# Durations on either side of every bound, where a bucket or a bin could be off by one.
EDGES = sorted(
    {
        edge
        for bound in (*REQUEST_BUCKETS, *LATENCY_BOUNDS[::7], LATENCY_BOUNDS[-1])
        for edge in (math.nextafter(bound, 0), bound, math.nextafter(bound, math.inf))
    }
)
durations = st.one_of(
    st.sampled_from([0.0, *EDGES]),
    st.floats(min_value=0, max_value=20, allow_nan=False),
    st.floats(min_value=1e-6, max_value=1e-3),
)
answers = st.tuples(
    st.just("answer"),
    st.sampled_from([USERS, "unmatched"]),
    st.sampled_from(["GET", "HEAD", "PROPFIND"]),
    st.sampled_from([200, 404, 502]),
    st.sampled_from(OUTCOMES),
    durations,
    st.booleans(),  # through ``answered`` (else ``request``)
)
events = st.lists(
    st.one_of(
        answers,
        st.tuples(st.just("lookup"), st.sampled_from(["l1", "l2"]), st.booleans()),
        st.tuples(st.just("origin"), st.sampled_from(["200", "503", "timeout"]), durations),
        # Mostly within a second or to the next; sometimes past the minute, or back (NTP).
        st.tuples(
            st.just("tick"),
            st.one_of(
                st.floats(min_value=0, max_value=1.5),
                st.sampled_from([1.0, 61.0, -0.4, -2.0]),
            ),
        ),
        st.tuples(st.just("read")),
    ),
    max_size=80,
)


@settings(deadline=None)
@given(st.floats(min_value=0, max_value=0.999), events)
def test_counts_taken_in_by_the_second_read_exactly_as_counted_at_once(
    start: float, happened: list[tuple[Any, ...]]
) -> None:
    # Whatever the order of answers, lookups, origin requests, seconds passing, the clock
    # stepping back, scrapes and snapshots: every figure equals counting each event at once.
    clock = FakeClock(1_700_000_000.0 + start)
    metrics = Metrics(clock)
    expected = CountedAtOnce(clock)
    for event in happened:
        match event:
            case ("answer", route, method, status, outcome, seconds, direct):
                expected.request(route, method, status, outcome, seconds)
                if direct:
                    series = metrics.series(route, method, status, outcome)
                    metrics.answered(series, seconds, clock.time())
                else:
                    metrics.request(route, method, status, outcome, seconds)
            case ("lookup", tier, hit):
                expected.lookup(tier, hit)
                metrics.lookup(tier, hit)
            case ("origin", status, seconds):
                expected.origin(status, seconds)
                metrics.origin_request(USERS, "GET", status, seconds)
            case ("tick", seconds):
                clock.advance(seconds)
            case ("read",):
                assert_same_figures(metrics, expected, clock)
    assert_same_figures(metrics, expected, clock)


def test_counts_taken_in_by_a_scrape_are_counted_once_beside_those_after_it() -> None:
    clock = FakeClock(1_700_000_000.5)
    metrics = Metrics(clock)
    hit = metrics.series(USERS, "GET", 200, "hit_l1")
    labels = {"route": USERS, "outcome": "hit_l1"}

    def scraped() -> tuple[float | None, ...]:
        read = metrics.registry.get_sample_value
        return (
            read("cachecar_requests_total", {"route": USERS, "method": "GET", "status": "200"}),
            read("cachecar_request_duration_seconds_count", labels),
            read("cachecar_request_duration_seconds_bucket", labels | {"le": "0.0001"}),
            read("cachecar_cache_lookups_total", {"tier": "l1", "result": "hit"}),
        )

    def hits(n: int) -> None:
        for _ in range(n):
            metrics.lookup("l1", True)
            metrics.answered(hit, 0.00005, clock.time())

    hits(3)
    assert scraped() == (3, 3, 3, 3)  # in the middle of a second
    hits(2)  # the same second, after the scrape
    assert scraped() == (5, 5, 5, 5)
    assert scraped() == (5, 5, 5, 5)  # a second scrape takes nothing twice
    clock.advance(1)
    hits(1)  # the next second's first answer takes the last one's in
    assert metrics.snapshot()["requests_total"]["hit_l1"] == 6
    assert scraped() == (6, 6, 6, 6)
    clock.advance(1)
    history = metrics.snapshot()["history"]
    assert [(p["t"], p["requests"]["hit_l1"]) for p in history] == [
        (1_700_000_000, 5),
        (1_700_000_001, 1),
    ]


def test_a_series_names_the_method_as_its_label_does() -> None:
    assert Metrics.series(USERS, "PROPFIND", 200, "bypass") == (USERS, "other", 200, "bypass")
    assert Metrics.series(USERS, "HEAD", 304, "hit_l1") == (USERS, "HEAD", 304, "hit_l1")


def test_the_histogram_internals_metrics_py_adds_counts_into_behave_as_it_relies_on() -> None:
    # proxy/metrics.py's ``_take_in`` adds many observations at once into a Histogram child, with
    # no public API for it: ``child._sum.inc(seconds)`` and ``child._buckets[i].inc(n)``, bucket
    # i being the i-th bound (non-cumulative), the last one +Inf. A prometheus_client that
    # changes either breaks metrics.py: this says so before a scrape does.
    child = Histogram("pinned", "h", ["route"], buckets=REQUEST_BUCKETS, registry=None).labels("/")
    assert hasattr(child, "_sum"), "metrics.py adds a duration sum with Histogram child._sum.inc"
    assert hasattr(child, "_buckets"), "metrics.py adds counts with Histogram child._buckets[i]"
    assert len(child._buckets) == len(REQUEST_BUCKETS) + 1, "one per bound, then +Inf"
    child._sum.inc(1.5)
    child._buckets[0].inc(2)  # two durations <= REQUEST_BUCKETS[0]
    child._buckets[len(REQUEST_BUCKETS)].inc(1)  # one past the last bound
    [metric] = child.collect()
    samples = {(s.name, s.labels.get("le")): s.value for s in metric.samples}
    assert samples["pinned_sum", None] == 1.5
    assert samples["pinned_count", None] == 3
    assert samples["pinned_bucket", str(REQUEST_BUCKETS[0])] == 2  # exposed cumulative
    assert samples["pinned_bucket", str(REQUEST_BUCKETS[-1])] == 2
    assert samples["pinned_bucket", "+Inf"] == 3
