"""The demo's traffic: clients through the proxy, and one line a second of what they saw.

Clients send Zipf-distributed reads (and a few writes, which invalidate) through the proxy, and
cart updates to the write-behind route. The line: req/s, hit ratio per tier, origin load,
latency, write-behind writes and how many origin writes they became.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import json
import random
import sys
import time
from collections import Counter
from collections.abc import Callable

import aiohttp

USERS = 1000
PRODUCTS = 200
WRITE_SHARE = 0.02
CARTS = 50
CART_SHARE = 0.05  # of requests: PUT /carts/{id}, a write-behind route
ZIPF_S = 1.1
ORIGIN_LATENCY = "20ms"


class Traffic:
    """The demo's clients and reporter, and what they counted."""

    def __init__(self, proxy: str, origin: str, concurrency: int) -> None:
        self._proxy = proxy
        self._origin = origin
        self._concurrency = concurrency
        self._outcomes: Counter[str] = Counter()
        self._latencies: list[float] = []

    async def run(
        self, session: aiohttp.ClientSession, stop: asyncio.Event, duration: float | None
    ) -> None:
        """Send traffic and report until ``stop`` is set or ``duration`` has passed."""
        pick = _zipf(USERS, ZIPF_S)
        clients = [
            asyncio.create_task(self._client(session, pick, random.Random(n)))
            for n in range(self._concurrency)
        ]
        reporter = asyncio.create_task(self._report(session))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), duration)
        for task in (*clients, reporter):
            task.cancel()
        await asyncio.gather(*clients, reporter, return_exceptions=True)

    async def _client(
        self, session: aiohttp.ClientSession, pick: _Picker, rng: random.Random
    ) -> None:
        while True:
            user = pick(rng)
            url = f"{self._proxy}/users/{user}"
            started = time.perf_counter()
            try:
                if rng.random() < CART_SHARE:
                    cart = pick(rng) % CARTS + 1
                    cart_value = {"id": cart, "items": rng.randrange(1, 9)}
                    async with session.put(
                        f"{self._proxy}/carts/{cart}", json=cart_value
                    ) as response:
                        await response.read()
                    self._outcomes["QUEUED" if response.status == 202 else "ERROR"] += 1
                    continue
                if rng.random() < WRITE_SHARE:
                    value = {"id": user, "name": f"user {user}", "v": rng.random()}
                    async with session.put(url, json=value) as response:
                        await response.read()
                    self._outcomes["WRITE"] += 1
                    continue
                async with session.get(url) as response:
                    await response.read()
                    self._outcomes[response.headers.get("X-Cache", "?")] += 1
            except aiohttp.ClientError:
                self._outcomes["ERROR"] += 1
                await asyncio.sleep(0.1)
                continue
            self._latencies.append(time.perf_counter() - started)

    async def _report(self, session: aiohttp.ClientSession) -> None:
        tty = sys.stdout.isatty()
        previous: Counter[str] = Counter()
        previous_origin, previous_carts = await self._origin_requests(session)
        while True:
            await asyncio.sleep(1)
            now = Counter(self._outcomes)
            window = now - previous
            origin, carts = await self._origin_requests(session)
            latencies, self._latencies = sorted(self._latencies), []
            line = _line(window, origin - previous_origin, latencies, carts - previous_carts)
            previous, previous_origin, previous_carts = now, origin, carts
            print(f"\r{line}   " if tty else line, end="" if tty else "\n", flush=True)

    async def _origin_requests(self, session: aiohttp.ClientSession) -> tuple[int, int]:
        """Requests the origin received so far: all of them, and the cart writes among them."""
        with contextlib.suppress(aiohttp.ClientError, ValueError):
            async with session.get(f"{self._origin}/_stats") as response:
                stats = json.loads(await response.read())
            carts = sum(
                n for request, n in stats["by_request"].items() if request.startswith("PUT /carts/")
            )
            return int(stats["requests"]), carts
        return 0, 0

    def summary(self) -> str:
        reads = sum(self._outcomes[o] for o in ("HIT-L1", "HIT-L2", "MISS", "STALE"))
        hits = self._outcomes["HIT-L1"] + self._outcomes["HIT-L2"]
        ratio = f"{hits / reads:.1%}" if reads else "n/a"
        return (
            f"{reads} reads, hit ratio {ratio}, {self._outcomes['WRITE']} writes, "
            f"{self._outcomes['QUEUED']} write-behind writes"
        )


_Picker = Callable[[random.Random], int]


def _zipf(n: int, s: float) -> _Picker:
    """A sampler of 1..n where k is drawn with weight 1/k**s."""
    cumulative = list(itertools.accumulate(1 / k**s for k in range(1, n + 1)))
    total = cumulative[-1]

    def pick(rng: random.Random) -> int:
        return bisect.bisect_left(cumulative, rng.random() * total) + 1

    return pick


def _line(window: Counter[str], origin: int, latencies: list[float], flushed: int = 0) -> str:
    reads = sum(window[o] for o in ("HIT-L1", "HIT-L2", "MISS", "STALE"))
    if not reads:
        return "waiting for traffic..."

    def share(*outcomes: str) -> str:
        return f"{sum(window[o] for o in outcomes) / reads:6.1%}"

    def percentile(p: float) -> str:
        if not latencies:
            return "-"
        return f"{latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000:.1f}ms"

    return (
        f"{reads + window['WRITE'] + window['QUEUED']:6d} req/s  hit {share('HIT-L1', 'HIT-L2')} "
        f"(L1 {share('HIT-L1')}, L2 {share('HIT-L2')})  miss {share('MISS')}  "
        f"origin {origin:4d} req/s  p50 {percentile(0.5)}  p99 {percentile(0.99)}  "
        f"write-behind {window['QUEUED']}/s -> origin {flushed}/s"
        + (f"  errors {window['ERROR']}" if window["ERROR"] else "")
    )
