"""Slow clients holding origin connections: 200 of them against a proxy with 8.

Half of them trickle a request body (one byte every 250 ms, under ``server.body_timeout``);
the others ask for an answer and read it slowly (1 KiB every 250 ms) or not at all, with a
receive buffer of 4 KiB. Fast clients keep reading and writing beside them on the same
uncached routes, through the same ``upstream.max_connections: 8``. What a user relies on:
every fast request is answered 2xx, the trickled bodies are answered 408 once
``server.body_deadline`` has passed, a client that leaves an answer unread is cut off
``server.send_timeout`` after its connection stopped taking bytes, and no origin connection is
left held once they are gone. The origin is a tiny aiohttp app inside the test; cachecar runs
as a process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.e2e.conftest import Spawn, start_proxy
from tests.faults.conftest import Figures
from tests.faults.harness import (
    Load,
    Sample,
    established_to,
    ms,
    p50,
    p99,
    proxy_config,
    serving,
)
from tests.ports import free_port

pytestmark = pytest.mark.e2e

MAX_CONNECTIONS = 8  # upstream.max_connections
UPSTREAM_TIMEOUT = 2.0  # upstream.timeout: the longest a request waits for a free connection
BODY_TIMEOUT = 1.0  # server.body_timeout: the uploaders' pauses (0.25 s) stay under it
BODY_DEADLINE = 2.0  # server.body_deadline
SEND_TIMEOUT = 1.0  # server.send_timeout

UPLOADERS = 100  # trickle a 100 kB body
READERS = 96  # ask for a 256 KiB answer (held whole: no origin connection while it is read)
STREAM_READERS = 4  # ask for a 4 MiB answer (relayed: one origin connection each)
TRICKLE = 0.25  # seconds between the slow clients' bytes (or KiB, for the readers)
HOLD = 5.0  # seconds the slow clients are at it while the fast ones are measured

SMALL = b"s" * (256 << 10)
LARGE = b"L" * (4 << 20)
_TCP_ESTABLISHED = 1


class Origin:
    """Small JSON answers, a 256 KiB and a 4 MiB answer, and uploads (answered with their
    size), on 127.0.0.1."""

    def __init__(self) -> None:
        self.port = free_port()
        self.uploads = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def item(self, request: web.Request) -> web.Response:
        return web.json_response({"item": request.match_info["n"]})

    async def upload(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.uploads += 1
        return web.json_response({"got": len(body)})

    async def small(self, request: web.Request) -> web.Response:
        return web.Response(body=SMALL)

    async def large(self, request: web.Request) -> web.Response:
        return web.Response(body=LARGE)

    async def hold(self, request: web.Request) -> web.Response:
        await asyncio.sleep(0.5)
        return web.json_response({"held": True})

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Origin]:
        app = web.Application(client_max_size=1 << 20)
        app.router.add_get("/items/{n}", self.item)
        app.router.add_post("/upload", self.upload)
        app.router.add_get("/small", self.small)
        app.router.add_get("/large", self.large)
        app.router.add_get("/hold", self.hold)
        async with serving(app, self.port):
            yield self


@dataclass(frozen=True)
class Outcome:
    """What became of one slow client."""

    status: int | None  # the answer's status; None: none came
    seconds: float  # from its request head to the answer (or to the cut)
    cut: bool  # its connection was closed under it before the answer was whole
    detail: str = ""


async def upload_slowly(port: int) -> Outcome:
    """A 100 kB body announced, one byte of it sent every ``TRICKLE`` seconds."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    writer.write(b"POST /upload HTTP/1.1\r\nHost: slow\r\nContent-Length: 100000\r\n\r\n")
    answer = asyncio.ensure_future(reader.read(4096))
    try:
        while time.monotonic() - started < HOLD + BODY_DEADLINE:
            await asyncio.wait([answer], timeout=TRICKLE)
            if answer.done():
                break
            with contextlib.suppress(ConnectionError):
                writer.write(b"x")
                await writer.drain()
        seconds = time.monotonic() - started
        if not answer.done():
            return Outcome(None, seconds, False, "no answer")
        try:
            got = answer.result()
        except ConnectionError:
            return Outcome(None, seconds, True)
        head, _, body = got.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else None
        return Outcome(status, seconds, not got, body.decode("utf-8", "replace"))
    finally:
        answer.cancel()
        writer.close()


def tcp_state(sock: socket.socket) -> int:
    """The kernel's state of a TCP socket (1: established), from TCP_INFO's first byte."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
    return int(struct.unpack("B", info[:1])[0])


async def read_slowly(port: int, path: str, expected: int, *, reading: bool) -> Outcome:
    """GET ``path`` with a 4 KiB receive buffer; read 1 KiB every ``TRICKLE`` seconds, or
    nothing (``reading`` False). Cut: the connection left the established state (a reset or
    a close from cachecar) before the whole answer was read; watched in the kernel, so a
    client that reads nothing sees it too."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    # A small stream buffer too: the reader's own buffer must not read on its behalf.
    reader, writer = await asyncio.open_connection(sock=sock, limit=1024)
    started = time.monotonic()
    got = 0
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: slow\r\n\r\n".encode())
        while time.monotonic() - started < HOLD + SEND_TIMEOUT:
            await asyncio.sleep(TRICKLE)
            if tcp_state(sock) != _TCP_ESTABLISHED:
                return Outcome(None, time.monotonic() - started, True)
            if reading:
                try:
                    chunk = await reader.read(1024)
                except ConnectionError:
                    return Outcome(None, time.monotonic() - started, True)
                got += len(chunk)
                if got >= expected:
                    return Outcome(200, time.monotonic() - started, False)
        return Outcome(None, time.monotonic() - started, False, f"{got} bytes read")
    finally:
        writer.close()


async def upload_fast(session: aiohttp.ClientSession, url: str, samples: list[Sample]) -> None:
    """Fast uploads of 1 kB, one after another, each kept as a Sample."""
    began = time.monotonic()
    while time.monotonic() - began < HOLD:
        at = time.monotonic()
        try:
            async with session.post(url, data=b"f" * 1000) as answer:
                body = await answer.read()
                ok = answer.status == 200 and json.loads(body) == {"got": 1000}
                status = answer.status if ok else 0
                error = "" if ok else body[:200].decode("utf-8", "replace")
        except (aiohttp.ClientError, TimeoutError) as exc:
            status, error = 0, f"{type(exc).__name__}: {exc}"
        samples.append(Sample(at - began, status, time.monotonic() - at, "", error))
        await asyncio.sleep(0.01)


async def test_slow_clients_are_cut_off_and_never_keep_fast_ones_from_the_origin(
    spawn: Spawn, tmp_path: Path, figures: Figures
) -> None:
    async with Origin().running() as origin:
        config = proxy_config(
            tmp_path / "c.yaml",
            f"""\
            upstream: {{url: "{origin.url}", timeout: {UPSTREAM_TIMEOUT:g}s,
                        max_connections: {MAX_CONNECTIONS}}}
            """,
            server=f"body_timeout: {BODY_TIMEOUT:g}s, body_deadline: {BODY_DEADLINE:g}s, "
            f"send_timeout: {SEND_TIMEOUT:g}s",
        )
        proxy = await start_proxy(spawn, config)
        port = int(proxy.url.rsplit(":", 1)[1])
        pid = proxy.process.popen.pid
        held: list[int] = []
        sampling = True

        async def sample_origin_connections() -> None:
            while sampling:
                held.append(await asyncio.to_thread(established_to, origin.port, pid))
                await asyncio.sleep(0.1)

        timeout = aiohttp.ClientTimeout(total=UPSTREAM_TIMEOUT + 3)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            sampler = asyncio.create_task(sample_origin_connections())
            uploads: list[Sample] = []
            async with Load(
                session, lambda n: f"{proxy.url}/items/{n}", concurrency=4, timeout=5.0
            ) as reads:
                fast_writes = [
                    asyncio.create_task(upload_fast(session, proxy.url + "/upload", uploads))
                    for _ in range(2)
                ]
                slow = [asyncio.create_task(upload_slowly(port)) for _ in range(UPLOADERS)]
                slow += [
                    asyncio.create_task(read_slowly(port, "/small", len(SMALL), reading=n % 2 == 0))
                    for n in range(READERS)
                ]
                slow += [
                    asyncio.create_task(read_slowly(port, "/large", len(LARGE), reading=n % 2 == 0))
                    for n in range(STREAM_READERS)
                ]
                await asyncio.gather(*fast_writes)
            outcomes = await asyncio.gather(*slow)
            # Every origin connection is free again: as many requests at once as there are
            # connections, each held 0.5 s by the origin, all answered.
            after = await asyncio.gather(
                *(session.get(proxy.url + "/hold") for _ in range(MAX_CONNECTIONS))
            )
            after_statuses = sorted(answer.status for answer in after)
            for answer in after:
                answer.release()
            sampling = False
            await sampler
        assert proxy.process.popen.poll() is None

    uploaders = outcomes[:UPLOADERS]
    readers = outcomes[UPLOADERS : UPLOADERS + READERS]
    streamed = outcomes[UPLOADERS + READERS :]
    fast = reads.samples + uploads
    failed = [s for s in fast if not 200 <= s.status < 300]
    assert failed == [], failed[:5]
    assert len(reads.samples) > 100, "fast GETs were barely served"
    assert len(uploads) > 20, "fast POSTs were barely served"

    # Each trickled body is answered 408 once body_deadline has passed, never sent on.
    assert {u.status for u in uploaders} == {408}, uploaders[:3]
    assert all("request body too slow" in u.detail for u in uploaders), uploaders[:1]
    upload_times = [u.seconds for u in uploaders]
    assert min(upload_times) >= BODY_DEADLINE - 0.05
    assert max(upload_times) <= BODY_DEADLINE + 1.0
    assert origin.uploads == len(uploads)  # only the fast ones reached the origin

    # A streamed answer left unread is cut off send_timeout after it stalled.
    assert all(r.cut for r in streamed), streamed
    stream_times = [r.seconds for r in streamed]
    assert max(stream_times) <= SEND_TIMEOUT + 1.5
    # Held whole, a 256 KiB answer holds no origin connection; on loopback it fits in the
    # sockets' buffers, so a cut-off of one would only come from a stalled write.
    readers_cut = [r for r in readers if r.cut]
    assert all(SEND_TIMEOUT <= r.seconds <= SEND_TIMEOUT + 1.5 for r in readers_cut)

    assert after_statuses == [200] * MAX_CONNECTIONS
    assert max(held) <= MAX_CONNECTIONS + 1

    table = figures("Slow clients holding origin connections")
    table.add(
        "slow clients",
        f"{UPLOADERS} trickling a 100 kB body (1 byte / {TRICKLE:g} s), {READERS} asking for "
        f"a 256 KiB answer and {STREAM_READERS} for a 4 MiB one, half of each reading 1 KiB / "
        f"{TRICKLE:g} s, half reading nothing",
    )
    table.add(
        "limits",
        f"upstream.max_connections {MAX_CONNECTIONS}, server.body_timeout {BODY_TIMEOUT:g} s, "
        f"body_deadline {BODY_DEADLINE:g} s, send_timeout {SEND_TIMEOUT:g} s",
    )
    table.add(
        "trickled bodies: answered 408, first / last",
        f"{sum(u.status == 408 for u in uploaders)}, after {min(upload_times):.2f} s / "
        f"{max(upload_times):.2f} s; none reached the origin",
    )
    table.add(
        "4 MiB answers read slowly or not at all: cut off, first / last",
        f"{sum(r.cut for r in streamed)} of {STREAM_READERS}, after {min(stream_times):.2f} s "
        f"/ {max(stream_times):.2f} s",
    )
    table.add(
        "256 KiB answers (held whole): cut off / not (loopback's socket buffers took them)",
        f"{len(readers_cut)} / {sum(not r.cut for r in readers)}",
    )
    table.add("fast GETs (uncached): requests, p50 / p99", _load(reads.samples))
    table.add("fast POSTs of 1 kB (uncached): requests, p50 / p99", _load(uploads))
    table.add("fast requests not answered 2xx", len(failed))
    table.add(
        "origin connections cachecar held open, most at once (sampled every 0.1 s)",
        f"{max(held)}: at most {MAX_CONNECTIONS} in use, and one more the pool may keep",
    )
    table.add(
        f"afterwards: {MAX_CONNECTIONS} requests held 0.5 s by the origin, at once",
        f"all {MAX_CONNECTIONS} answered 200: no connection left held",
    )


def _load(samples: list[Sample]) -> str:
    return f"{len(samples)}, {ms(p50(samples))} / {ms(p99(samples))}"
