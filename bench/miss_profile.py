"""Where a miss's time goes: cachecar under cProfile, asked only for keys it has not read.

`cachecar origin` (filled with the keys) + `python -m cProfile -m proxy serve` (one route,
`/items/{id}`; L1, and L2 on the Redis at REDIS_URL under a prefix of the run, or no L2)
-> a warm-up of other keys, then N GETs of distinct keys, C at a time, from this process
-> SIGTERM: cachecar exits and cProfile writes its profile
-> the process's own time (cProfile's tottime) grouped by where it is spent, and the functions
   that take the most, as markdown on stdout.

cachecar is pinned to the first CPU; the origin and this client to the second. cProfile adds a
cost to every Python call, so the figures are shares of the time, not a speed: the speed of a
miss is `bench.side_by_side`'s (i). ``--tree DIR`` profiles the cachecar source in DIR (a
``git worktree`` of another commit) with this checkout's tool, for a before and after.

python -m bench.miss_profile [--requests 20000] [--concurrency 16] [--no-l2] [--tree DIR]
                             [--top 20]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pstats
import re
import secrets
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import aiohttp
from redis.asyncio import Redis

from bench import wrk
from bench.processes import Processes, cachecar_command, drop_prefix, free_port, wait_http

WITHIN = 60.0  # seconds each step may take
WARM_UP = 500  # GETs of other keys before the measured ones

# Where a function's time is counted: the first pattern its file path contains.
AREAS: tuple[tuple[str, str], ...] = (
    ("proxy/http1.py", "origin client: cachecar's HTTP/1.1 (proxy/http1.py, framing.py)"),
    ("proxy/framing.py", "origin client: cachecar's HTTP/1.1 (proxy/http1.py, framing.py)"),
    ("aiohttp/client", "origin client: aiohttp's"),
    ("aiohttp/connector", "origin client: aiohttp's"),
    ("proxy/origin.py", "origin client: proxy/origin.py"),
    ("aiohttp/", "server: aiohttp (request parse, handler, answer write)"),
    ("multidict", "server: aiohttp (request parse, handler, answer write)"),
    ("yarl/", "URLs (yarl)"),
    ("proxy/fastpath.py", "proxy: the hit path's door (fastpath.py)"),
    ("proxy/metrics.py", "metrics (proxy/metrics.py, prometheus_client)"),
    ("prometheus_client", "metrics (proxy/metrics.py, prometheus_client)"),
    ("proxy/", "proxy: the rest (handler, reads, policy, headers, answers)"),
    ("cache/redis", "engine: L2 on Redis (cache/redis)"),
    ("redis/", "Redis client (redis-py)"),
    ("cache/", "engine: lookup, single-flight, L1, entries (cache/)"),
    ("cachetools", "engine: lookup, single-flight, L1, entries (cache/)"),
    ("asyncio", "event loop (asyncio, uvloop)"),
    ("uvloop", "event loop (asyncio, uvloop)"),
)


def area_of(path: str, function: str) -> str:
    if path == "~":  # a built-in: its name says what it works on
        if "uvloop" in function or "socket" in function or "Transport" in function:
            return "event loop (asyncio, uvloop)"
        return "built-ins (C functions called from Python)"
    for pattern, area in AREAS:
        if pattern in path:
            return area
    return "other"


def _short(path: str) -> str:
    """A function's file as a reader finds it: from the package or the checkout's root."""
    found = re.search(r"/lib/python3\.\d+/(?:site-packages/)?(.*)$", path)
    if found:
        return found[1]
    found = re.search(r"/((?:proxy|cache|bench)/.*)$", path)
    return found[1] if found else path


def render(stats: pstats.Stats, args: argparse.Namespace, rate: float, tree: str) -> str:
    table = stats.stats  # type: ignore[attr-defined]
    total = sum(row[2] for row in table.values())
    areas: Counter[str] = Counter()
    for (path, _line, function), row in table.items():
        areas[area_of(path, function)] += row[2]
    tiers = "L1 + L2 on Redis" if args.l2 else "L1 only"
    lines = [
        f"#### A miss under cProfile: {args.requests:,} GETs of keys not read before, "
        f"{args.concurrency} at a time, {tiers} ({tree})",
        "",
        f"{total / args.requests * 1e6:,.0f} µs of profiled time per miss in cachecar's process "
        f"({rate:,.0f} misses/s under the profiler; cProfile's own cost is in every figure).",
        "",
        "| where | share |",
        "| --- | ---: |",
    ]
    lines += [f"| {area} | {seconds / total:.1%} |" for area, seconds in areas.most_common()]
    # cProfile counts each resumption of a coroutine as a call.
    lines += ["", "| function | calls (and resumptions) per miss | share |"]
    lines.append("| --- | ---: | ---: |")
    ranked = sorted(table.items(), key=lambda item: item[1][2], reverse=True)
    for (path, line, function), row in ranked[: args.top]:
        where = function if path == "~" else f"{_short(path)}:{line} {function}"
        lines.append(f"| `{where}` | {row[1] / args.requests:.2f} | {row[2] / total:.1%} |")
    return "\n".join(lines)


async def _populate(session: aiohttp.ClientSession, origin: str, keys: int) -> None:
    pending = iter(range(keys))

    async def worker() -> None:
        for n in pending:
            async with session.put(f"{origin}/items/{n}", data=wrk.body(str(n))) as response:
                response.raise_for_status()

    await asyncio.gather(*(worker() for _ in range(32)))


async def _read(session: aiohttp.ClientSession, url: str, keys: range, concurrency: int) -> None:
    pending = iter(keys)

    async def worker() -> None:
        for n in pending:
            async with session.get(f"{url}/items/{n}") as response:
                body = await response.read()
                if response.status != 200 or body != wrk.body(str(n)):
                    raise RuntimeError(f"/items/{n} answered {response.status}: {body[:80]!r}")

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def profile(args: argparse.Namespace, directory: Path, redis_url: str) -> str:
    cpus = sorted(os.sched_getaffinity(0))
    pin = ["taskset", "-c", str(cpus[0])] if len(cpus) > 1 else []
    if len(cpus) > 1:
        os.sched_setaffinity(0, {cpus[1]})
    keys = WARM_UP + args.requests
    prefix = f"bench-miss-profile:{secrets.token_hex(4)}:"
    tree: Path | None = args.tree
    with Processes(directory) as processes:
        async with aiohttp.ClientSession() as session:
            port = free_port()
            origin = processes.spawn("origin", [*cachecar_command(), "origin", "--port", str(port)])
            origin_url = f"http://127.0.0.1:{port}"
            await wait_http(session, origin_url + "/", origin, within=WITHIN)
            await _populate(session, origin_url, keys)
            listen, admin = free_port(), free_port()
            l2 = (
                f'l2: {{url: "{redis_url}", key_prefix: "{prefix}", ttl: 10m}}\n'
                if args.l2
                else "l2: {url: null}\ncoherence: {enabled: false}\n"
            )
            config = directory / "cachecar.yaml"
            config.write_text(
                f'server: {{listen: "127.0.0.1:{listen}"}}\n'
                f'admin: {{listen: "127.0.0.1:{admin}"}}\n'
                f'upstream: {{url: "{origin_url}"}}\n'
                "l1: {max_entries: 1000000, max_bytes: 1GiB, ttl: 10m}\n"
                f"{l2}"
                "routes:\n"
                '  - {path: "/items/{id}", key: "items:{id}", ttl: {l1: 10m, l2: 10m}}\n'
            )
            output = directory / "miss.prof"
            command = [sys.executable, "-m", "cProfile", "-o", str(output), "-m", "proxy"]
            cachecar = processes.spawn(
                "cachecar",
                [*pin, *command, "serve", "-c", str(config)],
                env={"PYTHONPATH": str(tree)} if tree else None,
                cwd=tree,
            )
            url = f"http://127.0.0.1:{listen}"
            await wait_http(session, url + "/", cachecar, within=WITHIN)
            await _read(session, url, range(args.requests, keys), args.concurrency)
            started = time.perf_counter()
            await _read(session, url, range(args.requests), args.concurrency)
            rate = args.requests / (time.perf_counter() - started)
            cachecar.stop(WITHIN)
        if args.l2:
            async with Redis.from_url(redis_url) as redis:
                await drop_prefix(redis, prefix, lambda line: None)
        if not output.exists():
            raise RuntimeError(f"cachecar wrote no profile; its log:\n{cachecar.tail()}")
        return render(pstats.Stats(str(output)), args, rate, str(tree or "this checkout"))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.miss_profile", description=__doc__)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--no-l2", dest="l2", action="store_false", help="L1 only")
    parser.add_argument("--tree", help="profile the cachecar source in this directory")
    parser.add_argument("--top", type=int, default=20, help="functions listed")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.tree = Path(args.tree).resolve() if args.tree else None
    redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379")
    with tempfile.TemporaryDirectory(prefix="cachecar-miss-profile-") as directory:
        print(asyncio.run(profile(args, Path(directory), redis_url)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
