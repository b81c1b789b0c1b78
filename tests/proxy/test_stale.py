"""Stale serving through the proxy: X-Cache STALE, Cache-Status, Age, and what forbids it."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web

from proxy.app import RUNTIME
from tests.fakes import FakeClock, until
from tests.proxy.conftest import MakeProxy, Origin

STALE_ROUTES = """
routes:
  - path: /users/{id}
    key: "users:{id}"
    ttl: {l1: 10s, l2: 10s}
    stale_while_revalidate: 30s
    stale_if_error: 5m
  - path: /orders/{id}
    key: "orders:{id}"
    ttl: {l1: 10s, l2: 10s}
    stale_if_error: 5m
"""


async def test_a_stale_entry_is_served_at_once_and_refreshed_in_the_background(
    make_proxy: MakeProxy, origin: Origin, clock: FakeClock
) -> None:
    proxy = await make_proxy(routes=STALE_ROUTES)
    first = await proxy.get("/users/1")
    assert first.headers["X-Cache"] == "MISS"
    clock.advance(15)

    stale = await proxy.get("/users/1")

    assert stale.headers["X-Cache"] == "STALE"
    assert stale.headers["Cache-Status"] == "cachecar; hit; ttl=-5; detail=stale-while-revalidate"
    assert stale.headers["Age"] == "15"
    assert await stale.json() == await first.json()
    await until(lambda: origin.count("/users/1") == 2, what="the background refresh")
    await until(lambda: proxy.app[RUNTIME].cache.l1.entries == 1)  # type: ignore[attr-defined]
    fresh = await proxy.get("/users/1")
    assert fresh.headers["X-Cache"] == "HIT-L1"
    assert (await fresh.json())["n"] == 2
    stale_reads = proxy.app[RUNTIME].metrics.registry.get_sample_value(
        "cachecar_request_duration_seconds_count", {"route": "/users/{id}", "outcome": "stale"}
    )
    assert stale_reads == 1


@pytest.mark.parametrize("failure", ["503", "unreachable", "timeout"])
async def test_when_the_origin_fails_a_stale_entry_answers_within_stale_if_error(
    make_proxy: MakeProxy, origin: Origin, clock: FakeClock, failure: str
) -> None:
    proxy = await make_proxy(routes=STALE_ROUTES)
    first = await proxy.get("/orders/7")
    clock.advance(60)

    async def failing(request: web.Request) -> web.StreamResponse:
        if failure == "503":
            return web.Response(status=503, text="maintenance")
        if failure == "timeout":
            await asyncio.sleep(3)  # upstream.timeout is 1s
            return web.Response()
        assert request.transport is not None
        request.transport.abort()
        return web.Response()

    origin.handlers["/orders/7"] = failing
    stale = await proxy.get("/orders/7")

    assert stale.status == 200
    assert stale.headers["X-Cache"] == "STALE"
    assert stale.headers["Cache-Status"] == "cachecar; fwd=stale; ttl=-50; detail=stale-if-error"
    assert await stale.json() == await first.json()


async def test_past_stale_if_error_the_origin_failure_is_answered(
    make_proxy: MakeProxy, origin: Origin, clock: FakeClock
) -> None:
    proxy = await make_proxy(routes=STALE_ROUTES)
    await proxy.get("/orders/7")
    clock.advance(10 + 300 + 1)
    origin.reply("/orders/7", b"maintenance", status=503)
    failed = await proxy.get("/orders/7")
    assert (failed.status, failed.headers["X-Cache"]) == (503, "MISS")
    assert await failed.read() == b"maintenance"  # an origin 5xx passes through as it came


async def test_an_answer_that_must_be_revalidated_is_never_served_stale(
    make_proxy: MakeProxy, origin: Origin, clock: FakeClock
) -> None:
    origin.reply("/orders/8", b"{}", headers={"Cache-Control": "max-age=10, must-revalidate"})
    proxy = await make_proxy(routes=STALE_ROUTES)
    await proxy.get("/orders/8")
    clock.advance(11)
    origin.reply("/orders/8", b"down", status=503)
    failed = await proxy.get("/orders/8")
    assert (failed.status, failed.headers["X-Cache"]) == (503, "MISS")


@pytest.mark.parametrize(
    ("directive", "after", "stale"),
    [
        ("stale-while-revalidate=5", 12, True),  # within the answer's own 5 s
        ("stale-while-revalidate=5", 16, False),  # past it, though the route allows 30 s
        ("stale-while-revalidate=3600", 45, False),  # the route's 30 s caps it
        ("stale-while-revalidate=x", 12, False),  # malformed: no stale serving
        ("stale-if-error=60", 12, True),  # says nothing of while-revalidate: the route's
    ],
)
async def test_the_answer_s_own_stale_while_revalidate_narrows_the_route_s(
    make_proxy: MakeProxy,
    origin: Origin,
    clock: FakeClock,
    directive: str,
    after: float,
    stale: bool,
) -> None:
    origin.reply("/users/1", b"{}", headers={"Cache-Control": f"max-age=10, {directive}"})
    proxy = await make_proxy(routes=STALE_ROUTES)
    await proxy.get("/users/1")
    clock.advance(after)
    answer = await proxy.get("/users/1")
    assert (answer.headers["X-Cache"] == "STALE") is stale


async def test_the_answer_s_own_stale_if_error_narrows_the_route_s(
    make_proxy: MakeProxy, origin: Origin, clock: FakeClock
) -> None:
    headers = {"Cache-Control": "max-age=10, stale-if-error=20"}
    origin.reply("/orders/7", b"{}", headers=headers)
    origin.reply("/orders/8", b"{}", headers=headers)
    proxy = await make_proxy(routes=STALE_ROUTES)
    await proxy.get("/orders/7")
    await proxy.get("/orders/8")
    origin.reply("/orders/7", b"down", status=503)
    origin.reply("/orders/8", b"down", status=503)
    clock.advance(25)  # 15 s stale: within the answer's 20 s
    assert (await proxy.get("/orders/7")).headers["X-Cache"] == "STALE"
    clock.advance(10)  # 25 s stale: past them, though the route allows 5 minutes
    failed = await proxy.get("/orders/8")
    assert (failed.status, failed.headers["X-Cache"]) == (503, "MISS")
