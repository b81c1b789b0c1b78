"""Header limits of a running ``cachecar serve``: the request line and header fields are bounded
by ``server.max_header_size``, their number by ``server.max_headers``."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.e2e.conftest import Config, Spawn, start_origin, start_proxy
from tests.ports import free_port


async def ask(url: str, head: str) -> bytes:
    """The raw answer to one request written as ``head`` (the status line and headers)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(head.encode() + b"\r\n")
        await writer.drain()
        async with asyncio.timeout(10):
            return await reader.read(65536)
    finally:
        writer.close()


async def test_header_limits_come_from_the_config_and_are_answered_400(
    spawn: Spawn, tmp_path: Path
) -> None:
    origin = await start_origin(spawn)
    await origin.put("/users/1", {"name": "ada"})
    port, admin = free_port(), free_port()
    path = tmp_path / "limits.yaml"
    path.write_text(
        f"server: {{listen: '127.0.0.1:{port}', max_header_size: 1KiB, max_headers: 10, "
        "idle_timeout: 1s}\n"
        f"admin: {{listen: '127.0.0.1:{admin}'}}\n"
        f"upstream: {{url: '{origin.url}'}}\n"
        "routes: [{path: '/users/{id}', key: 'users:{id}'}]\n"
    )
    proxy = await start_proxy(
        spawn, Config(path, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin}")
    )
    request = "GET /users/1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"

    fine = await ask(proxy.url, request + "X-Pad: " + "p" * 900 + "\r\n")
    too_long = await ask(proxy.url, request + "X-Pad: " + "p" * 2000 + "\r\n")
    too_many = await ask(proxy.url, request + "".join(f"X-H{i}: v\r\n" for i in range(20)))
    long_line = await ask(proxy.url, f"GET /users/{'1' * 2000} HTTP/1.1\r\nHost: x\r\n")

    assert fine.startswith(b"HTTP/1.1 200 ")
    for answer in (too_long, too_many, long_line):
        # aiohttp answers a request it cannot parse in HTTP/1.0 and closes the connection.
        assert answer.split(b"\r\n")[0] == b"HTTP/1.0 400 Bad Request", answer[:200]
    assert b"Got more than 1024 bytes when reading" in too_long
    assert b"Too many headers" in too_many
    assert b"Got more than 1024 bytes when reading" in long_line
    # Each refusal is one DEBUG line at most: garbage from a client cannot flood the log.
    assert "Error handling request" not in proxy.process.output()

    # A head that never ends (slowloris) is cut off after server.idle_timeout.
    host, port_text = proxy.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port_text))
    try:
        writer.write(b"GET /users/1 HTTP/1.1\r\nHost: x\r\n")
        async with asyncio.timeout(10):
            for _ in range(100):  # a header line every 100 ms, never the blank line
                writer.write(b"X-Slow: 1\r\n")
                await writer.drain()
                if await _closed(reader, 0.1):
                    break
        assert reader.at_eof()
    finally:
        writer.close()


async def _closed(reader: asyncio.StreamReader, within: float) -> bool:
    try:
        async with asyncio.timeout(within):
            return await reader.read(1) == b""
    except TimeoutError:
        return False
