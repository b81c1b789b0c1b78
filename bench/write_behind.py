"""Write-behind beside write-through: origin writes saved by coalescing, and flush throughput.

`cachecar origin` + `cachecar serve` (/wb/{id} write-behind, /wt/{id} write-through, L2 and
the queue on the real Redis under a key prefix of this run, flush_interval 1s)
-> a warm-up, not counted: PUTs to other keys on both routes, until the queue is empty, so
   that neither mode pays for the proxy's first Redis and origin connections
-> A, coalescing: N PUTs round-robin over K keys, paced over S seconds, to /wb/; wait for an
   empty queue; the same to /wt/. The origin's /_stats counts the PUTs that reached it, and
   every key's value there must be its last acknowledged write.
-> B, flush throughput: a second `serve` with a flush interval long enough that M writes to
   distinct keys pile up in the queue; it is then stopped (SIGTERM), which flushes the whole
   queue before it exits, and timed until it has exited.
-> a markdown section on stdout (and --write FILE); every process stopped, the run's Redis
   keys deleted (SCAN + DEL).

python -m bench.write_behind [--puts N] [--keys K] [--seconds S] [--distinct M]
                             [--latency 5ms] [--write FILE] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
from redis.asyncio import Redis
from redis.exceptions import RedisError

from bench.machine import cachecar_version, machine
from bench.processes import (
    BenchError,
    Process,
    Processes,
    cachecar_command,
    free_port,
    until,
    wait_http,
    wind_down,
)
from proxy.cli import run
from proxy.settings import WriteBehindSettings
from proxy.units import parse_duration

IN_FLIGHT = 32  # PUTs the benchmark keeps in flight at once
WARM_UP = 4 * IN_FLIGHT  # PUTs per route before anything is measured
WAIT_LIMIT = 60.0  # no wait (a process starting, a queue draining) lasts longer than this
POLL = 0.05  # how often the queue depth is read while it drains
PILE_UP_INTERVAL = "10m"  # workload B's flush interval: nothing is flushed until the stop
PILE_UP_GRACE = "50s"  # the stop's flush must fit in it (and in WAIT_LIMIT)
RETRIES = 30  # sends of one PUT answered 503 with Retry-After
JSON = {"Content-Type": "application/json"}
WRONG_SHOWN = 5


@dataclass(frozen=True)
class Params:
    puts: int
    keys: int
    seconds: float
    distinct: int
    latency: str  # as `cachecar origin --latency` takes it


@dataclass(frozen=True)
class Mode:
    name: str
    prefix: str  # the route's path prefix, and the origin collection it writes
    key: str  # the route's key template
    acknowledged: frozenset[int]  # the statuses that acknowledge a write


WRITE_BEHIND = Mode("write-behind", "/wb/", "wb:{id}", frozenset({202}))
WRITE_THROUGH = Mode("write-through", "/wt/", "wt:{id}", frozenset(range(200, 300)))


@dataclass
class Coalescing:
    mode: Mode
    acknowledged: int
    origin_writes: int
    send_seconds: float
    at_origin_seconds: float  # from the first PUT until the origin had the last one
    keys_checked: int


@dataclass
class FlushThroughput:
    writes: int
    enqueue_seconds: float
    drain_seconds: float
    origin_writes: int
    batch_size: int
    concurrency: int


@dataclass
class Report:
    params: Params
    started: datetime
    redis_version: str
    coalescing: list[Coalescing] = field(default_factory=list)
    flush: FlushThroughput | None = None
    problems: list[str] = field(default_factory=list)
    troubles: Counter[str] = field(default_factory=Counter)  # warnings the processes logged


@dataclass
class Proxy:
    url: str
    admin: str
    process: Process


class Sender:
    """PUTs through the proxy, at most ``IN_FLIGHT`` at once, one write of a key at a time.

    Writes of a key are serialized (asyncio.Lock is first come, first served) so that the last
    acknowledged write of a key is also the last one the proxy took: the value the origin
    must end with.
    """

    def __init__(self, session: aiohttp.ClientSession, base: str, mode: Mode) -> None:
        self._session = session
        self._base = base + mode.prefix
        self._mode = mode
        self._slots = asyncio.Semaphore(IN_FLIGHT)
        self._locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.last_acknowledged: dict[str, bytes] = {}
        self.acknowledged = 0
        self.refused: list[str] = []
        self.retried = 0  # PUTs answered 503 with Retry-After and sent again

    async def submit(self, key: str, n: int) -> None:
        """Start a PUT of ``{"k": key, "n": n}`` as soon as a slot is free."""
        await self._slots.acquire()
        task = asyncio.create_task(self._put(key, json.dumps({"k": key, "n": n}).encode()))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def finish(self) -> None:
        while self._tasks:
            await asyncio.gather(*self._tasks)
        if self.retried:
            _progress(
                f"{self._mode.name}: {self.retried:,} PUTs answered 503 with Retry-After (the "
                "L2 breaker open under this load) were sent again, as a client should"
            )

    async def _put(self, key: str, body: bytes) -> None:
        try:
            async with self._locks.setdefault(key, asyncio.Lock()):
                for attempt in range(RETRIES + 1):
                    try:
                        async with self._session.put(
                            self._base + key, data=body, headers=JSON
                        ) as response:
                            said = await response.read()
                            status = response.status
                            retry_after = response.headers.get("Retry-After")
                    except (aiohttp.ClientError, TimeoutError) as exc:
                        self.refused.append(
                            f"{self._mode.prefix}{key}: {type(exc).__name__}: {exc}"
                        )
                        return
                    if status != 503 or retry_after is None or attempt == RETRIES:
                        break
                    # Refused, never acknowledged: what a client does is to send it again.
                    self.retried += 1
                    await asyncio.sleep(min(float(retry_after), 1.0))
                if status in self._mode.acknowledged:
                    self.acknowledged += 1
                    self.last_acknowledged[key] = body
                else:
                    self.refused.append(f"{self._mode.prefix}{key}: {status} {said[:200]!r}")
        finally:
            self._slots.release()


class Bench:
    def __init__(
        self, params: Params, processes: Processes, logs: Path, session: aiohttp.ClientSession
    ) -> None:
        self._params = params
        self._processes = processes
        self._logs = logs
        self._session = session
        self._origin = ""
        self._token = secrets.token_hex(16)

    async def start_origin(self) -> None:
        port = free_port()
        process = self._processes.spawn(
            "origin",
            [*cachecar_command(), "origin", "--port", str(port), "--latency", self._params.latency],
        )
        self._origin = f"http://127.0.0.1:{port}"
        await wait_http(self._session, self._origin + "/", process, within=WAIT_LIMIT)

    async def start_proxy(
        self, name: str, redis_url: str, key_prefix: str, flush_interval: str, grace: str = "10s"
    ) -> Proxy:
        port, admin = free_port(), free_port()
        config = self._logs / f"{name}.yaml"
        routes = "".join(
            f"  - {{path: {json.dumps(mode.prefix + '{id}')}, mode: {mode.name}, "
            f"key: {json.dumps(mode.key)}}}\n"
            for mode in (WRITE_BEHIND, WRITE_THROUGH)
        )
        config.write_text(
            f'server: {{listen: "127.0.0.1:{port}", shutdown_grace: {grace}}}\n'
            f'admin: {{listen: "127.0.0.1:{admin}", token: "{self._token}"}}\n'
            f'upstream: {{url: "{self._origin}"}}\n'
            f"l2: {{url: {json.dumps(redis_url)}, key_prefix: {json.dumps(key_prefix)}}}\n"
            f"write_behind: {{flush_interval: {flush_interval}}}\n"
            f"routes:\n{routes}"
        )
        process = self._processes.spawn(name, [*cachecar_command(), "serve", "-c", str(config)])
        proxy = Proxy(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin}", process)
        await wait_http(self._session, proxy.admin + "/healthz", process, within=WAIT_LIMIT)
        await wait_http(self._session, proxy.url + "/", process, within=WAIT_LIMIT)
        return proxy

    async def warm_up(self, proxy: Proxy, problems: list[str]) -> None:
        """PUTs on both routes to keys no workload uses, sent as the workload sends them: the
        connection pools a fresh proxy fills on its first burst are filled here, not in
        whichever mode runs first."""
        for mode in (WRITE_BEHIND, WRITE_THROUGH):
            sender = Sender(self._session, proxy.url, mode)
            for n in range(WARM_UP):
                await sender.submit(f"warm-{n}", n)
            await sender.finish()
            problems.extend(_refusals(mode, sender))
        await self._queue_empties(proxy, problems)

    async def coalescing(self, proxy: Proxy, mode: Mode, problems: list[str]) -> Coalescing:
        """Workload A for one mode: paced PUTs round-robin over the keys, then the count."""
        p = self._params
        await self._reset_origin()
        sender = Sender(self._session, proxy.url, mode)
        spacing = p.seconds / p.puts
        started = time.monotonic()
        try:
            async with asyncio.timeout(p.seconds + WAIT_LIMIT):
                for n in range(p.puts):
                    ahead = started + n * spacing - time.monotonic()
                    if ahead > 0:
                        await asyncio.sleep(ahead)
                    await sender.submit(str(n % p.keys), n)
                await sender.finish()
        except TimeoutError:
            raise BenchError(
                f"{mode.name}: {p.puts:,} PUTs not sent within {p.seconds + WAIT_LIMIT:g}s"
            ) from None
        sent = time.monotonic() - started
        if mode is WRITE_BEHIND:
            await self._queue_empties(proxy, problems)
        at_origin = time.monotonic() - started
        problems.extend(_refusals(mode, sender))
        problems.extend(await self._wrong_at_origin(mode, sender.last_acknowledged))
        return Coalescing(
            mode,
            acknowledged=sender.acknowledged,
            origin_writes=await self._origin_puts(mode),
            send_seconds=sent,
            at_origin_seconds=at_origin if mode is WRITE_BEHIND else sent,
            keys_checked=len(sender.last_acknowledged),
        )

    async def flush_throughput(self, proxy: Proxy, problems: list[str]) -> FlushThroughput:
        """Workload B: writes to distinct keys pile up, then the stop's flush is timed."""
        m = self._params.distinct
        await self._reset_origin()
        sender = Sender(self._session, proxy.url, WRITE_BEHIND)
        started = time.monotonic()
        try:
            async with asyncio.timeout(WAIT_LIMIT):
                for n in range(m):
                    await sender.submit(f"d{n}", n)
                await sender.finish()
        except TimeoutError:
            raise BenchError(
                f"{m:,} writes to distinct keys not sent within {WAIT_LIMIT:g}s"
            ) from None
        enqueue = time.monotonic() - started
        problems.extend(_refusals(WRITE_BEHIND, sender))
        depth = (await self._queue_state(proxy))["queue_depth"]
        if depth != sender.acknowledged or await self._origin_puts(WRITE_BEHIND):
            raise BenchError(
                f"the queue held {depth:,} of {sender.acknowledged:,} acknowledged writes before "
                f"the flusher was woken: with flush_interval {PILE_UP_INTERVAL} nothing should "
                "have been flushed yet, so the drain time would not measure the flush"
            )
        woken = time.monotonic()
        # A stop flushes every queued key (their coalescing window included) before it exits.
        code = await asyncio.to_thread(proxy.process.stop, WAIT_LIMIT)
        drained = time.monotonic() - woken
        if code != 0:
            raise BenchError(f"{proxy.process.name} exited {code} while flushing on its stop")
        flushed = await self._origin_puts(WRITE_BEHIND)
        if flushed < sender.acknowledged:
            raise BenchError(
                f"the stop flushed {flushed:,} of {sender.acknowledged:,} queued writes within "
                f"its grace ({PILE_UP_GRACE})"
            )
        problems.extend(await self._wrong_listed(sender.last_acknowledged))
        settings = WriteBehindSettings()
        return FlushThroughput(
            writes=sender.acknowledged,
            enqueue_seconds=enqueue,
            drain_seconds=drained,
            origin_writes=await self._origin_puts(WRITE_BEHIND),
            batch_size=settings.batch_size,
            concurrency=settings.concurrency,
        )

    async def _queue_state(self, proxy: Proxy) -> dict[str, Any]:
        async with self._session.get(proxy.admin + "/admin/write-behind") as response:
            if response.status != 200:
                raise BenchError(
                    f"GET /admin/write-behind answered {response.status}: {await response.text()}"
                )
            state: dict[str, Any] = await response.json()
        return state

    async def _queue_empties(self, proxy: Proxy, problems: list[str]) -> None:
        state: dict[str, Any] = {}

        async def empty() -> bool:
            nonlocal state
            state = await self._queue_state(proxy)
            return bool(state["queue_depth"] == 0)

        await until(
            empty,
            "an empty write-behind queue",
            within=WAIT_LIMIT,
            every=POLL,
            process=proxy.process,
        )
        if state["dead_letter_count"]:
            problems.append(
                f"{state['dead_letter_count']} writes were dead-lettered, e.g. "
                f"{state['dead_letters'][:2]}"
            )

    async def _reset_origin(self) -> None:
        async with self._session.post(self._origin + "/_stats/reset") as response:
            response.raise_for_status()

    async def _origin_puts(self, mode: Mode) -> int:
        async with self._session.get(self._origin + "/_stats") as response:
            stats = await response.json()
        return sum(
            n
            for request, n in stats["by_request"].items()
            if request.startswith("PUT " + mode.prefix)
        )

    async def _wrong_at_origin(self, mode: Mode, expected: dict[str, bytes]) -> list[str]:
        """Keys whose value at the origin is not their last acknowledged write."""
        wrong = []
        for key, body in expected.items():
            async with self._session.get(self._origin + mode.prefix + key) as response:
                status, held = response.status, await response.read()
            if (status, held) != (200, body):
                wrong.append(
                    f"{mode.prefix}{key}: origin has {status} {held[:100]!r}, "
                    f"last acknowledged {body!r}"
                )
        return _wrong(mode, wrong, len(expected))

    async def _wrong_listed(self, expected: dict[str, bytes]) -> list[str]:
        """As ``_wrong_at_origin``, from one listing of the collection (thousands of keys)."""
        collection = WRITE_BEHIND.prefix.strip("/")
        limit = len(expected) + self._params.keys + 1
        async with self._session.get(f"{self._origin}/{collection}?limit={limit}") as response:
            listed = {item["id"]: item["value"] for item in (await response.json())["items"]}
        wrong = [
            f"{WRITE_BEHIND.prefix}{key}: origin has {listed.get(key)!r}, "
            f"last acknowledged {body!r}"
            for key, body in expected.items()
            if listed.get(key) != json.loads(body)
        ]
        return _wrong(WRITE_BEHIND, wrong, len(expected))


def _refusals(mode: Mode, sender: Sender) -> list[str]:
    if not sender.refused:
        return []
    return [
        f"{mode.name}: {len(sender.refused):,} writes not acknowledged, e.g. "
        + "; ".join(sender.refused[:WRONG_SHOWN])
    ]


def _wrong(mode: Mode, wrong: list[str], checked: int) -> list[str]:
    if not wrong:
        return []
    return [
        f"{mode.name}: {len(wrong):,} of {checked:,} keys do not hold their last acknowledged "
        "write at the origin, e.g. " + "; ".join(wrong[:WRONG_SHOWN])
    ]


async def bench(params: Params, processes: Processes, logs: Path, redis_url: str) -> Report:
    run_prefix = f"cachecar-bench:{uuid.uuid4().hex[:12]}:"
    redis = Redis.from_url(redis_url, socket_connect_timeout=2, socket_timeout=10)
    try:
        try:
            info = await redis.info("server")
        except (RedisError, OSError) as exc:
            raise BenchError(f"Redis at {redis_url} does not answer: {exc}") from None
        report = Report(params, datetime.now(UTC), str(info["redis_version"]))
        try:
            await _workloads(report, processes, logs, redis_url, run_prefix)
        finally:
            await wind_down(processes, report.troubles, redis, run_prefix, _progress)
    finally:
        await redis.aclose()
    return report


async def _workloads(
    report: Report, processes: Processes, logs: Path, redis_url: str, run_prefix: str
) -> None:
    timeout = aiohttp.ClientTimeout(total=30)
    connector = aiohttp.TCPConnector(limit=2 * IN_FLIGHT)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        workload = Bench(report.params, processes, logs, session)
        await workload.start_origin()
        proxy = await workload.start_proxy("serve", redis_url, run_prefix + "coalescing:", "1s")
        _progress(f"warm-up: {WARM_UP} PUTs per route, not counted")
        await workload.warm_up(proxy, report.problems)
        for mode in (WRITE_BEHIND, WRITE_THROUGH):
            _progress(f"{mode.name}: {report.params.puts:,} PUTs over {report.params.keys:,} keys")
            report.coalescing.append(await workload.coalescing(proxy, mode, report.problems))
        await asyncio.to_thread(proxy.process.stop)
        proxy = await workload.start_proxy(
            "serve-pile-up", redis_url, run_prefix + "flush:", PILE_UP_INTERVAL, PILE_UP_GRACE
        )
        _progress(f"flush throughput: {report.params.distinct:,} writes to distinct keys")
        report.flush = await workload.flush_throughput(proxy, report.problems)


def render(report: Report) -> str:
    p = report.params
    by_mode = {result.mode.name: result for result in report.coalescing}
    through = by_mode.get(WRITE_THROUGH.name)
    defaults = WriteBehindSettings()
    lines = [
        "## Write-behind against write-through",
        "",
        f"- date: {report.started:%Y-%m-%d %H:%M} UTC",
        f"- machine: {machine()}",
        f"- software: cachecar {cachecar_version()}, Python {platform.python_version()}, "
        f"Redis {report.redis_version}; every process on 127.0.0.1",
        f"- parameters: {p.puts:,} PUTs per mode, round-robin over {p.keys:,} keys, paced over "
        f"{p.seconds:g}s, at most {IN_FLIGHT} in flight, after a warm-up of {WARM_UP} PUTs per "
        f"route to other keys; origin latency {p.latency}; "
        f"write_behind flush_interval 1s, batch_size {defaults.batch_size}, concurrency "
        f"{defaults.concurrency} (the defaults); {p.distinct:,} distinct keys for the flush",
        "",
        "| mode | acknowledged writes | origin writes | write-through ÷ this mode, origin writes "
        "| time to send | all at the origin after |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for mode in (WRITE_THROUGH, WRITE_BEHIND):
        result = by_mode.get(mode.name)
        if result is None:
            continue
        ratio = (
            f"{through.origin_writes / result.origin_writes:.1f}x"
            if through is not None and result.origin_writes
            else "n/a"
        )
        lines.append(
            f"| {mode.name} | {result.acknowledged:,} | {result.origin_writes:,} | {ratio} "
            f"| {result.send_seconds:.2f} s | {result.at_origin_seconds:.2f} s |"
        )
    slow = [r for r in report.coalescing if r.send_seconds > 1.2 * p.seconds]
    if slow:
        lines += [
            "",
            f"Sending took longer than the {p.seconds:g}s asked "
            f"({p.puts / p.seconds:,.0f} PUTs/s): this machine did not keep up, so the rates "
            "are what it managed.",
        ]
    if report.flush is not None:
        f = report.flush
        lines += [
            "",
            f"Flush throughput: {f.writes:,} writes to distinct keys were queued in "
            f"{f.enqueue_seconds:.2f} s ({f.writes / f.enqueue_seconds:,.0f}/s acknowledged) "
            f"with nothing flushed (flush_interval {PILE_UP_INTERVAL}); its stop (SIGTERM) "
            f"flushed the whole queue and exited in {f.drain_seconds:.2f} s: "
            f"**{f.writes / f.drain_seconds:,.0f} flushed writes/s** ({f.origin_writes:,} origin "
            f"PUTs; batch_size {f.batch_size}, concurrency {f.concurrency}, origin latency "
            f"{p.latency}).",
        ]
    lines.append("")
    if report.troubles:
        shown = "; ".join(
            f"{line} ({n}x)" if n > 1 else line
            for line, n in report.troubles.most_common(WRONG_SHOWN)
        )
        lines += [
            f"Logged by the processes: {report.troubles.total():,} "
            f"{'warning or error' if report.troubles.total() == 1 else 'warnings or errors'}, "
            f"e.g. {shown}",
            "",
        ]
    if report.problems:
        lines += ["**FAILED**:", *(f"- {problem}" for problem in report.problems)]
    else:
        checked = ", ".join(f"{r.keys_checked:,} {r.mode.name} keys" for r in report.coalescing)
        flushed = f", {report.flush.writes:,} flushed keys" if report.flush else ""
        lines.append(
            f"Correctness: every write was acknowledged, and every key's value at the origin is "
            f"its last acknowledged write ({checked}{flushed})."
        )
    return "\n".join(lines) + "\n"


def _progress(message: str) -> None:
    print(f"bench.write_behind: {message}", file=sys.stderr, flush=True)


def _positive(kind: type[int] | type[float]) -> Any:
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text!r} is not above 0")
        return value

    return parse


def _latency(text: str) -> str:
    try:
        parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def parse_args(argv: Sequence[str] | None) -> tuple[Params, Path | None]:
    parser = argparse.ArgumentParser(
        prog="python -m bench.write_behind",
        description="Write-behind coalescing and flush throughput beside write-through, "
        "against real cachecar processes and the Redis at REDIS_URL.",
    )
    parser.add_argument("--puts", type=_positive(int), help="PUTs per mode (10000)")
    parser.add_argument("--keys", type=_positive(int), help="keys they are spread over (100)")
    parser.add_argument("--seconds", type=_positive(float), help="how long sending takes (2)")
    parser.add_argument("--distinct", type=_positive(int), help="keys for the flush (20000)")
    parser.add_argument("--latency", type=_latency, default="0ms", help="origin latency (0ms)")
    parser.add_argument("--write", type=Path, metavar="FILE", help="also write the report here")
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: 300 PUTs, 10 keys, 0.3s, 500 distinct"
    )
    args = parser.parse_args(argv)
    defaults = (300, 10, 0.3, 500) if args.quick else (10_000, 100, 2.0, 20_000)
    given = (args.puts, args.keys, args.seconds, args.distinct)
    puts, keys, seconds, distinct = (
        default if value is None else value for value, default in zip(given, defaults, strict=True)
    )
    return Params(int(puts), int(keys), float(seconds), int(distinct), args.latency), args.write


def main(argv: Sequence[str] | None = None) -> int:
    params, write = parse_args(argv)
    redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379")
    try:
        with (
            tempfile.TemporaryDirectory(prefix="cachecar-bench-") as logs,
            Processes(Path(logs)) as processes,
        ):
            report: Report = run(bench(params, processes, Path(logs), redis_url))
    except BenchError as exc:
        _progress(f"FAILED: {exc}")
        return 1
    text = render(report)
    sys.stdout.write(text)
    if report.problems:
        _progress("FAILED: " + " | ".join(report.problems))
        return 1
    if write is not None:
        write.write_text(text)
        _progress(f"wrote {write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
