"""``cachecar demo``: the demo origin, the proxy and a traffic generator, with a live line.

start `cachecar origin` and `cachecar serve` as child processes (their logs go to files)
-> wait until both answer -> seed the origin -> clients send Zipf-distributed reads (and a
few writes, which invalidate) through the proxy, and cart updates to the write-behind route
-> one line a second: req/s, hit ratio per tier, origin load, latency, write-behind writes and
how many origin writes they became -> Ctrl-C (or --duration) stops the clients, then the
children
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import IO

import aiohttp
from yarl import URL

from proxy.settings import Settings

USERS = 1000
PRODUCTS = 200
WRITE_SHARE = 0.02
CARTS = 50
CART_SHARE = 0.05  # of requests: PUT /carts/{id}, a write-behind route
ZIPF_S = 1.1
ORIGIN_LATENCY = "20ms"
READY_TIMEOUT = 20.0


class Demo:
    def __init__(
        self, config: Path, settings: Settings, *, concurrency: int, duration: float | None
    ) -> None:
        self._config = config
        self._settings = settings
        self._concurrency = concurrency
        self._duration = duration
        self._proxy = f"http://{settings.server.listen}"
        self._admin = f"http://{settings.admin.listen}"
        self._origin = settings.upstream.url
        self._outcomes: Counter[str] = Counter()
        self._latencies: list[float] = []
        self._stop = asyncio.Event()
        self._logs = Path(tempfile.mkdtemp(prefix="cachecar-demo-"))

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        # Kept for the life of the loop: a second Ctrl-C while stopping must not leave the
        # children (in sessions of their own) running.
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self._stop.set)
        children: list[subprocess.Popen[bytes]] = []
        try:
            origin_url = URL(self._origin)
            children.append(
                self._spawn(
                    "origin",
                    [
                        "origin",
                        "--host",
                        origin_url.host or "127.0.0.1",
                        "--port",
                        str(origin_url.port),
                        "--latency",
                        ORIGIN_LATENCY,
                    ],
                )
            )
            children.append(self._spawn("proxy", ["serve", "-c", str(self._config)]))
            async with aiohttp.ClientSession() as session:
                problem = await self._wait_ready(session, children)
                if problem is not None:
                    print(f"cachecar demo: {problem}; logs in {self._logs}", file=sys.stderr)
                    return 1
                await self._seed(session)
                self._banner()
                await self._traffic(session)
        finally:
            await _stop_children(children)
        print(f"\nstopped. {self._summary()}")
        return 0

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log: IO[bytes] = (self._logs / f"{name}.log").open("wb")
        return subprocess.Popen(
            [sys.executable, "-m", "proxy", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            # Ctrl-C reaches the demo alone; it stops the children in order.
            start_new_session=True,
        )

    async def _wait_ready(
        self, session: aiohttp.ClientSession, children: list[subprocess.Popen[bytes]]
    ) -> str | None:
        deadline = time.monotonic() + READY_TIMEOUT
        for url in (f"{self._origin}/", f"{self._admin}/healthz"):
            while True:
                for child in children:
                    if child.poll() is not None:
                        return f"{child.args!r} exited with {child.returncode}"
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(url) as response:
                        if response.status == 200:
                            break
                if time.monotonic() > deadline or self._stop.is_set():
                    return f"{url} did not answer within {READY_TIMEOUT:g}s"
                await asyncio.sleep(0.1)
        return None

    async def _seed(self, session: aiohttp.ClientSession) -> None:
        async def put(path: str, value: dict[str, object]) -> None:
            async with session.put(f"{self._origin}{path}", json=value) as response:
                response.raise_for_status()

        seeds = [(f"/users/{n}", {"id": n, "name": f"user {n}"}) for n in range(1, USERS + 1)]
        seeds += [
            (f"/products/{n}", {"id": n, "price": round(n * 1.5, 2)})
            for n in range(1, PRODUCTS + 1)
        ]
        for start in range(0, len(seeds), 50):
            await asyncio.gather(*(put(path, value) for path, value in seeds[start : start + 50]))

    def _banner(self) -> None:
        print(
            "cachecar demo\n"
            f"  proxy     {self._proxy}    try: curl -i {self._proxy}/users/1\n"
            f"  dashboard {self._admin}/dashboard    live hit ratio, latency, origin load, queue\n"
            f"  metrics   {self._admin}/metrics    (Prometheus; grafana/ has the dashboard)\n"
            f"  admin     {self._admin}    /admin/stats  /healthz  /readyz\n"
            f"  origin    {self._origin}    the demo data store, {ORIGIN_LATENCY} per request\n"
            f"  logs      {self._logs}\n"
            f"  traffic   {self._concurrency} clients, Zipf(s={ZIPF_S}) over {USERS} users, "
            f"{WRITE_SHARE:.0%} writes; {CART_SHARE:.0%} cart updates (write-behind) over "
            f"{CARTS} carts\n"
            f"  queue     {self._admin}/admin/write-behind\n"
            "Ctrl-C stops everything.",
            flush=True,
        )

    async def _traffic(self, session: aiohttp.ClientSession) -> None:
        pick = _zipf(USERS, ZIPF_S)
        clients = [
            asyncio.create_task(self._client(session, pick, random.Random(n)))
            for n in range(self._concurrency)
        ]
        reporter = asyncio.create_task(self._report(session))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), self._duration)
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

    def _summary(self) -> str:
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


async def _stop_children(children: list[subprocess.Popen[bytes]]) -> None:
    for child in reversed(children):  # the proxy first, so it can finish with the origin up
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
            for _ in range(150):
                if child.poll() is not None:
                    break
                await asyncio.sleep(0.1)
            else:
                child.kill()
                child.wait()
