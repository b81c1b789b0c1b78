"""When the origin or L2 fails: clear JSON errors from the origin, never an error from L2."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import web

from proxy.app import RUNTIME
from tests.fakes import FakeClock, RecordingObserver
from tests.ports import free_port, silent_port
from tests.proxy.conftest import MakeProxy, Origin


@pytest.mark.parametrize("path", ["/users/1", "/raw/1"])
async def test_an_unreachable_origin_is_a_502_with_a_json_body(
    make_proxy: MakeProxy, path: str
) -> None:
    proxy = await make_proxy(upstream=f"http://127.0.0.1:{free_port()}")
    response = await proxy.get(path)
    assert response.status == 502
    body = await response.json()
    assert body["error"] == "origin unreachable"
    assert "cannot connect to 127.0.0.1" in body["detail"]
    assert response.headers["X-Cache"] == ("MISS" if path == "/users/1" else "BYPASS")


@pytest.mark.parametrize("path", ["/users/1", "/raw/1"])
async def test_an_origin_slower_than_upstream_timeout_is_a_504_with_a_json_body(
    make_proxy: MakeProxy, origin: Origin, path: str
) -> None:
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(3)
        return web.Response()

    origin.handlers[path] = slow
    proxy = await make_proxy()  # upstream.timeout: 1s
    response = await proxy.get(path)
    assert response.status == 504
    assert await response.json() == {"error": "origin timeout", "detail": "no answer within 1s"}
    route = "/users/{id}" if path == "/users/1" else "/raw/{id}"
    timeouts = proxy.app[RUNTIME].metrics.registry.get_sample_value(
        "cachecar_origin_requests_total", {"route": route, "method": "GET", "status": "timeout"}
    )
    assert timeouts == 1


async def test_an_origin_that_breaks_off_a_streamed_answer_is_not_passed_off_as_complete(
    make_proxy: MakeProxy, origin: Origin
) -> None:
    async def broken(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"half of it")
        assert request.transport is not None
        request.transport.abort()
        return response

    origin.handlers["/raw/broken"] = broken
    proxy = await make_proxy()
    response = await proxy.get("/raw/broken")
    assert response.status == 200
    with pytest.raises(aiohttp.ClientPayloadError):
        await response.read()


async def test_an_l2_on_a_dead_port_changes_nothing_for_clients(
    make_proxy: MakeProxy, origin: Origin, observer: RecordingObserver
) -> None:
    # A single replica: nobody else's changes to miss, so L1 serves through the outage.
    proxy = await make_proxy("coherence: {enabled: false}\n", l2=f"redis://127.0.0.1:{free_port()}")
    first = await proxy.get("/users/1")
    second = await proxy.get("/users/1")
    assert (first.status, first.headers["X-Cache"]) == (200, "MISS")
    assert (second.status, second.headers["X-Cache"]) == (200, "HIT-L1")
    assert (await proxy.put("/users/1", data=b"{}")).status == 200
    assert (await proxy.get("/users/1")).headers["X-Cache"] == "MISS"
    assert observer.errors["l2", "get"] >= 1


async def test_with_coherence_and_redis_dead_l1_serves_each_entry_for_degraded_ttl(
    make_proxy: MakeProxy, origin: Origin, observer: RecordingObserver, clock: FakeClock
) -> None:
    # Other replicas' changes cannot be heard: an L1 copy could be one they replaced, so it
    # answers for coherence.degraded_ttl (1s by default) at most, then the origin is asked.
    proxy = await make_proxy(l2=f"redis://127.0.0.1:{free_port()}")
    answers = [await proxy.get("/users/1") for _ in range(3)]
    assert [(a.status, a.headers["X-Cache"]) for a in answers] == [
        (200, "MISS"),
        (200, "HIT-L1"),
        (200, "HIT-L1"),
    ]
    assert observer.degraded_reads == 2
    clock.advance(0.99)
    assert (await proxy.get("/users/1")).headers["X-Cache"] == "HIT-L1"
    clock.advance(0.02)  # the route's TTL is 60s: only degraded mode ends the entry's life
    assert (await proxy.get("/users/1")).headers["X-Cache"] == "MISS"
    assert origin.count("/users/1") == 2
    metrics = proxy.app[RUNTIME].metrics.registry
    assert metrics.get_sample_value("cachecar_coherence_degraded_reads_total") == 3
    assert metrics.get_sample_value("cachecar_coherence_subscribed") == 0


async def test_with_degraded_ttl_0_and_redis_dead_reads_go_to_the_origin_never_to_l1(
    make_proxy: MakeProxy, origin: Origin, observer: RecordingObserver
) -> None:
    proxy = await make_proxy(
        "coherence: {degraded_ttl: 0s}\n", l2=f"redis://127.0.0.1:{free_port()}"
    )
    answers = [await proxy.get("/users/1") for _ in range(3)]
    assert [(a.status, a.headers["X-Cache"]) for a in answers] == [(200, "MISS")] * 3
    assert origin.count("/users/1") == 3
    assert observer.lookups["l1", True] == 0
    assert observer.degraded_reads == 0


async def test_a_hung_l2_is_cut_off_and_reads_are_served_from_the_origin(
    make_proxy: MakeProxy, origin: Origin, observer: RecordingObserver
) -> None:
    async with silent_port() as port:
        proxy = await make_proxy(l2=f"redis://127.0.0.1:{port}")
        for n in range(8):  # past breaker.failures (5): the breaker opens and L2 is skipped
            response = await proxy.get(f"/users/{n}")
            assert response.status == 200
    # Five consecutive failures of any L2 call (gets and the background fills) open it.
    assert ("l2", True) in observer.breaker
    assert sum(observer.errors.values()) == 5
