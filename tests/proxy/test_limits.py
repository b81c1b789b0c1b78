"""Limits: each has a default, a config key and a clear answer when it is reached."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web
from multidict import CIMultiDict

from proxy.origin import OriginBusy, OriginClient
from tests.proxy.conftest import MakeProxy, Origin

BIG = b"x" * (64 << 10)
LIMITS = "server: {max_cacheable: 16KiB, max_key_length: 32}\n"
ROUTES = """
routes:
  - path: /files/{id}
    key: "files:{id}"
  - path: /carts/{id}
    key: "carts:{id}"
    mode: write-behind
"""


def chunked(body: bytes) -> web.StreamResponse:
    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for start in range(0, len(body), 4096):
            await response.write(body[start : start + 4096])
        await response.write_eof()
        return response

    return handler  # type: ignore[return-value]


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_an_answer_larger_than_max_cacheable_is_relayed_whole_and_not_kept(
    make_proxy: MakeProxy, origin: Origin, framing: str
) -> None:
    if framing == "chunked":
        origin.handlers["/files/big"] = chunked(BIG)  # type: ignore[assignment]
    else:
        origin.reply("/files/big", BIG)
    proxy = await make_proxy(LIMITS, routes=ROUTES)

    for _ in range(2):
        response = await proxy.get("/files/big")
        assert response.status == 200
        assert await response.read() == BIG
        assert response.headers["X-Cache"] == "MISS"
        assert response.headers["Cache-Status"] == "cachecar; fwd=miss; detail=too-large"
    assert origin.count("/files/big") == 2  # never stored

    origin.reply("/files/small", b"y" * 1000)
    await proxy.get("/files/small")
    again = await proxy.get("/files/small")
    assert again.headers["X-Cache"] == "HIT-L1"  # below the limit: cached as ever


async def test_requests_that_waited_for_an_oversized_fetch_each_get_the_whole_answer(
    make_proxy: MakeProxy, origin: Origin
) -> None:
    origin.reply("/files/big", BIG)
    origin.gate = asyncio.Event()
    proxy = await make_proxy(LIMITS, routes=ROUTES)
    pending = [asyncio.create_task(proxy.get("/files/big")) for _ in range(5)]
    await asyncio.sleep(0.2)
    origin.gate.set()
    responses = await asyncio.gather(*pending)
    assert [r.status for r in responses] == [200] * 5
    assert [await r.read() for r in responses] == [BIG] * 5
    # Not kept, for any of them: one relayed the fetch, the others passed through on their own.
    assert {r.headers["X-Cache"] for r in responses} == {"MISS"}
    assert {r.headers["Cache-Status"] for r in responses} == {
        "cachecar; fwd=miss; detail=too-large"
    }
    assert origin.count("/files/big") == 5


async def test_a_head_of_an_oversized_answer_is_passed_through(
    make_proxy: MakeProxy, origin: Origin
) -> None:
    origin.reply("/files/big", BIG)
    proxy = await make_proxy(LIMITS, routes=ROUTES)
    response = await proxy.head("/files/big")
    assert response.status == 200
    assert response.headers["Cache-Status"] == "cachecar; fwd=miss; detail=too-large"


async def test_a_key_longer_than_max_key_length_is_not_cached(
    make_proxy: MakeProxy, origin: Origin
) -> None:
    proxy = await make_proxy(LIMITS, routes=ROUTES)
    long_id = "a" * 40
    first = await proxy.get(f"/files/{long_id}")
    second = await proxy.get(f"/files/{long_id}")
    assert (first.status, second.status) == (200, 200)
    assert second.headers["X-Cache"] == "BYPASS"
    assert second.headers["Cache-Status"] == "cachecar; fwd=bypass; detail=key-too-long"
    assert origin.count(f"/files/{long_id}") == 2

    refused = await proxy.put(f"/carts/{long_id}", data=b"{}")
    assert refused.status == 414
    body = await refused.json()
    assert body["error"] == "key too long"
    assert "server.max_key_length, 32" in body["detail"]
    assert origin.count(f"/carts/{long_id}", "PUT") == 0  # not queued, not forwarded


async def test_an_origin_call_that_waits_too_long_for_a_connection_is_503(
    origin: Origin,
) -> None:
    client = OriginClient.create(origin.url, timeout=0.3, max_connections=1)
    try:
        async with client.stream("GET", client.url("/held", ""), CIMultiDict()):
            with pytest.raises(OriginBusy) as busy:
                await client.fetch("GET", client.url("/other", ""), CIMultiDict())
        assert busy.value.status == 503
        assert str(busy.value) == (
            "all 1 connections to the origin (upstream.max_connections) stayed busy for 300ms"
        )
        assert origin.count("/other") == 0  # it never reached the origin
        answer = await client.fetch("GET", client.url("/other", ""), CIMultiDict())
        assert answer.status == 200  # the connection is free again
    finally:
        await client.aclose()


async def connect_for_bodies(
    make_proxy: MakeProxy, limits: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to a proxy with ``limits`` whose /raw/{id} is passed through and whose
    /files/{id} is write-through (a PUT's body read whole)."""
    routes = ROUTES + "  - path: /raw/{id}\n    mode: bypass\n"
    routes = routes.replace('key: "files:{id}"', 'key: "files:{id}"\n    mode: write-through')
    proxy = await make_proxy(limits, routes=routes)
    assert proxy.server.host is not None
    assert proxy.server.port is not None
    return await asyncio.open_connection(proxy.server.host, proxy.server.port)


@pytest.mark.parametrize(
    ("path", "mode"), [("/raw/1", "passed through"), ("/files/1", "read whole (write-through)")]
)
async def test_a_request_body_that_stalls_is_answered_408_and_not_sent_on(
    make_proxy: MakeProxy, origin: Origin, path: str, mode: str
) -> None:
    reader, writer = await connect_for_bodies(make_proxy, "server: {body_timeout: 300ms}\n")
    try:
        writer.write(f"PUT {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc".encode())
        async with asyncio.timeout(5):
            answer = await reader.read(4096)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 "), head
    assert b'"error": "request body stalled"' in body
    assert b"server.body_timeout (300ms)" in body
    assert origin.count(path, "PUT") == 0 or mode == "passed through"


@pytest.mark.parametrize(
    ("path", "length", "mode"),
    [
        ("/raw/1", 10, "passed through, held whole first"),
        ("/raw/2", 1 << 20, "passed through, streamed"),
        ("/files/1", 10, "read whole (write-through)"),
    ],
)
async def test_a_request_body_that_trickles_past_body_deadline_is_answered_408(
    make_proxy: MakeProxy, origin: Origin, path: str, length: int, mode: str
) -> None:
    limits = "server: {body_timeout: 1s, body_deadline: 400ms}\n"
    reader, writer = await connect_for_bodies(make_proxy, limits)
    started = asyncio.get_running_loop().time()
    try:
        writer.write(f"PUT {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n".encode())
        answer = asyncio.ensure_future(reader.read(4096))
        async with asyncio.timeout(5):
            while not answer.done():  # a byte every 100 ms: never a pause of body_timeout
                writer.write(b"a")
                await asyncio.wait([answer], timeout=0.1)
        took = asyncio.get_running_loop().time() - started
    finally:
        writer.close()
    head, _, body = answer.result().partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 "), head
    assert b'"error": "request body too slow"' in body
    assert b"not whole within server.body_deadline (400ms)" in body
    assert 0.4 <= took < 1.0
    if mode != "passed through, streamed":
        assert origin.count(path, "PUT") == 0  # held whole first: the origin never heard of it


def trickled(body: bytes, pause: float) -> web.StreamResponse:
    """An origin handler sending ``body`` in 64 KiB chunks, ``pause`` seconds apart."""

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": str(len(body))})
        await response.prepare(request)
        if request.method == "HEAD":
            return response
        for start in range(0, len(body), 64 << 10):
            await response.write(body[start : start + (64 << 10)])
            await asyncio.sleep(pause)
        await response.write_eof()
        return response

    return handler  # type: ignore[return-value]


async def test_requests_sharing_an_oversized_fetch_never_cut_each_other_off(
    make_proxy: MakeProxy, origin: Origin
) -> None:
    huge = bytes(range(256)) * (8 << 10)  # 2 MiB, sent over about half a second
    origin.handlers["/files/huge"] = trickled(huge, 0.015)  # type: ignore[assignment]
    origin.gate = asyncio.Event()
    proxy = await make_proxy(LIMITS, routes=ROUTES)

    async def fetch(method: str) -> tuple[int, bytes]:
        async with proxy.request(method, "/files/huge") as response:
            return response.status, await response.read()

    pending = [asyncio.create_task(fetch(m)) for m in ("GET", "HEAD", "GET", "GET")]
    await asyncio.sleep(0.2)  # all four wait for the one fetch
    origin.gate.set()
    answers = await asyncio.gather(*pending)
    assert answers == [(200, huge), (200, b""), (200, huge), (200, huge)]


async def test_the_readiness_probe_is_not_queued_behind_busy_connections(
    origin: Origin,
) -> None:
    client = OriginClient.create(origin.url, timeout=0.3, max_connections=1)
    try:
        async with client.stream("GET", client.url("/held", ""), CIMultiDict()):
            # Every request connection in use: the origin still answers, and the probe says so.
            assert await client.probe("/") is None
    finally:
        await client.aclose()
