"""``cachecar demo``: the demo origin and the proxy as child processes, and the traffic.

start `cachecar origin` and `cachecar serve` as child processes (their logs go to files)
-> wait until both answer -> seed the origin -> ``proxy.demo.traffic`` until Ctrl-C (or
--duration) -> stop the children, the proxy first
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO

import aiohttp
from yarl import URL

from proxy.demo.traffic import (
    CART_SHARE,
    CARTS,
    ORIGIN_LATENCY,
    PRODUCTS,
    USERS,
    WRITE_SHARE,
    ZIPF_S,
    Traffic,
)
from proxy.settings import Settings

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
        self._stop = asyncio.Event()
        self._logs = Path(tempfile.mkdtemp(prefix="cachecar-demo-"))

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        # Kept for the life of the loop: a second Ctrl-C while stopping must not leave the
        # children (in sessions of their own) running.
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self._stop.set)
        children: list[subprocess.Popen[bytes]] = []
        traffic = Traffic(self._proxy, self._origin, self._concurrency)
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
                await traffic.run(session, self._stop, self._duration)
        finally:
            await _stop_children(children)
        print(f"\nstopped. {traffic.summary()}")
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
