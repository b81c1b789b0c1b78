"""The hit path in front of aiohttp: L1 hits answered from the connection's bytes, everything
else by the full handler, in the order the requests came."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from email.utils import formatdate
from typing import Any

import pytest
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from cache.entry import Entry
from cache.memory import MemoryTier
from cache.tiered import TieredCache
from proxy.app import RUNTIME, build_proxy_app
from proxy.config import parse_settings
from proxy.fastpath import Hits
from proxy.listen import proxy_site
from proxy.metrics import Metrics
from proxy.routes import Router
from tests.fakes import FakeClock
from tests.ports import free_port
from tests.proxy.conftest import Origin, settings_for

ROUTES = """
routes:
  - path: /users/{id}
    key: "users:{id}"
  - path: /private/{id}
    key: "private:{id}"
    vary: [Authorization]
  - path: /shared/{id}
    key: "shared:{id}"
    ttl: {l1: 0s, l2: 10m}
"""


@pytest.fixture
async def served(origin: Origin) -> AsyncIterator[tuple[int, web.Application]]:
    """cachecar's proxy port, served as ``cachecar serve`` serves it (the hit path first)."""
    origin.reply("/users/1", b'{"name": "ada"}', headers={"ETag": '"v1"'})
    listen = free_port()
    settings = settings_for(
        origin, routes=ROUTES, extra=f"server: {{idle_timeout: 1s, listen: '127.0.0.1:{listen}'}}"
    )
    app = build_proxy_app(settings)
    runner = web.AppRunner(app, access_log=None, keepalive_timeout=1.0)
    await runner.setup()
    await proxy_site(app, runner, settings, reuse_port=False).start()
    try:
        yield listen, app
    finally:
        await runner.cleanup()


@pytest.fixture
def port(served: tuple[int, web.Application]) -> int:
    return served[0]


async def exchange(
    port: int, data: bytes, answers: int
) -> list[tuple[bytes, dict[str, str], bytes]]:
    """Send ``data`` on one connection; read ``answers`` answers (status line, headers, body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        found = []
        async with asyncio.timeout(5):
            for _ in range(answers):
                head = await reader.readuntil(b"\r\n\r\n")
                status, *lines = head.decode("latin-1").split("\r\n")[:-2]
                pairs = (line.partition(":") for line in lines)
                headers = {name.lower(): value.strip() for name, _, value in pairs}
                length = int(headers.get("content-length", "0"))
                body = b"" if data.startswith(b"HEAD") else await reader.readexactly(length)
                found.append((status.encode(), headers, body))
        return found
    finally:
        writer.close()


def get(path: str, *extra: str) -> bytes:
    return ("\r\n".join([f"GET {path} HTTP/1.1", "Host: x", *extra]) + "\r\n\r\n").encode()


async def test_a_hit_is_answered_like_the_full_path_would_on_the_same_connection(
    port: int, origin: Origin
) -> None:
    miss, hit = await exchange(port, get("/users/1"), 1) + await exchange(port, get("/users/1"), 1)
    assert miss[1]["x-cache"] == "MISS"
    assert hit[0] == b"HTTP/1.1 200 OK"
    assert hit[2] == miss[2] == b'{"name": "ada"}'
    assert hit[1]["x-cache"] == "HIT-L1"
    assert hit[1]["cache-status"] == "cachecar; hit; detail=l1"
    assert hit[1]["etag"] == '"v1"'
    assert hit[1]["age"] == "0"
    assert "date" in hit[1]
    assert origin.count("/users/1") == 1


async def test_pipelined_requests_are_answered_in_their_order(port: int, origin: Origin) -> None:
    # The first is a miss (aiohttp's), so the two hits behind it must wait their turn.
    answers = await exchange(port, get("/users/1") + get("/users/2") + get("/users/1"), 3)
    assert [a[1]["x-cache"] for a in answers] == ["MISS", "MISS", "HIT-L1"]
    assert answers[0][2] == answers[2][2]
    # Now everything is cached: three hits in one write, in order.
    again = await exchange(port, get("/users/2") + get("/users/1") + get("/users/2"), 3)
    assert [a[1]["x-cache"] for a in again] == ["HIT-L1"] * 3
    assert [a[2] for a in again] == [answers[1][2], answers[0][2], answers[1][2]]


async def test_what_the_hit_path_must_not_answer_goes_to_the_full_handler(port: int) -> None:
    await exchange(port, get("/users/1"), 1)
    head = await exchange(port, b"HEAD /users/1 HTTP/1.1\r\nHost: x\r\n\r\n", 1)
    assert head[0][1]["x-cache"] == "HIT-L1"
    assert head[0][1]["content-length"] == "15"
    assert head[0][2] == b""
    cases = {
        "Authorization: Bearer t": "BYPASS",  # credentials the route does not vary on
        'If-None-Match: "v1"': "HIT-L1",  # a 304, from the full handler
        "Range: bytes=0-1": "HIT-L1",  # a 206, from the full handler
    }
    for header, x_cache in cases.items():
        [(status, headers, _)] = await exchange(port, get("/users/1", header), 1)
        assert headers["x-cache"] == x_cache, header
        if header.startswith("If-None-Match"):
            assert status == b"HTTP/1.1 304 Not Modified"
        if header.startswith("Range"):
            assert status == b"HTTP/1.1 206 Partial Content"


async def test_connection_close_and_http_1_0_close_after_a_hit(port: int) -> None:
    await exchange(port, get("/users/1"), 1)
    for request in (get("/users/1", "Connection: close"), b"GET /users/1 HTTP/1.0\r\n\r\n"):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request)
        async with asyncio.timeout(5):
            answer = await reader.read()  # read() returns only once the server closes
        writer.close()
        assert b"X-Cache: HIT-L1" in answer
        assert b"Connection: close" in answer


async def test_a_connection_busy_with_hits_is_not_closed_as_idle(port: int) -> None:
    await exchange(port, get("/users/1"), 1)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for _ in range(8):  # 2.4 s of hits, server.idle_timeout is 1 s
            writer.write(get("/users/1"))
            async with asyncio.timeout(2):
                head = await reader.readuntil(b"\r\n\r\n")
                await reader.readexactly(15)
            assert b"X-Cache: HIT-L1" in head
            await asyncio.sleep(0.3)
        await asyncio.sleep(1.5)  # now idle: closed
        assert await reader.read() == b""
    finally:
        writer.close()


async def test_a_write_on_a_connection_then_hits_still_answered_right(
    port: int, origin: Origin
) -> None:
    await exchange(port, get("/users/1"), 1)
    put = b"PUT /users/1 HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
    answers = await exchange(port, put + get("/users/1"), 2)
    assert answers[0][0].startswith(b"HTTP/1.1 200")
    assert answers[1][1]["x-cache"] == "MISS"  # the write dropped it: fetched again


async def test_hits_are_counted_as_the_full_path_counts_them(
    served: tuple[int, web.Application],
) -> None:
    port, app = served
    await exchange(port, get("/users/1"), 1)
    await exchange(port, get("/users/1") * 3, 3)
    registry = app[RUNTIME].metrics.registry

    def sample(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    route = "/users/{id}"
    assert sample("cachecar_requests_total", route=route, method="GET", status="200") == 4
    assert sample("cachecar_request_duration_seconds_count", route=route, outcome="hit_l1") == 3
    assert sample("cachecar_request_duration_seconds_count", route=route, outcome="miss") == 1
    assert sample("cachecar_cache_lookups_total", tier="l1", result="hit") == 3


def test_aiohttp_still_has_what_the_hit_path_reads() -> None:
    # The hit path reads these private attributes; an aiohttp release that renames them must
    # fail here, not in production.
    for name in (
        "_waiter",
        "_messages",
        "_payload_parser",
        "_next_keepalive_close_time",
    ):
        slots = {slot for cls in RequestHandler.__mro__ for slot in getattr(cls, "__slots__", ())}
        assert name in slots, name


async def test_a_head_ended_by_bare_line_feeds_is_refused_at_once(port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /users/1 HTTP/1.1\nHost: x\n\n")
        async with asyncio.timeout(3):  # not left waiting for a blank line that never comes
            answer = await reader.read(200)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.0 400 ")


def full_path_lookups(app: web.Application, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The keys the full handler looked up from now on (the hit path never calls ``get``)."""
    cache = app[RUNTIME].cache
    looked_up: list[str] = []
    lookup = cache.get

    async def get(key: str, variant: str, **kwargs: Any) -> Any:
        looked_up.append(key)
        return await lookup(key, variant, **kwargs)

    monkeypatch.setattr(cache, "get", get)
    return looked_up


async def test_an_l2_hit_is_answered_by_the_hit_path_in_order_with_the_others(
    served: tuple[int, web.Application], origin: Origin, monkeypatch: pytest.MonkeyPatch
) -> None:
    port, app = served
    origin.reply("/shared/1", b'{"n": 1}', headers={"ETag": '"s1"'})
    origin.reply("/shared/2", b'{"n": 2}')
    [(_, miss, _)] = await exchange(port, get("/shared/1"), 1)
    assert miss["x-cache"] == "MISS"
    await asyncio.sleep(0.1)  # the L2 fill is a task of its own
    looked_up = full_path_lookups(app, monkeypatch)
    # An L2 hit, a miss (the full path's) and an L2 hit again, in one write: in that order.
    answers = await exchange(port, get("/shared/1") + get("/shared/2") + get("/shared/1"), 3)
    assert [a[1]["x-cache"] for a in answers] == ["HIT-L2", "MISS", "HIT-L2"]
    assert [a[2] for a in answers] == [b'{"n": 1}', b'{"n": 2}', b'{"n": 1}']
    hit = answers[0][1]
    assert hit["cache-status"] == "cachecar; hit; detail=l2"
    assert hit["etag"] == '"s1"'
    assert hit["age"] == "0"
    assert "date" in hit
    # The first was the hit path's; the miss went the full path, and so did the request behind
    # it (aiohttp held one of the connection's requests: it answers the next too).
    assert looked_up == ["shared:2", "shared:1"]
    assert origin.count("/shared/1") == 1


async def test_an_l2_miss_on_the_hit_path_asks_redis_once_and_is_counted_once(
    served: tuple[int, web.Application], origin: Origin
) -> None:
    port, app = served
    origin.reply("/shared/3", b'{"n": 3}')
    [(_, miss, _)] = await exchange(port, get("/shared/3"), 1)
    assert miss["x-cache"] == "MISS"
    registry = app[RUNTIME].metrics.registry

    def lookups(tier: str, result: str) -> float | None:
        return registry.get_sample_value(
            "cachecar_cache_lookups_total", {"tier": tier, "result": result}
        )

    assert lookups("l1", "miss") == 1
    assert lookups("l2", "miss") == 1  # the hit path's read was the lookup's
    await asyncio.sleep(0.1)
    await exchange(port, get("/shared/3") * 2, 2)
    assert lookups("l2", "hit") == 2
    assert lookups("l1", "miss") == 3
    duration = "cachecar_request_duration_seconds_count"
    labels = {"route": "/shared/{id}"}
    assert registry.get_sample_value(duration, {**labels, "outcome": "hit_l2"}) == 2
    assert registry.get_sample_value(duration, {**labels, "outcome": "miss"}) == 1


async def test_a_connection_closed_while_l2_is_read_is_let_go(
    served: tuple[int, web.Application], origin: Origin
) -> None:
    port, _ = served
    origin.reply("/shared/4", b'{"n": 4}')
    await exchange(port, get("/shared/4"), 1)
    await asyncio.sleep(0.1)
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(get("/shared/4") + get("/shared/4"))
    writer.close()  # gone before L2 answers: nothing to write to, nothing raised
    await asyncio.sleep(0.1)
    closing = await exchange(port, get("/shared/4", "Connection: close"), 1)
    assert closing[0][1]["x-cache"] == "HIT-L2"
    assert closing[0][1]["connection"] == "close"


@pytest.mark.parametrize("date", ["Date", "date", None])
async def test_an_l1_hit_keeps_the_origin_s_date_or_gets_one(date: str | None) -> None:
    # The hit path keeps the head it serialized in L1 with the entry: a Date of the entry's
    # own, however the origin spelled it, is kept once; an entry without one gets today's.
    clock = FakeClock()
    settings = parse_settings(
        "upstream: {url: 'http://127.0.0.1:9'}\nroutes:\n  - path: /users/{id}\n"
        "    key: 'users:{id}'\n",
        env={},
    )
    cache = TieredCache(MemoryTier(max_entries=10, max_bytes=1 << 20, clock=clock), clock=clock)
    headers: tuple[tuple[str, str], ...] = (("Content-Type", "application/json"),)
    if date is not None:
        headers += ((date, "Tue, 01 Jan 2030 00:00:00 GMT"),)
    await cache.l1.set("users:1", "", Entry(200, headers, b"{}", clock.time(), 60), 60)
    hits = Hits(Router.from_settings(settings), cache, Metrics(clock), clock=clock.time)
    for _ in range(2):  # rendered, then read as L1 keeps it
        answer = hits.answer(b"GET /users/1 HTTP/1.1\r\nHost: x")
        assert isinstance(answer, tuple)
        whole = answer[0]
        dates = [line for line in whole.split(b"\r\n") if line.lower().startswith(b"date:")]
        if date is None:
            assert dates == [b"Date: " + formatdate(clock.time(), usegmt=True).encode()]
        else:
            assert dates == [b"Date: Tue, 01 Jan 2030 00:00:00 GMT"]
