"""cachecar beside nginx proxy_cache, Varnish and bare aiohttp: the same workloads, the same
connections, the same seconds, one machine, one run.

    install what is missing (bench.peers) -> one `cachecar origin`, 1 KiB JSON per key, filled
    by PUTs through wrk -> the targets (bench.targets), pinned to one CPU; wrk, the stampede
    client and the origin pinned to the other
    -> (a) L1 hit, one hot key            cachecar, nginx, varnish, aiohttp dict (+ unloaded, -c1)
       (b) L1 hit, warm keys, uniform     the same
       (c) L2 hit                         cachecar with L1 off on the route; aiohttp + Redis GET
       (d) Zipf(0.99), cache 10% of keys  cachecar L1 only and L1 + L2, nginx, varnish: one
                                          byte budget; origin requests counted
       (e) stampede on cold keys          cachecar, nginx, varnish: origin requests per key
       (f) 100 hot keys written           cachecar write-behind vs write-through; flush rate
                                          (bench.write_behind's workload B)
       (g) L1 memory                      cachecar's RSS before and after filling l1.max_bytes
    -> a markdown section (bench.results) on stdout; --write FILE puts it between its markers
    -> every process stopped, the temp dir removed, the run's Redis keys deleted (SCAN + DEL),
       on an error or Ctrl-C too

python -m bench.side_by_side [--seconds 5] [--connections 64] [--targets ...] [--quick]
                             [--write docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import aiohttp
from redis.asyncio import Redis
from redis.exceptions import RedisError

from bench import markdown, peers, results, workloads, wrk
from bench.harness import Harness, progress
from bench.machine import cachecar_version
from bench.params import FULL, QUICK, Params
from bench.processes import BenchError, Processes, wind_down
from bench.results import Report
from bench.targets import cpus
from proxy.cli import run
from proxy.units import parse_duration

RUN_LIMIT = 30 * 60.0  # the whole benchmark, whatever happens
TARGETS = ("cachecar", "nginx", "varnish", "aiohttp")
# The workloads, in the order they run (bench/workloads.py); --workloads picks some.
WORKLOADS = {
    "hits": workloads.hits,
    "l2": workloads.l2,
    "zipf": workloads.zipf,
    "mix": workloads.mix,
    "writes": workloads.writes,
    "memory": workloads.memory,
}


async def bench(params: Params, processes: Processes, directory: Path, redis_url: str) -> Report:
    wanted = [peers.WRK]
    wanted += [peers.NGINX] if "nginx" in params.targets else []
    wanted += [peers.VARNISH] if "varnish" in params.targets else []
    tools, skipped = peers.ensure(tuple(wanted))
    if peers.WRK.program not in tools:
        raise BenchError(" ".join(skipped))
    run_prefix = f"cachecar-bench:{uuid.uuid4().hex[:12]}:"
    redis = Redis.from_url(redis_url, socket_connect_timeout=2, socket_timeout=10)
    try:
        try:
            info = await redis.info("server")
        except (RedisError, OSError) as exc:
            raise BenchError(f"Redis at {redis_url} does not answer: {exc}") from None
        report = Report(
            params=params,
            started=datetime.now(UTC),
            versions=_versions(tools, str(info["redis_version"])),
            skipped=skipped,
            pinned=_pinning(),
        )
        try:
            async with asyncio.timeout(RUN_LIMIT):
                await _phases(report, processes, directory, tools, redis, redis_url, run_prefix)
        finally:
            await wind_down(processes, report.troubles, redis, run_prefix, progress)
    finally:
        await redis.aclose()
    return report


async def _phases(
    report: Report,
    processes: Processes,
    directory: Path,
    tools: dict[str, str],
    redis: Redis,
    redis_url: str,
    run_prefix: str,
) -> None:
    timeout = aiohttp.ClientTimeout(total=60)
    connector = aiohttp.TCPConnector(limit=100)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        harness = Harness(
            report.params,
            report,
            processes,
            directory,
            session,
            tools,
            redis,
            redis_url,
            run_prefix,
        )
        try:
            await harness.start_origin()
            await harness.populate()
            for name in report.params.workloads:
                await WORKLOADS[name](harness)
        finally:
            harness.wrk.stopping.set()  # a wrk still running in a thread (an error, Ctrl-C)


def _versions(tools: dict[str, str], redis_version: str) -> dict[str, str]:
    found = {
        "cachecar": cachecar_version(),
        "Python": platform.python_version(),
        "aiohttp": _package("aiohttp"),
        "uvloop": _package("uvloop"),
        "redis-py": _package("redis"),
        "hiredis": _package("hiredis"),
        "redis-server": redis_version,
        "wrk": wrk.version(tools[peers.WRK.program]),
    }
    if peers.NGINX.program in tools:
        found["nginx"] = peers.nginx_version(tools[peers.NGINX.program])
    if peers.VARNISH.program in tools:
        found["varnish"] = peers.varnish_version(tools[peers.VARNISH.program])
    return found


def _package(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def _pinning() -> str:
    available = cpus()
    server, client = wrk.pinned(available, 0), wrk.pinned(available, 1)
    if server is None:
        return f"not pinned: {len(available)} CPU, shared by the server, wrk and the origin"
    return (
        f"the server under test on CPU {server}; wrk, the stampede client and the origin on CPU "
        f"{client} (taskset); Redis not pinned"
    )


# -- the command ---------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> tuple[Params, Path | None, Path | None]:
    parser = argparse.ArgumentParser(
        prog="python -m bench.side_by_side",
        description="cachecar beside nginx proxy_cache, Varnish and bare aiohttp handlers on the "
        "same workloads, against the Redis at REDIS_URL; a markdown report on stdout.",
    )
    parser.add_argument("--seconds", type=float, help="each measured run (5; --quick 0.3)")
    parser.add_argument("--connections", type=int, help="wrk connections (64; --quick 16)")
    parser.add_argument(
        "--targets",
        default=",".join(TARGETS),
        help=f"comma-separated, of {', '.join(TARGETS)} (aiohttp: both bare handlers); default all",
    )
    parser.add_argument(
        "--workloads",
        default=",".join(WORKLOADS),
        help=f"comma-separated, of {', '.join(WORKLOADS)}; default all (not with --write: the "
        "report in the docs is of a whole run)",
    )
    parser.add_argument("--latency", default="0ms", help="the origin's added latency (0ms)")
    parser.add_argument(
        "--write",
        type=Path,
        metavar="FILE",
        help="put the report between its markers in FILE (docs/benchmarks.md)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: tiny durations and key counts"
    )
    parser.add_argument(
        "--keep",
        type=Path,
        metavar="DIR",
        help="keep the logs, configs and wrk scripts in DIR (a new directory) instead of a "
        "temp dir that is removed",
    )
    args = parser.parse_args(argv)
    try:
        parse_duration(args.latency)
    except ValueError as exc:
        parser.error(f"--latency: {exc}")
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    unknown = set(targets) - set(TARGETS)
    if unknown:
        parser.error(f"unknown targets {', '.join(sorted(unknown))} (use {', '.join(TARGETS)})")
    chosen = tuple(w.strip() for w in args.workloads.split(",") if w.strip())
    unknown = set(chosen) - set(WORKLOADS)
    if unknown or not chosen:
        parser.error(
            f"unknown workloads {', '.join(sorted(unknown)) or '(none)'} "
            f"(use {', '.join(WORKLOADS)})"
        )
    if args.write is not None and set(chosen) != set(WORKLOADS):
        parser.error("--write needs every workload: the report in the docs is of a whole run")
    params = Params(
        **(QUICK if args.quick else FULL),
        latency=args.latency,
        targets=targets,
        quick=args.quick,
        workloads=tuple(w for w in WORKLOADS if w in chosen),
    )
    if args.seconds is not None:
        if args.seconds <= 0:
            parser.error("--seconds must be above 0")
        params = replace(params, seconds=args.seconds)
    if args.connections is not None:
        if args.connections < 1:
            parser.error("--connections must be 1 or more")
        params = replace(params, connections=args.connections)
    if args.keep is not None and args.keep.exists():
        parser.error(f"--keep {args.keep}: it exists; name a new directory")
    return params, args.write, args.keep


@contextlib.contextmanager
def _directory(keep: Path | None) -> Iterator[Path]:
    """Where the logs, configs and scripts go: a temp dir removed at the end, or ``keep``."""
    if keep is not None:
        keep.mkdir(parents=True)
        yield keep.resolve()
        return
    with tempfile.TemporaryDirectory(prefix="cachecar-side-by-side-") as directory:
        yield Path(directory)


def main(argv: Sequence[str] | None = None) -> int:
    params, write, keep = parse_args(argv)
    redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379")
    started = time.monotonic()
    try:
        with (
            _directory(keep) as directory,
            Processes(directory) as processes,
        ):
            report: Report = run(bench(params, processes, directory, redis_url))
    except BenchError as exc:
        progress(f"FAILED: {exc}")
        return 1
    except KeyboardInterrupt:
        progress("interrupted: every process stopped, the run's Redis keys deleted")
        return 130
    report.seconds = time.monotonic() - started
    text = markdown.render(report)
    sys.stdout.write(text)
    if report.problems:
        progress("FAILED: " + " | ".join(report.problems))
        return 1
    if write is not None:
        results.write_section(write, text)
        progress(f"wrote the section of {write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
