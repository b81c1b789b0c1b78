"""The built-in dashboard (``GET /dashboard``) in a real headless Chromium, over real traffic.

    cachecar origin <- cachecar serve (real Redis L2, a write-behind route) <- traffic from the test
                            ^ /dashboard, then admin/stats every second
                       Chromium (Debian's, driven by Playwright; no browser is ever downloaded)

While the traffic runs the charts must grow and the figures move; once it stops and the figures
settle, every figure the page shows (each element with a ``data-stat``) must read what
``/admin/stats`` says at that moment, formatted as the page formats it (the rules below mirror
the page's). The page may talk to nobody but the admin listener and must log no error; when the
proxy goes away it must say so.

``CACHECAR_SCREENSHOT=1`` runs the traffic for most of a minute and writes docs/dashboard.png;
otherwise a short run writes the screenshot to the test's tmp_path.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
from playwright.async_api import (
    Browser,
    ConsoleMessage,
    Page,
    Request,
    ViewportSize,
    async_playwright,
)
from redis.asyncio import Redis

from tests.conftest import IN_CI
from tests.e2e.conftest import Config, Proxy, Spawn, start_origin, start_proxy, until
from tests.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
DOCS_SCREENSHOT = ROOT / "docs" / "dashboard.png"
SCREENSHOT = os.environ.get("CACHECAR_SCREENSHOT", "") == "1"

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT: ViewportSize = {"width": 1440, "height": 900}

TRAFFIC_SECONDS = 50.0 if SCREENSHOT else 8.0
WORKERS = 6
USERS = range(1, 41)  # cache-aside, L1 and L2 keep them 10 minutes: after the first read, L1 hits
PRODUCTS = range(1, 31)  # L1 keeps them 1s, L2 10 minutes: a read a second later is an L2 hit
CARTS = range(1, 21)  # write-behind

CONFIG = """\
server: {{listen: "127.0.0.1:{port}", shutdown_grace: 5s}}
admin: {{listen: "127.0.0.1:{admin}"}}
upstream: {{url: "{origin}", timeout: 5s}}
l1: {{ttl: 10m}}
l2: {{url: "{redis_url}", key_prefix: "{key_prefix}", timeout: 200ms}}
write_behind: {{flush_interval: 500ms}}
routes:
  - path: /users/{{id}}
    key: "users:{{id}}"
    ttl: {{l1: 10m, l2: 10m}}
    negative_ttl: 10m
  - path: /products/{{id}}
    key: "products:{{id}}"
    ttl: {{l1: 1s, l2: 10m}}
  - path: /carts/{{id}}
    mode: write-behind
    key: "carts:{{id}}"
"""

CHARTS = {
    "chart-hit-ratio",
    "chart-requests",
    "chart-latency",
    "chart-origin",
    "chart-origin-latency",
    "chart-write-behind",
}

# The headline figures an operator looks for, and how each is shown. The page may show more;
# every data-stat element is checked, by its own data-format.
HEADLINE = {
    **{
        f"hit_ratio.{tier}.{span}": "pct"
        for tier in ("overall", "l1", "l2")
        for span in ("last_minute", "since_start")
    },
    "requests_per_second.total": "rate",
    "requests_total.total": "int",
    "latency_seconds.all.p50": "dur",
    "latency_seconds.all.p95": "dur",
    "latency_seconds.all.p99": "dur",
    "origin.requests_per_second": "rate",
    "origin.errors_per_second": "rate",
    "origin.latency_seconds.p99": "dur",
    "l1.entries": "int",
    "l1.max_entries": "int",
    "l1.bytes": "bytes",
    "l1.max_bytes": "bytes",
    "l2.breaker": "text",
    "write_behind.queue_depth": "int",
    "write_behind.oldest_pending_age_seconds": "age",
    "write_behind.dead_letters": "int",
    "write_behind.flushed_total.ok": "int",
    "write_behind.flushed_total.retry": "int",
    "write_behind.flushed_total.dead": "int",
    "uptime_seconds": "uptime",
}

# ---- the page's formatting rules (proxy/static/dashboard.html, FORMAT) ---------------------------

DASH = "\u2014"


def _fixed(value: float, digits: int) -> str:
    """JavaScript's ``toFixed``: the exact binary value rounded, a tie going away from zero."""
    return str(Decimal(value).quantize(Decimal(1).scaleb(-digits), rounding=ROUND_HALF_UP))


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _span(s: float) -> str:
    total = math.floor(s)
    if total < 3600:
        return f"{total // 60}m {total % 60:02d}s"
    if total < 86400:
        return f"{total // 3600}h {total // 60 % 60:02d}m"
    return f"{total // 86400}d {total // 3600 % 24:02d}h"


def _grouped(value: float) -> str:
    return f"{int(_fixed(value, 0)):,}"


def _pct(v: float) -> str:
    return f"{_fixed(v * 100, 1)}%"


def _rate(v: float) -> str:
    return f"{_fixed(v, 1) if v < 100 else _grouped(v)}/s"


def _dur(v: float) -> str:
    s = max(0.0, v)
    us = s * 1e6
    if us < 999.5:
        return f"{_fixed(us, 1 if us < 9.95 else 0)} µs"
    ms = s * 1e3
    if ms < 9.995:
        return f"{_fixed(ms, 2)} ms"
    if ms < 99.95:
        return f"{_fixed(ms, 1)} ms"
    if ms < 999.5:
        return f"{_fixed(ms, 0)} ms"
    if s < 9.995:
        return f"{_fixed(s, 2)} s"
    if s < 59.95:
        return f"{_fixed(s, 1)} s"
    return _span(s)


def _age(v: float) -> str:
    s = max(0.0, v)
    if s < 0.9995:
        return f"{_fixed(s * 1e3, 0)} ms"
    if s < 59.95:
        return f"{_fixed(s, 1)} s"
    return _span(s)


def _bytes(v: float) -> str:
    if v < 1024:
        return f"{_fixed(v, 0)} B"
    units = ["KiB", "MiB", "GiB", "TiB"]
    n, u = v / 1024, 0
    while n >= 1023.95 and u < len(units) - 1:
        n, u = n / 1024, u + 1
    return f"{_fixed(n, 1)} {units[u]}"


def _uptime(v: float) -> str:
    return f"{math.floor(v)}s" if v < 60 else _span(v)


NUMBER_FORMATS: dict[str, Callable[[float], str]] = {
    "pct": _pct,
    "int": _grouped,
    "rate": _rate,
    "dur": _dur,
    "age": _age,
    "bytes": _bytes,
    "uptime": _uptime,
}


def dig(stats: Any, path: str) -> Any:
    for key in path.split("."):
        stats = stats.get(key) if isinstance(stats, dict) else None
    return stats


def shown(figure: dict[str, str], stats: dict[str, Any]) -> str:
    """The text the page should show for one data-stat element, given the snapshot ``stats``."""
    if figure["requires"] and dig(stats, figure["requires"]) is False:
        return "off"
    value = dig(stats, figure["key"])
    if figure["format"] == "text":
        return DASH if value is None or value == "" else str(value)
    number = _number(value)
    return DASH if number is None else NUMBER_FORMATS[figure["format"]](number)


def format_samples() -> dict[str, list[float]]:
    """Values to format both here and in the page: the edges of every rule, and random ones."""
    rng = random.Random(4)
    spread = [10 ** rng.uniform(-7, 6) for _ in range(300)]
    return {
        "pct": [0, 0.1225, 1 / 3, 0.99949, 0.99951, 1, *(rng.random() for _ in range(100))],
        "int": [0, 7, 999, 1234, 1234567, *spread],
        "rate": [0, 0.05, 0.25, 99.94, 99.96, 100.5, 1234.5, *spread],
        "dur": [
            0,
            4.2e-6,
            9.96e-6,
            4.2e-4,
            9.994e-4,
            9.996e-4,
            9.99e-3,
            0.0999,
            0.9996,
            59.96,
            *spread,
        ],
        "age": [0, 0.35, 0.9994, 0.9996, 12.34, 59.96, 3725, *spread],
        "bytes": [0, 512, 1023, 1024, 1536, 2**20 - 1, 64 * 2**20, 2**30 - 1, 5 * 2**40, *spread],
        "uptime": [0, 9.9, 59.99, 61, 3599.9, 3600, 90061, *spread],
    }


def test_the_formatting_rules_match_the_pages_examples() -> None:
    """Pins the mirrored rules on the edges where a naive Python port would differ (the browser
    test holds them against the page's own on many more values)."""
    assert _pct(0.1225) == "12.3%"  # 12.25 exactly: JavaScript rounds the tie up
    assert _pct(1.0) == "100.0%"
    assert _rate(0.0) == "0.0/s"
    assert _rate(1234.5) == "1,235/s"
    assert [_dur(v) for v in (0.0000042, 0.00042, 0.0009996, 0.0123, 0.25, 3.0, 75.0)] == [
        "4.2 µs",
        "420 µs",
        "1.00 ms",
        "12.3 ms",
        "250 ms",
        "3.00 s",
        "1m 15s",
    ]
    assert [_age(v) for v in (0.0, 0.35, 12.34, 3725.0)] == ["0 ms", "350 ms", "12.3 s", "1h 02m"]
    assert [_bytes(v) for v in (512, 1536, 64 * 2**20, 2**30 - 1)] == [
        "512 B",
        "1.5 KiB",
        "64.0 MiB",
        "1.0 GiB",
    ]
    assert [_uptime(v) for v in (9.9, 61.0, 90061.0)] == ["9s", "1m 01s", "1d 01h"]
    assert _grouped(1234567) == "1,234,567"
    figure = {"key": "l2.breaker", "format": "text", "requires": "l2.enabled"}
    assert shown(figure, {"l2": {"enabled": True, "breaker": "open"}}) == "open"
    assert shown(figure, {"l2": {"enabled": False, "breaker": "closed"}}) == "off"
    assert shown({"key": "x", "format": "pct", "requires": ""}, {"x": None}) == DASH


# ---- the browser side --------------------------------------------------------------------------

READ_PAGE = """() => ({
    stats: window.__cachecarStats ?? null,
    figures: Array.from(document.querySelectorAll("[data-stat]"), (el) => ({
        key: el.dataset.stat,
        format: el.dataset.format ?? "text",
        requires: el.dataset.requires ?? "",
        text: el.textContent,
    })),
    points: Object.fromEntries(
        Array.from(document.querySelectorAll("[data-points]"), (el) => [el.id, Number(el.dataset.points)])
    ),
    connection: document.getElementById("conn")?.dataset.state ?? null,
})"""

FORMAT_IN_PAGE = """(samples) => Object.fromEntries(Object.entries(samples).map(
    ([name, values]) => [name, values.map((v) => window.__cachecarFormat[name](v))]
))"""


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    """Debian's headless Chromium. Outside CI a missing one skips; in CI (CI=true) it fails."""
    if not os.access(CHROMIUM, os.X_OK):
        message = f"Chromium is not installed at {CHROMIUM} (apt-get install chromium)"
        if IN_CI:
            pytest.fail(f"{message}; CI needs it")
        pytest.skip(f"{message}; not in CI, so skipped here and failed in CI")
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=30_000
        )
        try:
            yield launched
        finally:
            await launched.close()


@dataclass
class Dashboard:
    """The page, and everything it asked for or complained about since it was opened."""

    page: Page
    requested: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    async def read(self) -> dict[str, Any]:
        """The figures, the chart point counts and the last snapshot, read in one go."""
        state: dict[str, Any] = await self.page.evaluate(READ_PAGE)
        return state

    async def wait_for_state(self, state: str) -> None:
        await self.page.wait_for_function(
            "(state) => document.getElementById('conn').dataset.state === state", arg=state
        )


async def open_dashboard(browser: Browser, admin: str) -> Dashboard:
    page = await browser.new_page(viewport=VIEWPORT)
    page.set_default_timeout(10_000)
    dashboard = Dashboard(page)

    def on_request(request: Request) -> None:
        dashboard.requested.append(request.url)

    def on_failed(request: Request) -> None:
        dashboard.failed.append(f"{request.method} {request.url}: {request.failure}")

    def on_console(message: ConsoleMessage) -> None:
        if message.type in ("error", "warning"):
            dashboard.errors.append(f"console {message.type}: {message.text}")

    def on_page_error(error: Exception) -> None:
        dashboard.errors.append(f"uncaught: {error}")

    page.on("request", on_request)
    page.on("requestfailed", on_failed)
    page.on("console", on_console)
    page.on("pageerror", on_page_error)
    response = await page.goto(admin + "/dashboard")
    assert response is not None
    assert (response.status, response.headers["content-type"].split(";")[0]) == (200, "text/html")
    await dashboard.wait_for_state("live")
    return dashboard


async def stats_of(session: aiohttp.ClientSession, admin: str) -> dict[str, Any]:
    async with session.get(admin + "/admin/stats") as response:
        assert response.status == 200, await response.text()
        stats: dict[str, Any] = await response.json()
    return stats


def destination(url: str) -> str:
    """Where a request went: scheme, host, port and path (``data:`` for an inline resource)."""
    if url.startswith("data:"):
        return "data:"
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


def mismatches(page: dict[str, Any], stats: dict[str, Any]) -> list[str]:
    """Every figure whose text is not what ``stats`` says, formatted as the page formats it."""
    return [
        f"{figure['key']}: page {figure['text']!r}, expected {shown(figure, stats)!r}"
        for figure in page["figures"]
        if figure["text"] != shown(figure, stats)
    ]


# ---- traffic -----------------------------------------------------------------------------------


async def traffic(
    session: aiohttp.ClientSession, proxy: str, seconds: float, reads: Counter[str]
) -> int:
    """Reads, writes and unrouted requests from a few workers for ``seconds``, the load swelling
    and ebbing so the charts have a shape; returns how many requests were sent. ``reads`` counts
    the GETs by the X-Cache they were answered with."""
    started = time.monotonic()
    sent = 0

    async def worker(seed: int) -> None:
        nonlocal sent
        rng = random.Random(seed)
        while (elapsed := time.monotonic() - started) < seconds:
            roll = rng.random()
            method, body = "GET", None
            if roll < 0.55:
                path = f"/users/{rng.choice(USERS)}"
            elif roll < 0.72:
                path = f"/products/{rng.choice(PRODUCTS)}"
            elif roll < 0.77:
                path = f"/users/missing-{rng.randrange(30)}"  # 404, negatively cached
            elif roll < 0.80:
                path = "/"  # no route: passed through uncached
            elif roll < 0.82:  # cache-aside: invalidates, so the next read misses
                method, path, body = "PUT", f"/users/{rng.choice(USERS)}", b'{"name": "new"}'
            else:
                cart = rng.choice(CARTS)
                method, path = "PUT", f"/carts/{cart}"
                body = f'{{"cart": {cart}, "items": {rng.randrange(9)}}}'.encode()
            headers = {"Content-Type": "application/json"} if body else None
            async with session.request(method, proxy + path, data=body, headers=headers) as r:
                await r.read()
                assert r.status < 500, (method, path, r.status)
                if method == "GET":
                    reads[r.headers.get("X-Cache", "")] += 1
            sent += 1
            # Between about 40 and 300 requests a second in all, in waves of 20 seconds.
            swell = 0.5 + 0.5 * math.sin(2 * math.pi * elapsed / 20)
            await asyncio.sleep(0.12 - 0.1 * swell + rng.uniform(0, 0.01))

    async with asyncio.TaskGroup() as group:
        for seed in range(WORKERS):
            group.create_task(worker(seed))
    return sent


async def start_dashboard_proxy(
    spawn: Spawn, tmp_path: Path, redis_url: str, key_prefix: str
) -> Proxy:
    """The demo origin holding the users and products, and a proxy in front of it."""
    origin = await start_origin(spawn, latency="2ms")
    for i in USERS:
        await origin.put(f"/users/{i}", {"id": i, "name": f"user {i}"})
    for i in PRODUCTS:
        await origin.put(f"/products/{i}", {"id": i, "price": i * 100})
    port, admin = free_port(), free_port()
    path = tmp_path / "c.yaml"
    path.write_text(
        CONFIG.format(
            port=port, admin=admin, origin=origin.url, redis_url=redis_url, key_prefix=key_prefix
        )
    )
    config = Config(path, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin}")
    return await start_proxy(spawn, config)


# ---- the test ----------------------------------------------------------------------------------

# The processes are listed after ``redis_client`` so that they are stopped before the fixture
# deletes this test's keys: a live flusher must not write into Redis after the cleanup.


@pytest.mark.redis
@pytest.mark.timeout(150 if SCREENSHOT else 90)
async def test_the_dashboard_shows_the_live_figures_and_talks_only_to_the_admin_listener(
    redis_client: Redis,
    spawn: Spawn,
    tmp_path: Path,
    redis_url: str,
    key_prefix: str,
    browser: Browser,
) -> None:
    proxy = await start_dashboard_proxy(spawn, tmp_path, redis_url, key_prefix)
    dashboard = await open_dashboard(browser, proxy.admin)

    # The page formats numbers by the rules this file mirrors (so the comparisons below hold).
    samples = format_samples()
    formatted = await dashboard.page.evaluate(FORMAT_IN_PAGE, samples)
    differ = {
        name: [
            (v, js)
            for v, js in zip(values, formatted[name], strict=True)
            if js != NUMBER_FORMATS[name](v)
        ]
        for name, values in samples.items()
    }
    assert differ == {name: [] for name in samples}

    first = await dashboard.read()
    assert set(first["points"]) == CHARTS
    formats = {figure["key"]: figure["format"] for figure in first["figures"]}
    assert {key: formats.get(key) for key in HEADLINE} == HEADLINE
    # Before any traffic there is nothing to compute a ratio or a percentile from.
    assert first["stats"]["requests_total"]["total"] == 0
    assert {f["text"] for f in first["figures"] if f["format"] in ("pct", "dur")} == {DASH}

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        # (b) While traffic runs the charts grow and the figures move.
        reads: Counter[str] = Counter()
        load = asyncio.create_task(traffic(session, proxy.url, TRAFFIC_SECONDS, reads))
        seen = [first]
        while not load.done():
            await asyncio.wait({load}, timeout=1.0)
            seen.append(await dashboard.read())
        sent = await load
        screenshot = DOCS_SCREENSHOT if SCREENSHOT else tmp_path / "dashboard.png"
        await dashboard.page.screenshot(path=screenshot, full_page=True)

        totals_shown = {
            f["text"]
            for state in seen
            for f in state["figures"]
            if f["key"] == "requests_total.total"
        }
        assert len(totals_shown - {"0"}) >= 3, totals_shown
        for chart in CHARTS:
            counts = [state["points"][chart] for state in seen]
            assert counts[-1] >= counts[0] + 4, (chart, counts)
            assert sum(b > a for a, b in itertools.pairwise(counts)) >= 3, (chart, counts)

        # (a) Once the traffic has stopped and the figures have settled (a req/s figure is the
        # mean of the last 10 seconds; the write-behind queue drains), every figure on the page
        # reads what /admin/stats says at that moment.
        settled: dict[str, Any] = {}

        async def quiet() -> bool:
            nonlocal settled
            settled = await stats_of(session, proxy.admin)
            return bool(
                settled["requests_per_second"]["total"] == 0
                and settled["origin"]["requests_per_second"] == 0
                and settled["write_behind"]["queue_depth"] == 0
            )

        await until(quiet, "req/s back to 0 and an empty write-behind queue", within=25)
        totals = settled["requests_total"]
        assert totals["total"] == sent, (totals, sent)
        by_outcome = {o: totals[o] for o in ("hit_l1", "hit_l2", "miss", "bypass")}
        assert by_outcome == {
            "hit_l1": reads["HIT-L1"],
            "hit_l2": reads["HIT-L2"],
            "miss": reads["MISS"],
            "bypass": reads["BYPASS"],
        }, reads
        assert min(totals["hit_l1"], totals["hit_l2"], totals["miss"], totals["write"]) > 0
        assert settled["write_behind"]["flushed_total"]["ok"] > 0

        state: dict[str, Any] = {}
        problems: list[str] = []

        async def figures_match() -> bool:
            nonlocal state, problems
            state = await dashboard.read()
            now = await stats_of(session, proxy.admin)
            shown_stats = state["stats"]
            # The page shows its own snapshot faithfully...
            problems = mismatches(state, shown_stats)
            if shown_stats["time"] < settled["time"]:
                problems.append("the page has not shown a settled snapshot yet")
            # ...and that is what the server says now; only the uptime moves on by itself.
            problems += [p for p in mismatches(state, now) if not p.startswith("uptime_seconds:")]
            if abs(now["uptime_seconds"] - shown_stats["uptime_seconds"]) > 3:
                problems.append(
                    f"uptime: page {shown_stats['uptime_seconds']}, now {now['uptime_seconds']}"
                )
            problems = list(dict.fromkeys(problems))  # both comparisons may name one figure
            return not problems

        try:
            await until(figures_match, "the page's figures equal /admin/stats", within=10)
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {problems}") from None
        shown_now = {f["key"]: f["text"] for f in state["figures"]}
        assert shown_now["requests_total.total"] == f"{sent:,}"
        assert shown_now["requests_per_second.total"] == "0.0/s"
        assert shown_now["l2.breaker"] == "closed"
        assert state["connection"] == "live"

    # (c) The page asked nothing of anyone but the admin listener, and logged no error.
    asked = Counter(destination(url) for url in dashboard.requested)
    assert set(asked) <= {f"{proxy.admin}/dashboard", f"{proxy.admin}/admin/stats", "data:"}, asked
    assert asked[f"{proxy.admin}/dashboard"] == 1
    assert asked[f"{proxy.admin}/admin/stats"] >= TRAFFIC_SECONDS
    assert dashboard.failed == []
    assert dashboard.errors == []

    # A proxy that goes away is shown as such, its last figures kept.
    assert proxy.process.stop() == 0
    await dashboard.wait_for_state("disconnected")
    assert await dashboard.page.locator("#banner").is_visible()
    gone = await dashboard.read()
    assert {f["key"]: f["text"] for f in gone["figures"]}["requests_total.total"] == f"{sent:,}"
