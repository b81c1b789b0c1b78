"""What the proxy passes through uncached: bodies streamed both ways, headers as they came."""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import os
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from tests.proxy.conftest import MakeProxy, Origin


async def test_an_unmatched_path_is_proxied_uncached(make_proxy: MakeProxy, origin: Origin) -> None:
    proxy = await make_proxy()
    for _ in range(2):
        response = await proxy.get("/elsewhere/1?q=2")
        assert response.status == 200
        assert response.headers["X-Cache"] == "BYPASS"
        assert response.headers["Cache-Status"] == "cachecar; fwd=bypass"
    assert origin.count("/elsewhere/1?q=2") == 2


async def test_a_bypass_route_is_proxied_uncached(make_proxy: MakeProxy, origin: Origin) -> None:
    proxy = await make_proxy()
    await proxy.get("/raw/1")
    assert (await proxy.get("/raw/1")).headers["X-Cache"] == "BYPASS"
    assert origin.count("/raw/1") == 2


async def test_an_uncached_method_on_a_cached_route_is_bypass(
    make_proxy: MakeProxy, origin: Origin
) -> None:
    proxy = await make_proxy()
    response = await proxy.options("/users/1")
    assert response.headers["X-Cache"] == "BYPASS"
    assert response.headers["Cache-Status"] == "cachecar; fwd=method"
    assert origin.last("/users/1").method == "OPTIONS"


async def test_status_headers_and_every_set_cookie_pass_as_they_came(
    make_proxy: MakeProxy, origin: Origin
) -> None:
    async def teapot(request: web.Request) -> web.Response:
        response = web.Response(status=418, text="short and stout", headers={"X-Custom": "1"})
        response.headers.add("Set-Cookie", "a=1")
        response.headers.add("Set-Cookie", "b=2")
        return response

    origin.handlers["/raw/tea"] = teapot
    proxy = await make_proxy()
    response = await proxy.get("/raw/tea", headers={"X-Client": "kept", "Cookie": "c=3"})
    assert response.status == 418
    assert await response.text() == "short and stout"
    assert response.headers["X-Custom"] == "1"
    assert response.headers.getall("Set-Cookie") == ["a=1", "b=2"]
    sent = origin.last("/raw/tea").headers
    assert sent["X-Client"] == "kept"
    assert sent["Cookie"] == "c=3"
    assert sent["X-Forwarded-For"] == "127.0.0.1"


async def test_request_hop_by_hop_headers_do_not_reach_the_origin(
    make_proxy: MakeProxy, origin: Origin
) -> None:
    proxy = await make_proxy()
    await proxy.get(
        "/raw/1",
        headers={
            "Connection": "keep-alive, X-Secret",
            "X-Secret": "1",
            "TE": "trailers",
            "X-Ok": "1",
        },
    )
    sent = origin.last("/raw/1").headers
    assert "X-Secret" not in sent
    assert "TE" not in sent
    assert sent["X-Ok"] == "1"


async def test_the_client_forwarded_for_is_extended_not_replaced_when_passing_through(
    make_proxy: MakeProxy, origin: Origin
) -> None:
    proxy = await make_proxy()
    await proxy.get("/raw/1", headers={"X-Forwarded-For": "10.0.0.1"})
    assert origin.last("/raw/1").headers["X-Forwarded-For"] == "10.0.0.1, 127.0.0.1"


async def test_a_large_upload_with_content_length_arrives_intact(
    make_proxy: MakeProxy, origin: Origin
) -> None:
    body = os.urandom(5 << 20)
    proxy = await make_proxy()
    response = await proxy.post("/raw/upload", data=io.BytesIO(body))
    assert response.status == 200
    assert origin.last("/raw/upload").body == body


async def test_a_chunked_upload_arrives_intact(make_proxy: MakeProxy, origin: Origin) -> None:
    parts = [os.urandom(64 << 10) for _ in range(20)]

    async def chunks() -> AsyncIterator[bytes]:
        for part in parts:
            yield part

    proxy = await make_proxy()
    response = await proxy.post("/raw/upload", data=chunks())
    assert response.status == 200
    assert origin.last("/raw/upload").body == b"".join(parts)


async def test_a_large_download_is_streamed_through_intact(
    make_proxy: MakeProxy, origin: Origin
) -> None:
    block = os.urandom(1 << 20)

    async def download(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        await response.prepare(request)
        for _ in range(16):
            await response.write(block)
        await response.write_eof()
        return response

    origin.handlers["/raw/big"] = download
    proxy = await make_proxy()
    response = await proxy.get("/raw/big")
    digest = hashlib.sha256()
    size = 0
    async for chunk in response.content.iter_any():
        digest.update(chunk)
        size += len(chunk)
    assert size == 16 << 20
    assert digest.hexdigest() == hashlib.sha256(block * 16).hexdigest()


async def test_a_body_over_max_body_is_refused_with_413(
    make_proxy: MakeProxy, origin: Origin
) -> None:
    proxy = await make_proxy("server: {max_body: 1KiB}")
    response = await proxy.put("/users/1", data=b"x" * 2048)
    assert response.status == 413
    assert await response.json() == {
        "error": "request body too large",
        "detail": "the body exceeds server.max_body (1KiB)",
    }
    assert not origin.received  # refused before anything was sent


async def test_a_chunked_body_over_max_body_is_refused_with_413(
    make_proxy: MakeProxy, origin: Origin
) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(8):
            yield b"x" * 512

    proxy = await make_proxy("server: {max_body: 1KiB}")
    response = await proxy.post("/raw/upload", data=chunks())
    assert response.status == 413
    assert (await response.json())["error"] == "request body too large"
    assert all(len(r.body) <= 1024 for r in origin.received)


async def test_an_origin_url_with_a_base_path_prefixes_every_request(
    make_proxy: MakeProxy, origin: Origin
) -> None:
    proxy = await make_proxy(upstream=origin.url + "/v1/")
    await proxy.get("/users/1?x=1")
    await proxy.get("/elsewhere")
    assert [r.path for r in origin.received] == ["/v1/users/1?x=1", "/v1/elsewhere"]


@pytest.mark.parametrize("when", ["before the answer", "mid-answer"])
async def test_a_client_gone_is_let_go_quietly(
    when: str, make_proxy: MakeProxy, origin: Origin, caplog: pytest.LogCaptureFixture
) -> None:
    # A client that hangs up before or while an answer is relayed is no error of cachecar's:
    # no ERROR line, no traceback, and the proxy goes on serving.
    sent = asyncio.Event()
    block = b"x" * (256 << 10)

    async def download(request: web.Request) -> web.StreamResponse:
        if when == "before the answer":
            sent.set()
            await asyncio.sleep(0.1)  # the client is gone by now
        response = web.StreamResponse()
        await response.prepare(request)
        for _ in range(64):
            await response.write(block)
            sent.set()
            await asyncio.sleep(0.01)
        await response.write_eof()
        return response

    origin.handlers["/raw/slow"] = download
    proxy = await make_proxy()
    port = proxy.server.port
    assert port is not None
    for _ in range(3):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /raw/slow HTTP/1.1\r\nHost: x\r\n\r\n")
        if when == "mid-answer":
            await reader.read(1000)
        await sent.wait()
        writer.transport.abort()  # a reset, not a polite close
        await asyncio.sleep(0.3)
        sent.clear()
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert (await proxy.get("/users/1")).status == 200
