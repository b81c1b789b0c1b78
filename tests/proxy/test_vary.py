"""The origin's Vary: an answer that varies on a request header the route does not key on is
not kept, and the route learns to key on that header (and to send it on a miss), so the next
answers are kept per value of it. A header that is not sent can never select a variant."""

from __future__ import annotations

import logging

import pytest
from aiohttp import web

from proxy.routes import MAX_LEARNED
from tests.proxy.conftest import MakeProxy, Origin


def negotiated(origin: Origin, path: str, vary: str = "Accept-Language") -> None:
    """An origin resource whose body is the value it was sent of each header in ``vary``."""

    async def handler(request: web.Request) -> web.Response:
        names = [name.strip() for name in vary.split(",")]
        body = ";".join(f"{name}={request.headers.get(name, '-')}" for name in names)
        return web.Response(text=body, headers={"Vary": vary, "Cache-Control": "max-age=60"})

    origin.handlers[path] = handler


async def test_the_first_answer_teaches_the_route_then_each_value_has_its_own_entry(
    make_proxy: MakeProxy, origin: Origin
) -> None:
    negotiated(origin, "/users/1")
    proxy = await make_proxy()

    first = await proxy.get("/users/1", headers={"Accept-Language": "en"})
    # Fetched before the route knew: the origin did not see the header, so it is not kept.
    assert await first.text() == "Accept-Language=-"
    assert first.headers["Cache-Status"] == "cachecar; fwd=miss; detail=vary"

    english = await proxy.get("/users/1", headers={"Accept-Language": "en"})
    assert await english.text() == "Accept-Language=en"
    assert english.headers["Cache-Status"] == "cachecar; fwd=miss; stored"
    again = await proxy.get("/users/1", headers={"Accept-Language": "en"})
    assert (again.headers["X-Cache"], await again.text()) == ("HIT-L1", "Accept-Language=en")

    french = await proxy.get("/users/1", headers={"Accept-Language": "fr"})
    assert (french.headers["X-Cache"], await french.text()) == ("MISS", "Accept-Language=fr")
    none = await proxy.get("/users/1")
    assert (none.headers["X-Cache"], await none.text()) == ("MISS", "Accept-Language=-")
    assert (await proxy.get("/users/1")).headers["X-Cache"] == "HIT-L1"
    assert origin.count("/users/1") == 4


async def test_what_the_route_learned_holds_for_its_other_keys(
    make_proxy: MakeProxy, origin: Origin
) -> None:
    negotiated(origin, "/users/1")
    negotiated(origin, "/users/2")
    proxy = await make_proxy()
    await proxy.get("/users/1", headers={"Accept-Language": "en"})  # teaches the route
    other = await proxy.get("/users/2", headers={"Accept-Language": "de"})
    assert (other.headers["Cache-Status"], await other.text()) == (
        "cachecar; fwd=miss; stored",
        "Accept-Language=de",
    )
    assert origin.last("/users/2").headers["Accept-Language"] == "de"


async def test_several_headers_in_any_order_and_case(make_proxy: MakeProxy, origin: Origin) -> None:
    negotiated(origin, "/users/1", vary="X-Foo, x-bar")
    proxy = await make_proxy()
    asked = {"X-Foo": "1", "X-Bar": "2"}
    await proxy.get("/users/1", headers=asked)
    stored = await proxy.get("/users/1", headers=asked)
    assert await stored.text() == "X-Foo=1;x-bar=2"
    assert (await proxy.get("/users/1", headers=asked)).headers["X-Cache"] == "HIT-L1"
    other = await proxy.get("/users/1", headers={"X-Bar": "2", "X-Foo": "3"})
    assert (other.headers["X-Cache"], await other.text()) == ("MISS", "X-Foo=3;x-bar=2")
    omitted = await proxy.get("/users/1", headers={"X-Foo": "1"})
    assert omitted.headers["X-Cache"] == "MISS"


async def test_vary_star_is_never_kept_nor_learned(make_proxy: MakeProxy, origin: Origin) -> None:
    origin.reply("/users/1", b"x", headers={"Vary": "*", "Cache-Control": "max-age=60"})
    proxy = await make_proxy()
    for _ in range(3):
        answer = await proxy.get("/users/1")
        assert answer.headers["Cache-Status"] == "cachecar; fwd=miss; detail=vary"
    assert origin.count("/users/1") == 3


@pytest.mark.parametrize("name", ["Authorization", "Cookie", "Accept-Encoding", "If-None-Match"])
async def test_a_header_cachecar_never_sends_is_not_learned(
    make_proxy: MakeProxy, origin: Origin, name: str
) -> None:
    # Requests with credentials bypass the cache; validators and Accept-Encoding are never
    # sent on a miss: the answer is the one for every request the cache answers.
    origin.reply("/users/1", b"for all", headers={"Vary": name, "Cache-Control": "max-age=60"})
    proxy = await make_proxy()
    first = await proxy.get("/users/1")
    assert first.headers["Cache-Status"] == "cachecar; fwd=miss; stored"
    assert (await proxy.get("/users/1")).headers["X-Cache"] == "HIT-L1"
    assert name.lower() not in origin.last("/users/1").headers


async def test_a_route_learns_so_many_headers_and_no_more(
    make_proxy: MakeProxy, origin: Origin, caplog: pytest.LogCaptureFixture
) -> None:
    names = [f"X-H{n}" for n in range(MAX_LEARNED + 1)]
    negotiated(origin, "/users/1", vary=", ".join(names))
    proxy = await make_proxy()
    with caplog.at_level(logging.INFO, logger="cachecar.proxy"):
        for _ in range(3):
            answer = await proxy.get("/users/1", headers=dict.fromkeys(names, "v"))
            assert answer.headers["Cache-Status"] == "cachecar; fwd=miss; detail=vary"
    assert "past the 8 headers a route learns" in caplog.text
    last = origin.last("/users/1").headers
    assert [name for name in names if name in last] == names[:MAX_LEARNED]


async def test_a_keyed_header_is_sent_once(make_proxy: MakeProxy, origin: Origin) -> None:
    # /products/{id} keys on Accept, which a miss always sends too.
    proxy = await make_proxy()
    await proxy.get("/products/1", headers={"Accept": "application/json"})
    assert origin.last("/products/1").headers.getall("Accept") == ["application/json"]


async def test_an_answer_for_a_request_without_the_header_is_kept_for_those_without_it(
    make_proxy: MakeProxy, origin: Origin
) -> None:
    negotiated(origin, "/users/1")
    proxy = await make_proxy()
    first = await proxy.get("/users/1")  # the origin saw what every request without it sends
    assert first.headers["Cache-Status"] == "cachecar; fwd=miss; stored"
    assert (await proxy.get("/users/1")).headers["X-Cache"] == "HIT-L1"
    english = await proxy.get("/users/1", headers={"Accept-Language": "en"})
    assert (english.headers["X-Cache"], await english.text()) == ("MISS", "Accept-Language=en")


async def test_learning_a_header_leaves_the_entries_of_requests_without_it(
    make_proxy: MakeProxy, origin: Origin
) -> None:
    negotiated(origin, "/users/1")
    proxy = await make_proxy()
    await proxy.get("/users/2")
    await proxy.get("/users/1", headers={"Accept-Language": "en"})  # teaches the route
    assert (await proxy.get("/users/2")).headers["X-Cache"] == "HIT-L1"
    with_it = await proxy.get("/users/2", headers={"Accept-Language": "en"})
    assert with_it.headers["X-Cache"] == "MISS"  # its own variant now
