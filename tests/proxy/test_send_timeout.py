"""server.send_timeout: a client that leaves its answer unread is cut off, and an origin
connection its answer held is given back; a small answer is read whole first, so a slow reader
holds no origin connection at all."""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from proxy.app import build_proxy_app
from proxy.config import parse_settings
from proxy.fastpath import FastPath
from proxy.listen import proxy_site
from tests.ports import free_port
from tests.proxy.conftest import Origin

SEND_TIMEOUT = 0.3
LARGE = b"L" * (4 << 20)  # past every socket buffer, and past HELD_WHOLE: relayed as it comes
SMALL = b"s" * (256 << 10)  # HELD_WHOLE: read whole before it is written
ROUTES = """
routes:
  - path: /users/{id}
    key: "users:{id}"
  - path: /raw/{id}
    mode: bypass
"""


@pytest.fixture(params=[False, True], ids=["hit-path", "access-log"])
async def port(origin: Origin, request: pytest.FixtureRequest) -> AsyncIterator[int]:
    """cachecar's proxy port as ``cachecar serve`` serves it, one origin connection only;
    with the access log on, every request is aiohttp's (no hit path)."""
    origin.reply("/raw/large", LARGE)
    origin.reply("/users/large", LARGE)
    origin.reply("/raw/small", SMALL)
    listen = free_port()
    settings = parse_settings(
        f"upstream: {{url: {origin.url!r}, timeout: 1s, max_connections: 1}}\n"
        f"server: {{send_timeout: {SEND_TIMEOUT}s, listen: '127.0.0.1:{listen}', "
        f"access_log: {str(request.param).lower()}}}\n" + ROUTES,
        env={},
    )
    app = build_proxy_app(settings)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await proxy_site(app, runner, settings, reuse_port=False).start()
    try:
        yield listen
    finally:
        await runner.cleanup()


async def unread(port: int, path: str) -> tuple[socket.socket, asyncio.StreamWriter]:
    """A GET of ``path`` from a client that reads nothing, with a 4 KiB receive buffer."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    _, writer = await asyncio.open_connection(sock=sock, limit=1024)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: slow\r\n\r\n".encode())
    return sock, writer


def established(sock: socket.socket) -> bool:
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
    state: int = struct.unpack("B", info[:1])[0]
    return state == 1  # TCP_ESTABLISHED


async def cut_after(sock: socket.socket, within: float) -> float:
    started = time.monotonic()
    while established(sock):
        assert time.monotonic() - started < within, "the client was never cut off"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def get(port: int, path: str) -> tuple[int, bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}{path}") as answer,
    ):
        return answer.status, await answer.read()


@pytest.mark.parametrize("path", ["/raw/large", "/users/large"], ids=["relayed", "cached"])
async def test_a_client_that_reads_nothing_is_reset_after_send_timeout(
    port: int, path: str
) -> None:
    if path == "/users/large":
        assert (await get(port, path))[0] == 200  # now an L1 hit: written whole at once
    sock, writer = await unread(port, path)
    try:
        took = await cut_after(sock, within=3.0)
    finally:
        writer.close()
    assert SEND_TIMEOUT <= took < SEND_TIMEOUT + 1.5
    # The relay's origin connection went with it: the only one is free again.
    assert (await get(port, "/raw/other"))[0] == 200


async def test_a_small_answer_left_unread_holds_no_origin_connection(
    port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Loopback's socket buffers would take the whole answer; a slow client far away has
    # small ones, which leave the answer's rest in cachecar, waiting to be written.
    made = FastPath.connection_made

    def small_buffers(self: FastPath, transport: asyncio.BaseTransport) -> None:
        transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        made(self, transport)

    monkeypatch.setattr(FastPath, "connection_made", small_buffers)
    sock, writer = await unread(port, "/raw/small")
    try:
        await asyncio.sleep(0.1)
        # Read whole and given back before it was written: the one connection is free at
        # once, not once the slow client is cut off.
        started = time.monotonic()
        assert (await get(port, "/raw/other"))[0] == 200
        assert time.monotonic() - started < SEND_TIMEOUT / 2
        assert established(sock)  # still being written to, not cut off yet
    finally:
        writer.close()
