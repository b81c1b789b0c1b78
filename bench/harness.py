"""What every side-by-side workload stands on: the one origin, the targets' launcher, wrk, and
one measured run (the parameters are ``bench.params``'s).

    start_origin: `cachecar origin`, pinned beside wrk -> populate: every key a workload reads,
    1 KiB each, PUT through wrk, then checked (and copied to Redis for bench.bare_redis)
    measure(target, workload, script): reset the origin's counts -> wrk -> the Run: req/s, p50,
    p99, CPU of the target, of wrk and of the rest of the machine, hit ratio, origin requests
"""

from __future__ import annotations

import asyncio
import math
import re
import secrets
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
from redis.asyncio import Redis

from bench import peers, wrk
from bench.params import Params
from bench.processes import (
    BenchError,
    Processes,
    cachecar_command,
    free_port,
    machine_busy,
    wait_http,
)
from bench.results import Report, Run
from bench.targets import Launcher, Target, cpus

WAIT_LIMIT = 60.0  # no wait (a fill, a queue draining) lasts longer than this
SETTLE = 0.3  # seconds between a stopped wrk and the origin's count
HOT = "/items/hot"
IDLE = "/items/idle"  # "{}": what a fill asks for once it has asked for every key


class Harness:
    """What every workload uses: the origin, the targets' launcher, wrk, one measured run, and
    the small reads and waits around them."""

    def __init__(
        self,
        params: Params,
        report: Report,
        processes: Processes,
        directory: Path,
        session: aiohttp.ClientSession,
        tools: dict[str, str],
        redis: Redis,
        redis_url: str,
        run_prefix: str,
    ) -> None:
        self.params = params
        self.report = report
        self.processes = processes
        self.directory = directory
        self.session = session
        self.tools = tools
        self._redis = redis
        self.redis_url = redis_url
        self.run_prefix = run_prefix
        self._token = secrets.token_hex(16)
        available = cpus()
        self._server_cpu = wrk.pinned(available, 0)
        self.client_cpu = wrk.pinned(available, 1)
        self.wrk = wrk.Wrk(tools[peers.WRK.program], self.client_cpu)
        self._origin = ""
        self._launcher: Launcher | None = None
        self.entry_size = 0  # bytes cachecar's L1 counts per entry, measured in (b)
        self.nginx_file = 0  # bytes nginx counts per cached file (whole blocks), from (b)
        self._runs = 0

    # -- set-up --------------------------------------------------------------------------------

    def populated_keys(self) -> int:
        fill = math.ceil(1.25 * self.params.memory / (wrk.BODY_SIZE + 300))
        p = self.params
        return max(p.warm_keys + p.fresh_keys, p.zipf_keys, fill)

    async def start_origin(self) -> None:
        port = free_port()
        pin = ["taskset", "-c", str(self.client_cpu)] if self.client_cpu is not None else []
        process = self.processes.spawn(
            "demo-origin",
            [
                *pin,
                *cachecar_command(),
                "origin",
                "--port",
                str(port),
                "--latency",
                self.params.latency,
            ],
        )
        self._origin = f"http://127.0.0.1:{port}"
        await wait_http(self.session, self._origin + "/", process, within=WAIT_LIMIT)
        self._launcher = Launcher(
            self.processes,
            self.directory,
            self.session,
            self._origin,
            tools=self.tools,
            cpu=self._server_cpu,
            redis_url=self.redis_url,
            run_prefix=self.run_prefix,
            token=self._token,
        )

    async def populate(self) -> None:
        """Every key a workload reads exists at the origin: PUTs through wrk, then checked."""
        keys = self.populated_keys()
        progress(f"populating the origin: {keys:,} keys of {wrk.BODY_SIZE} bytes")
        marker = self.directory / "populated"
        script = self.script("populate", wrk.sequence("/items/", keys, "PUT", marker))
        result = await asyncio.to_thread(
            self.wrk.run,
            self._origin + "/",
            script,
            connections=32,
            seconds=WAIT_LIMIT,
            log=self.directory / "wrk-populate.log",
            stop_when=marker,
        )
        if not marker.exists() or result.errors:
            raise BenchError(
                f"populating the origin: {result.requests:,} PUTs, {result.errors:,} errors, "
                f"{'done' if marker.exists() else 'not all answered'} within {WAIT_LIMIT:g}s"
            )
        async with self.session.put(self._origin + IDLE, data=b"{}") as response:
            response.raise_for_status()
        paths = [HOT] + [
            self.cold(name, n)
            for name in ("cachecar", "nginx", "varnish")
            for n in range(self.params.rounds)
        ]
        for path in paths:
            async with self.session.put(
                self._origin + path, data=wrk.body(path.rsplit("/", 1)[1])
            ) as response:
                response.raise_for_status()
        for key in ("0", str(keys // 2), str(keys - 1), "hot"):
            async with self.session.get(f"{self._origin}/items/{key}") as response:
                held = await response.read()
            if held != wrk.body(key):
                raise BenchError(f"the origin holds {held[:80]!r}... for /items/{key}")
        # bench.bare_redis reads the same values from Redis, under the run's prefix.
        async with self._redis.pipeline(transaction=False) as pipe:
            for n in range(self.params.warm_keys):
                pipe.set(f"{self.run_prefix}bare:/items/{n}", wrk.body(str(n)))
            pipe.set(f"{self.run_prefix}bare:{HOT}", wrk.body("hot"))
            await pipe.execute()

    # -- one measured run ------------------------------------------------------------------------

    async def measure(
        self,
        target: Target,
        workload: str,
        script: Path,
        *,
        path: str = "/",
        connections: int | None = None,
        seconds: float | None = None,
        stop_when: Path | None = None,
    ) -> Run:
        await self.reset_origin()
        before = await self.outcomes(target)
        cpu_before, _ = target.process.usage()
        busy_before = machine_busy()
        self._runs += 1
        result = await asyncio.to_thread(
            self.wrk.run,
            target.url + path,
            script,
            connections=connections or self.params.connections,
            seconds=seconds or self.params.seconds,
            log=self.directory / f"wrk-{self._runs}-{workload}-{target.process.name}.log",
            stop_when=stop_when,
        )
        busy = machine_busy() - busy_before
        cpu_after, _ = target.process.usage()
        # What wrk sent last is answered, and counted in this run rather than the next.
        await asyncio.sleep(SETTLE)
        stats = await self.origin_stats()
        origin = int(stats["by_method"].get("GET", 0))
        after = await self.outcomes(target)
        hit, detail = None, ""
        if after is not None and before is not None:
            delta = {k: after[k] - before.get(k, 0) for k in after}
            reads = sum(delta.get(k, 0) for k in ("hit_l1", "hit_l2", "miss", "stale"))
            if reads:
                hit = (delta.get("hit_l1", 0) + delta.get("hit_l2", 0)) / reads
                l1, l2 = delta.get("hit_l1", 0) / reads, delta.get("hit_l2", 0) / reads
                detail = f"L1 {l1:.1%}, L2 {l2:.1%}"
        elif target.kind in {"nginx", "varnish"} and result.requests:
            hit = max(0.0, 1 - origin / result.requests)
        server_cpu = (cpu_after - cpu_before) / result.seconds if result.seconds else 0.0
        rest_cpu = busy / result.seconds - result.cpu - server_cpu if result.seconds else 0.0
        measured = Run(
            workload=workload,
            target=target.name,
            kind=target.kind,
            wrk=result,
            server_cpu=server_cpu,
            rest_cpu=max(0.0, rest_cpu),
            hit_ratio=hit,
            hit_detail=detail,
            origin=origin if target.kind != "bare" else None,
        )
        self.report.runs.append(measured)
        return measured

    # -- small steps -----------------------------------------------------------------------------

    def launch(self) -> Launcher:
        if self._launcher is None:
            raise BenchError("the origin was not started")
        return self._launcher

    def script(self, name: str, text: str) -> Path:
        return wrk.write_script(self.directory, name, text)

    def cold(self, kind: str, n: int) -> str:
        return f"/cold/{kind}-{n}"

    async def fill(self, target: Target, keys: int) -> None:
        """Read ``/items/0 .. keys-1`` once each through ``target``."""
        marker = self.directory / f"filled-{target.process.name}-{keys}"
        # Once every key is asked for, the connections idle on a small cached value.
        script = self.script(
            f"fill-{keys}", wrk.sequence("/items/", keys, "GET", marker, idle=IDLE)
        )
        result = await asyncio.to_thread(
            self.wrk.run,
            target.url + "/",
            script,
            connections=self.params.connections,
            seconds=WAIT_LIMIT,
            log=self.directory / f"wrk-fill-{target.process.name}.log",
            stop_when=marker,
        )
        if not marker.exists() or result.errors:
            raise BenchError(
                f"{target.name}: filling {keys:,} keys: {result.requests:,} requests, "
                f"{result.errors:,} errors, {'done' if marker.exists() else 'not done'}"
            )

    async def probe(self, target: Target, path: str, key: str) -> None:
        """Two reads of ``path``: the answer must be the origin's value (the second, cached)."""
        for _ in range(2):
            async with self.session.get(target.url + path) as response:
                held, status = await response.read(), response.status
        if (status, held) != (200, wrk.body(key)):
            raise BenchError(f"{target.name} answered {status} {held[:80]!r}... for {path}")

    async def outcomes(self, target: Target) -> dict[str, int] | None:
        if target.kind != "cachecar":
            return None
        async with self.session.get(target.admin + "/admin/stats") as response:
            stats = await response.json()
        return {k: int(v) for k, v in stats["requests_total"].items()}

    async def l1(self, target: Target) -> tuple[int, int]:
        """cachecar's L1: entries and bytes, from /metrics."""
        async with self.session.get(target.admin + "/metrics") as response:
            text = await response.text()
        found = {
            name: int(float(value))
            for name, value in re.findall(
                r"^(cachecar_l1_entries|cachecar_l1_bytes) (\S+)$", text, re.M
            )
        }
        return found.get("cachecar_l1_entries", 0), found.get("cachecar_l1_bytes", 0)

    async def held(self, target: Target) -> int | None:
        if target.kind == "cachecar":
            return (await self.l1(target))[0]
        if target.kind == "nginx" and target.directory is not None:
            return peers.nginx_entries(target.directory)
        if target.kind == "varnish" and target.directory is not None:
            counters = await asyncio.to_thread(
                peers.varnish_counters, self.tools[peers.VARNISH.program], target.directory
            )
            return counters.get("MAIN.n_object")
        return None

    async def queue_empties(self, target: Target) -> None:
        deadline = time.monotonic() + WAIT_LIMIT
        while True:
            async with self.session.get(target.admin + "/admin/write-behind") as response:
                state = await response.json()
            if response.status != 200:  # the queue unreadable for now (the L2 breaker open)
                if time.monotonic() > deadline:
                    raise BenchError(f"the write-behind queue stayed unreadable: {state}")
                await asyncio.sleep(0.25)
                continue
            if state["queue_depth"] == 0:
                if state.get("dead_letter_count"):
                    self.report.problems.append(
                        f"{state['dead_letter_count']} write-behind writes were dead-lettered"
                    )
                return
            if time.monotonic() > deadline:
                raise BenchError(f"the write-behind queue did not empty within {WAIT_LIMIT:g}s")
            await asyncio.sleep(0.05)

    async def reset_origin(self) -> None:
        async with self.session.post(self._origin + "/_stats/reset") as response:
            response.raise_for_status()

    async def origin_stats(self) -> dict[str, Any]:
        async with self.session.get(self._origin + "/_stats") as response:
            stats: dict[str, Any] = await response.json()
        return stats

    async def stop(self, targets: Sequence[Target]) -> None:
        await asyncio.gather(*(asyncio.to_thread(t.process.stop) for t in targets))


def progress(message: str) -> None:
    print(f"bench.side_by_side: {message}", file=sys.stderr, flush=True)
