"""The fault suite's tools: a load generator, a TCP delay proxy, a killable redis-server, a
config writer, and small readers of what cachecar and the kernel report.

    Load           N client loops for as long as the test runs; every answer is a Sample
    serving        a test's own aiohttp origin on 127.0.0.1, for as long as a block runs
    DelayProxy     cachecar -> 127.0.0.1:proxy -> (sleep ``delay`` per chunk) -> Redis
    KillableRedis  a redis-server of the test's own: kill -9, start again on the same port
    established_to how many ESTABLISHED TCP connections lead to a port (/proc/net/tcp)

Everything binds 127.0.0.1, and everything a test starts is stopped when it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import os
import signal
import textwrap
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from pathlib import Path
from types import TracebackType

import aiohttp
import redis.asyncio
from aiohttp import web
from redis.exceptions import RedisError

from tests.e2e.conftest import Config, Process, Spawn
from tests.ports import free_port
from tests.redis_servers import server_args

# -- the load generator ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Sample:
    """One request of a load: when it was sent (seconds since the load began), what came back."""

    at: float
    status: int  # 0: no answer at all (refused, reset, timed out on the client's side)
    latency: float  # seconds
    x_cache: str
    error: str = ""

    @property
    def done(self) -> float:
        """When the answer arrived (seconds since the load began)."""
        return self.at + self.latency


class Load:
    """``concurrency`` loops, each sending a GET to ``url_for(n)`` (n counts every request),
    then pausing ``pause`` seconds, until the ``async with`` block ends."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        url_for: Callable[[int], str],
        *,
        concurrency: int = 4,
        pause: float = 0.01,
        timeout: float = 5.0,
    ) -> None:
        self.samples: list[Sample] = []
        self._session = session
        self._url_for = url_for
        self._concurrency = concurrency
        self._pause = pause
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._started = time.monotonic()
        self._sent = 0
        self._stopping = False
        self._loops: list[asyncio.Task[None]] = []

    def now(self) -> float:
        """Seconds since the load began, on the samples' clock."""
        return time.monotonic() - self._started

    async def __aenter__(self) -> Load:
        self._started = time.monotonic()
        self._loops = [asyncio.create_task(self._loop()) for _ in range(self._concurrency)]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stopping = True
        if exc is not None:
            for loop in self._loops:
                loop.cancel()
        # Each loop finishes the request it has in flight (bounded by the client timeout).
        await asyncio.gather(*self._loops, return_exceptions=exc is not None)

    async def _loop(self) -> None:
        while not self._stopping:
            n, self._sent = self._sent, self._sent + 1
            at = self.now()
            try:
                async with self._session.get(self._url_for(n), timeout=self._timeout) as answer:
                    await answer.read()
                    sample = Sample(
                        at, answer.status, self.now() - at, answer.headers.get("X-Cache", "")
                    )
            except (aiohttp.ClientError, TimeoutError) as exc:
                sample = Sample(at, 0, self.now() - at, "", f"{type(exc).__name__}: {exc}")
            self.samples.append(sample)
            await asyncio.sleep(self._pause)

    def between(self, start: float, end: float = math.inf) -> list[Sample]:
        """The samples sent in [start, end)."""
        return [s for s in self.samples if start <= s.at < end]

    async def first(
        self, wanted: Callable[[Sample], bool], what: str, within: float = 10.0
    ) -> Sample:
        """The first sample (by answer time) matching ``wanted``, waiting for it if need be."""
        deadline = time.monotonic() + within
        while True:
            found = [s for s in self.samples if wanted(s)]
            if found:
                return min(found, key=lambda s: s.done)
            if time.monotonic() > deadline:
                raise AssertionError(f"not within {within}s: {what}")
            await asyncio.sleep(0.02)


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank ``q`` percentile (0 < q <= 100); NaN when there are no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def p50(samples: Iterable[Sample]) -> float:
    return percentile([s.latency for s in samples], 50)


def p99(samples: Iterable[Sample]) -> float:
    return percentile([s.latency for s in samples], 99)


def server_errors(samples: Iterable[Sample]) -> list[Sample]:
    """Answers of 500 and above."""
    return [s for s in samples if s.status >= 500]


def unanswered(samples: Iterable[Sample]) -> list[Sample]:
    """Requests that got no HTTP answer at all."""
    return [s for s in samples if s.status == 0]


def by_window(samples: Sequence[Sample], width: float) -> list[tuple[float, list[Sample]]]:
    """The samples in consecutive windows of ``width`` seconds (by send time), oldest first."""
    if not samples:
        return []
    last = max(s.at for s in samples)
    windows: list[tuple[float, list[Sample]]] = []
    start = 0.0
    while start <= last:
        windows.append((start, [s for s in samples if start <= s.at < start + width]))
        start += width
    return windows


def ms(seconds: float) -> str:
    """A latency for the figures."""
    return "n/a" if math.isnan(seconds) else f"{seconds * 1000:.1f} ms"


# -- an origin of the test's own ------------------------------------------------------------------


@contextlib.asynccontextmanager
async def serving(app: web.Application, port: int) -> AsyncIterator[None]:
    """``app`` on 127.0.0.1:``port`` until the block ends."""
    # A request whose client left is cancelled, so a stop never waits out a slow answer.
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield
    finally:
        await runner.cleanup()


# -- a TCP proxy that delays what it forwards -----------------------------------------------------


class DelayProxy:
    """Forwards every connection to 127.0.0.1:``target``, sleeping ``delay`` seconds before each
    chunk in either direction. ``delay`` may change at any time; it applies to the next chunk.

    ``delays``: which chunks are delayed (default: all); the others pass at once unless one
    is waiting ahead of them on their connection. ``drop_unsent``: a chunk still waiting out
    its delay when its sender's connection closes is dropped, not delivered, as if the sender
    had died before writing it; together they hold a process killed between two writes in the
    state where it made the first and not the second."""

    def __init__(
        self,
        target: int,
        delay: float = 0.0,
        *,
        delays: Callable[[bytes], bool] = lambda chunk: True,
        drop_unsent: bool = False,
    ) -> None:
        self.target = target
        self.delay = delay
        self.delays = delays
        self.drop_unsent = drop_unsent
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._pumps: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> DelayProxy:
        self._server = await asyncio.start_server(self._connect, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        for pump in list(self._pumps):
            pump.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _connect(
        self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter
    ) -> None:
        try:
            upstream_r, upstream_w = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            client_w.close()
            return
        self._writers |= {client_w, upstream_w}
        pumps = [
            asyncio.create_task(self._pump(client_r, upstream_w)),
            asyncio.create_task(self._pump(upstream_r, client_w)),
        ]
        self._pumps.update(pumps)
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        for pump in pumps:
            pump.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        self._pumps.difference_update(pumps)
        for writer in (client_w, upstream_w):
            writer.close()
            self._writers.discard(writer)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while chunk := await reader.read(65536):
                if self.delay > 0 and self.delays(chunk):
                    await asyncio.sleep(self.delay)
                    # EOF or a reset while the chunk waited: its sender is gone.
                    if self.drop_unsent and (reader.at_eof() or reader.exception() is not None):
                        return
                writer.write(chunk)
                await writer.drain()


# -- a redis-server of the test's own -------------------------------------------------------------


class KillableRedis:
    """A redis-server on a fixed port of 127.0.0.1 that a test may kill -9 and start again.

    ``persist``: append-only file fsynced on every write, in ``where``, so a restart finds every
    write it acknowledged; else nothing is saved and a restart comes back empty.
    """

    def __init__(self, spawn: Spawn, where: Path, *, persist: bool = False) -> None:
        self.port = free_port()
        self.where = where
        self.persist = persist
        self._spawn = spawn
        self._starts = 0
        self.process: Process | None = None
        where.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self, within: float = 10.0) -> None:
        """Start it (again) and wait until it answers PING, without blocking the event loop."""
        extra = ("--appendonly", "yes", "--appendfsync", "always") if self.persist else ()
        self._starts += 1
        name = "redis" if self._starts == 1 else f"redis-{self._starts}"
        self.process = self._spawn(name, server_args(self.port, self.where, *extra))
        deadline = time.monotonic() + within
        client = redis.asyncio.Redis.from_url(self.url, socket_timeout=0.5)
        try:
            while True:
                if self.process.popen.poll() is not None:
                    raise AssertionError(f"redis-server exited:\n{self.process.output()}")
                try:
                    await client.ping()
                    return
                except (RedisError, OSError):
                    if time.monotonic() > deadline:
                        raise AssertionError(
                            f"redis-server did not answer within {within}s:\n"
                            f"{self.process.output()}"
                        ) from None
                    await asyncio.sleep(0.02)
        finally:
            await client.aclose()

    def kill(self) -> None:
        """kill -9: no save, no goodbye to the clients."""
        assert self.process is not None
        self.process.stop(signal.SIGKILL)

    async def count(self, pattern: str) -> int:
        """How many keys match ``pattern`` (SCAN, not KEYS)."""
        async with redis.asyncio.Redis.from_url(self.url, socket_timeout=1) as client:
            return len([key async for key in client.scan_iter(match=pattern, count=500)])


# -- cachecar's config, its metrics, the kernel's sockets -----------------------------------------


def proxy_config(path: Path, body: str, *, server: str = "") -> Config:
    """A config file: ``body`` (YAML: upstream, l1, l2, routes...) after a server and an admin
    listener on free ports of 127.0.0.1; ``server``: more ``server`` keys (``idle_timeout: 2s``)."""
    port, admin = free_port(), free_port()
    more = f", {server}" if server else ""
    path.write_text(
        f'server: {{listen: "127.0.0.1:{port}", shutdown_grace: 3s{more}}}\n'
        f'admin: {{listen: "127.0.0.1:{admin}"}}\n' + textwrap.dedent(body)
    )
    return Config(path, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin}")


async def metric(session: aiohttp.ClientSession, admin: str, name: str) -> float:
    """The value of an unlabelled metric on ``admin``'s /metrics."""
    async with session.get(admin + "/metrics") as answer:
        text = await answer.text()
    for line in text.splitlines():
        found, _, value = line.partition(" ")
        if found == name:
            return float(value)
    raise AssertionError(f"{name} is not on /metrics")


async def metric_sum(
    session: aiohttp.ClientSession, admin: str, name: str, where: Callable[[str], bool]
) -> float:
    """The sum of ``name``'s series whose label text (``{...}``) passes ``where``."""
    async with session.get(admin + "/metrics") as answer:
        text = await answer.text()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels, _, value = line.rpartition(" ")
            if where(labels):
                total += float(value)
    return total


_ESTABLISHED = "01"


def established_to(port: int, pid: int | None = None) -> int:
    """ESTABLISHED IPv4 connections whose far end is 127.0.0.1:``port`` (the client side of
    connections to a server on that port), counted from /proc/net/tcp; with ``pid``, only the
    sockets that process holds open (a socket it has closed, still shutting down, is not).

    The kernel takes milliseconds to list a busy machine's sockets: call it in a thread
    (``asyncio.to_thread``) while a test's event loop serves anything."""
    wanted = f"0100007F:{port:04X}"
    held = _socket_inodes(pid) if pid is not None else None
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        if wanted in line:
            fields = line.split()
            if (
                fields[2] == wanted
                and fields[3] == _ESTABLISHED
                and (held is None or fields[9] in held)
            ):
                count += 1
    return count


def _socket_inodes(pid: int) -> set[str]:
    """The inodes of the sockets process ``pid`` has open."""
    found = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:  # closed since the listing
            continue
        if target.startswith("socket:["):
            found.add(target[len("socket:[") : -1])
    return found
