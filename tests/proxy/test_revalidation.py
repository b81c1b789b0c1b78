"""Revalidation: a stale entry with a validator is asked about with a conditional request, and
a 304 refreshes it (RFC 9111 §4.3) instead of the origin sending the whole answer again."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web

from tests.fakes import FakeClock
from tests.proxy.conftest import MakeProxy, Origin
from tests.proxy.test_metrics import value

ORIGIN_REQUESTS = "cachecar_origin_requests_total"

ROUTES = """
routes:
  - path: /users/{id}
    key: "users:{id}"
    ttl: {l1: 10m, l2: 10m}
  - path: /plain/{id}
    key: "plain:{id}"
    ttl: {l1: 10m, l2: 10m}
    revalidate_within: 0s
"""


class Versioned:
    """An origin resource whose body changes only when ``change`` is called: it answers 304
    to a request whose validator matches, with ``headers`` as they are then."""

    def __init__(self, origin: Origin, path: str, *, last_modified: bool = False) -> None:
        self.version = 1
        self.headers: dict[str, str] = {"Cache-Control": "max-age=60", "X-Served": "first"}
        self.last_modified = last_modified
        origin.handlers[path] = self.handle

    def validator(self) -> dict[str, str]:
        if self.last_modified:
            return {"Last-Modified": f"Tue, 0{self.version} Jan 2030 00:00:00 GMT"}
        return {"ETag": f'"v{self.version}"'}

    async def handle(self, request: web.Request) -> web.Response:
        headers = {**self.headers, **self.validator()}
        asked = request.headers.get("If-None-Match") or request.headers.get("If-Modified-Since")
        if asked is not None and asked in headers.values():
            return web.Response(status=304, headers=headers)
        return web.Response(body=b'{"version": %d}' % self.version, headers=headers)

    def change(self) -> None:
        self.version += 1


@pytest.mark.parametrize("last_modified", [False, True], ids=["etag", "last-modified"])
async def test_a_stale_entry_is_revalidated_and_a_304_refreshes_it(
    make_proxy: MakeProxy, origin: Origin, clock: FakeClock, last_modified: bool
) -> None:
    resource = Versioned(origin, "/users/1", last_modified=last_modified)
    proxy = await make_proxy(routes=ROUTES)
    first = await proxy.get("/users/1")
    assert await first.read() == b'{"version": 1}'

    clock.advance(61)  # stale now
    resource.headers["X-Served"] = "refreshed"
    again = await proxy.get("/users/1")

    asked = origin.last("/users/1").headers
    if last_modified:
        assert asked["If-Modified-Since"] == "Tue, 01 Jan 2030 00:00:00 GMT"
    else:
        assert asked["If-None-Match"] == '"v1"'
    assert again.status == 200
    assert again.headers["X-Cache"] == "REVALIDATED"
    assert again.headers["Cache-Status"] == "cachecar; fwd=stale; fwd-status=304; stored"
    assert again.headers["Age"] == "0"  # as old as the 304 says
    assert await again.read() == b'{"version": 1}'  # the stored body, not sent again
    assert again.headers["X-Served"] == "refreshed"  # the 304's headers replace the stored ones

    clock.advance(30)  # fresh again for 60 s from the 304
    hit = await proxy.get("/users/1")
    assert (hit.headers["X-Cache"], hit.headers["X-Served"]) == ("HIT-L1", "refreshed")
    assert hit.headers["Age"] == "30"
    assert origin.count("/users/1") == 2


async def test_a_changed_resource_answers_200_and_replaces_the_entry(
    make_proxy: MakeProxy, origin: Origin, clock: FakeClock
) -> None:
    resource = Versioned(origin, "/users/1")
    proxy = await make_proxy(routes=ROUTES)
    await proxy.get("/users/1")
    clock.advance(61)
    resource.change()
    again = await proxy.get("/users/1")
    assert again.headers["Cache-Status"] == "cachecar; fwd=miss; stored"
    assert await again.read() == b'{"version": 2}'
    assert again.headers["ETag"] == '"v2"'
    hit = await proxy.get("/users/1")
    assert (hit.headers["X-Cache"], await hit.read()) == ("HIT-L1", b'{"version": 2}')


async def test_what_the_304_does_not_replace_describes_the_stored_body(
    make_proxy: MakeProxy, origin: Origin, clock: FakeClock
) -> None:
    resource = Versioned(origin, "/users/1")
    resource.headers["Content-Encoding"] = "identity"
    proxy = await make_proxy(routes=ROUTES)
    await proxy.get("/users/1")
    clock.advance(61)
    resource.headers["Content-Encoding"] = "gzip"  # a 304 cannot change how the body is coded
    again = await proxy.get("/users/1")
    assert again.headers["Cache-Status"].endswith("fwd-status=304; stored")
    assert again.headers["Content-Encoding"] == "identity"
    assert again.headers["ETag"] == '"v1"'


async def test_a_304_with_set_cookie_is_passed_on_and_nothing_is_kept(
    make_proxy: MakeProxy, origin: Origin, clock: FakeClock
) -> None:
    resource = Versioned(origin, "/users/1")
    proxy = await make_proxy(routes=ROUTES)
    await proxy.get("/users/1")
    clock.advance(61)
    resource.headers["Set-Cookie"] = "session=one-client"
    again = await proxy.get("/users/1")
    assert again.headers["Set-Cookie"] == "session=one-client"  # that client's own
    assert again.headers["Cache-Status"] == "cachecar; fwd=stale; fwd-status=304"
    proxy.session.cookie_jar.clear()  # a client of its own, without that cookie
    next_one = await proxy.get("/users/1")
    assert next_one.headers["X-Cache"] == "MISS"  # nothing stored
    assert "If-None-Match" not in origin.last("/users/1").headers  # nor kept to revalidate
    assert origin.count("/users/1") == 3


async def test_must_revalidate_entries_are_revalidated_never_served_stale(
    make_proxy: MakeProxy, origin: Origin, clock: FakeClock
) -> None:
    resource = Versioned(origin, "/users/1")
    resource.headers["Cache-Control"] = "max-age=60, must-revalidate"
    routes = ROUTES.replace("    ttl: {l1: 10m, l2: 10m}\n", "    stale_while_revalidate: 1h\n", 1)
    proxy = await make_proxy(routes=routes)
    await proxy.get("/users/1")
    clock.advance(61)
    again = await proxy.get("/users/1")
    assert again.headers["X-Cache"] == "REVALIDATED"  # not STALE: the origin forbade it
    assert origin.last("/users/1").headers["If-None-Match"] == '"v1"'
    assert again.headers["Cache-Status"].endswith("fwd-status=304; stored")


async def test_revalidate_within_0s_fetches_whole_again(
    make_proxy: MakeProxy, origin: Origin, clock: FakeClock
) -> None:
    Versioned(origin, "/plain/1")
    proxy = await make_proxy(routes=ROUTES)
    await proxy.get("/plain/1")
    clock.advance(61)
    again = await proxy.get("/plain/1")
    assert "If-None-Match" not in origin.last("/plain/1").headers
    assert again.headers["Cache-Status"] == "cachecar; fwd=miss; stored"


async def test_kept_to_revalidate_only_so_long_past_its_freshness(
    make_proxy: MakeProxy, origin: Origin, clock: FakeClock
) -> None:
    Versioned(origin, "/users/1")
    proxy = await make_proxy(routes=ROUTES, l2="")  # L1 alone: its TTLs follow the fake clock
    await proxy.get("/users/1")
    clock.advance(60 + 600 - 1)  # max-age, then within revalidate_within's default 10m
    await proxy.get("/users/1")
    assert origin.last("/users/1").headers["If-None-Match"] == '"v1"'
    clock.advance(60 + 600 + 1)  # the refreshed one: no longer kept
    await proxy.get("/users/1")
    assert "If-None-Match" not in origin.last("/users/1").headers


async def test_the_origin_s_304s_are_counted(
    make_proxy: MakeProxy, origin: Origin, clock: FakeClock
) -> None:
    Versioned(origin, "/users/1")
    proxy = await make_proxy(routes=ROUTES)
    await proxy.get("/users/1")
    clock.advance(61)
    await proxy.get("/users/1")
    counted = {
        status: value(proxy, ORIGIN_REQUESTS, route="/users/{id}", method="GET", status=status)
        for status in ("200", "304")
    }
    assert counted == {"200": 1.0, "304": 1.0}
    outcome = "cachecar_request_duration_seconds_count"
    assert value(proxy, outcome, route="/users/{id}", outcome="revalidated") == 1


@pytest.mark.redis
async def test_a_refresh_reaches_l2_for_the_other_replicas(
    make_proxy: MakeProxy,
    origin: Origin,
    clock: FakeClock,
    redis_url: str,
    key_prefix: str,
) -> None:
    resource = Versioned(origin, "/users/1")
    one = await make_proxy(routes=ROUTES, l2=redis_url, key_prefix=key_prefix)
    await one.get("/users/1")
    clock.advance(61)
    resource.headers["X-Served"] = "refreshed"
    refreshed = await one.get("/users/1")  # the refreshed entry goes to L2 too (a fill)
    assert refreshed.headers["Cache-Status"].endswith("fwd-status=304; stored")
    await asyncio.sleep(0.05)  # the L2 fill finishes after the answer

    other = await make_proxy(routes=ROUTES, l2=redis_url, key_prefix=key_prefix)
    seen = await other.get("/users/1")
    assert (seen.headers["X-Cache"], seen.headers["X-Served"]) == ("HIT-L2", "refreshed")
    assert origin.count("/users/1") == 2
