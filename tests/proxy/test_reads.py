"""Cached reads through the proxy: what a client sees, and what reaches the origin."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis

from tests.fakes import FakeClock, RecordingObserver, until
from tests.proxy.conftest import MakeProxy, Origin, raw


async def test_miss_then_hit_with_x_cache_cache_status_and_age(
    make_proxy: MakeProxy, origin: Origin, clock: FakeClock
) -> None:
    proxy = await make_proxy()
    miss = await proxy.get("/users/1")
    assert miss.status == 200
    assert miss.headers["X-Cache"] == "MISS"
    assert miss.headers["Cache-Status"] == "cachecar; fwd=miss; stored"
    assert "Age" not in miss.headers
    body = await miss.read()

    clock.advance(12)
    hit = await proxy.get("/users/1")
    assert hit.headers["X-Cache"] == "HIT-L1"
    assert hit.headers["Cache-Status"] == "cachecar; hit; detail=l1"
    assert hit.headers["Age"] == "12"
    assert await hit.read() == body
    assert hit.headers["Content-Type"] == miss.headers["Content-Type"]
    assert hit.headers["ETag"] == miss.headers["ETag"]
    assert origin.count("/users/1") == 1


@pytest.mark.redis
async def test_a_new_proxy_on_the_same_redis_answers_hit_l2_under_the_prefix(
    make_proxy: MakeProxy, origin: Origin, redis_url: str, key_prefix: str, redis_client: Redis
) -> None:
    first = await make_proxy(l2=redis_url, key_prefix=key_prefix)
    assert (await first.get("/users/7")).headers["X-Cache"] == "MISS"
    await asyncio.sleep(0.05)  # the L2 fill finishes after the response
    assert await redis_client.exists(f"{key_prefix}users:7")

    second = await make_proxy(l2=redis_url, key_prefix=key_prefix)
    hit = await second.get("/users/7")
    assert hit.headers["X-Cache"] == "HIT-L2"
    assert hit.headers["Cache-Status"] == "cachecar; hit; detail=l2"
    assert "Age" in hit.headers
    assert (await second.get("/users/7")).headers["X-Cache"] == "HIT-L1"
    assert origin.count("/users/7") == 1


async def test_concurrent_misses_on_one_key_make_one_origin_request(
    make_proxy: MakeProxy, origin: Origin, observer: RecordingObserver
) -> None:
    proxy = await make_proxy()  # its client holds up to 100 connections
    origin.gate = asyncio.Event()
    requests = [asyncio.create_task(proxy.get("/users/1")) for _ in range(100)]
    # Release the origin once every request is waiting on the one fetch.
    await until(lambda: observer.lookups["l1", False] == 100)
    origin.gate.set()
    responses = await asyncio.gather(*requests)
    assert {r.status for r in responses} == {200}
    assert origin.count("/users/1") == 1
    statuses = [r.headers["Cache-Status"] for r in responses]
    assert statuses.count("cachecar; fwd=miss; stored") == 1
    assert statuses.count("cachecar; fwd=miss; stored; collapsed") == 99


@pytest.mark.parametrize("status", [200, 203, 204, 300, 301, 308])
async def test_cacheable_statuses_are_stored(
    make_proxy: MakeProxy, origin: Origin, status: int
) -> None:
    origin.reply("/users/1", b"" if status == 204 else b"x", status=status)
    proxy = await make_proxy()
    await proxy.get("/users/1", allow_redirects=False)
    again = await proxy.get("/users/1", allow_redirects=False)
    assert again.status == status
    assert again.headers["X-Cache"] == "HIT-L1"


@pytest.mark.parametrize("status", [404, 410])
async def test_not_found_is_cached_for_negative_ttl_only(
    make_proxy: MakeProxy, origin: Origin, clock: FakeClock, status: int
) -> None:
    origin.reply("/users/9", b'{"error": "gone"}', status=status)
    origin.reply("/products/9", b'{"error": "gone"}', status=status)
    proxy = await make_proxy()
    await proxy.get("/users/9")
    hit = await proxy.get("/users/9")
    assert (hit.status, hit.headers["X-Cache"]) == (status, "HIT-L1")
    clock.advance(5.1)  # the route's negative_ttl
    assert (await proxy.get("/users/9")).headers["X-Cache"] == "MISS"
    # A route without negative_ttl does not cache them at all.
    await proxy.get("/products/9")
    again = await proxy.get("/products/9")
    assert again.headers["Cache-Status"] == "cachecar; fwd=miss; detail=status"


@pytest.mark.parametrize("status", [500, 502, 503, 302, 400, 429])
async def test_other_statuses_pass_as_they_came_and_are_never_stored(
    make_proxy: MakeProxy, origin: Origin, status: int
) -> None:
    origin.reply("/users/1", b"origin says no", status=status, headers={"X-Origin": "yes"})
    proxy = await make_proxy()
    for _ in range(2):
        response = await proxy.get("/users/1", allow_redirects=False)
        assert response.status == status
        assert await response.read() == b"origin says no"
        assert response.headers["X-Origin"] == "yes"
        assert response.headers["Cache-Status"] == "cachecar; fwd=miss; detail=status"
    assert origin.count("/users/1") == 2


@pytest.mark.parametrize(
    ("headers", "detail"),
    [
        ({"Cache-Control": "no-store"}, "no-store"),
        ({"Cache-Control": "private, max-age=60"}, "private"),
        ({"Cache-Control": "no-cache"}, "no-cache"),
        ({"Cache-Control": "max-age=0"}, "max-age"),
        ({"Set-Cookie": "session=abc"}, "set-cookie"),
        ({"Vary": "User-Agent"}, "vary"),
        ({"Vary": "*"}, "vary"),
    ],
)
async def test_responses_that_may_not_be_stored_are_answered_miss_without_stored(
    make_proxy: MakeProxy, origin: Origin, headers: dict[str, str], detail: str
) -> None:
    origin.reply("/users/1", b"mine", headers=headers)
    proxy = await make_proxy()
    first = await proxy.get("/users/1")
    assert first.headers["X-Cache"] == "MISS"
    assert first.headers["Cache-Status"] == f"cachecar; fwd=miss; detail={detail}"
    proxy.session.cookie_jar.clear()  # a client sending the cookie back would bypass
    second = await proxy.get("/users/1")
    assert second.headers["X-Cache"] == "MISS"
    assert origin.count("/users/1") == 2
    if "Set-Cookie" in headers:
        assert first.headers["Set-Cookie"] == "session=abc"  # passed on, just not kept


async def test_a_vary_on_a_header_cachecar_never_forwards_is_stored(
    make_proxy: MakeProxy, origin: Origin
) -> None:
    # Accept-Encoding never reaches the origin on a cacheable miss, so the answer cannot
    # depend on it: the one identity-encoded answer is right for every client.
    origin.reply("/users/1", b"same for all", headers={"Vary": "Accept-Encoding"})
    proxy = await make_proxy()
    await proxy.get("/users/1", headers={"Accept-Encoding": "gzip"})
    assert "accept-encoding" not in origin.last("/users/1").headers
    hit = await proxy.get("/users/1", headers={"Accept-Encoding": "br"})
    assert hit.headers["X-Cache"] == "HIT-L1"


@pytest.mark.parametrize(
    ("cache_control", "l1_for", "then"),
    [
        ("max-age=5", 5, "MISS"),
        ("s-maxage=3, max-age=60", 3, "MISS"),
        # Longer than both TTLs: L1 keeps it its 30 s, then L2 (10 m) still has it.
        ("public, max-age=100000", 30, "HIT-L2"),
    ],
)
async def test_origin_max_age_caps_the_configured_ttl(
    make_proxy: MakeProxy,
    origin: Origin,
    clock: FakeClock,
    cache_control: str,
    l1_for: float,
    then: str,
) -> None:
    origin.reply("/users/1", b"x", headers={"Cache-Control": cache_control})
    proxy = await make_proxy("l1: {ttl: 30s}")
    await proxy.get("/users/1")
    clock.advance(l1_for - 0.1)
    assert (await proxy.get("/users/1")).headers["X-Cache"] == "HIT-L1"
    clock.advance(0.2)
    assert (await proxy.get("/users/1")).headers["X-Cache"] == then


async def test_an_expires_header_caps_the_ttl_like_max_age(
    make_proxy: MakeProxy, origin: Origin, clock: FakeClock
) -> None:
    origin.reply(
        "/users/1",
        b"x",
        headers={
            "Date": "Thu, 01 Jan 2026 00:00:00 GMT",
            "Expires": "Thu, 01 Jan 2026 00:00:04 GMT",
        },
    )
    proxy = await make_proxy()
    await proxy.get("/users/1")
    clock.advance(3.9)
    assert (await proxy.get("/users/1")).headers["X-Cache"] == "HIT-L1"
    clock.advance(0.2)
    assert (await proxy.get("/users/1")).headers["X-Cache"] == "MISS"


@pytest.mark.parametrize("header", ["Authorization", "Cookie"])
async def test_requests_with_credentials_bypass_the_cache(
    make_proxy: MakeProxy, origin: Origin, header: str
) -> None:
    proxy = await make_proxy()
    await proxy.get("/users/1")  # cached for everyone
    response = await proxy.get("/users/1", headers={header: "secret"})
    assert response.headers["X-Cache"] == "BYPASS"
    assert response.headers["Cache-Status"] == "cachecar; fwd=bypass; detail=credentials"
    assert origin.last("/users/1").headers[header] == "secret"
    assert origin.count("/users/1") == 2


async def test_a_route_that_varies_on_authorization_caches_per_user(
    make_proxy: MakeProxy, origin: Origin
) -> None:
    async def per_user(request: object) -> object:
        from aiohttp import web

        assert isinstance(request, web.Request)
        return web.Response(text=f"for {request.headers.get('Authorization')}")

    origin.handlers["/private/1"] = per_user  # type: ignore[assignment]
    proxy = await make_proxy()
    alice = await proxy.get("/private/1", headers={"Authorization": "Bearer alice"})
    bob = await proxy.get("/private/1", headers={"Authorization": "Bearer bob"})
    assert await alice.text() == "for Bearer alice"
    assert await bob.text() == "for Bearer bob"
    alice_again = await proxy.get("/private/1", headers={"Authorization": "Bearer alice"})
    assert alice_again.headers["X-Cache"] == "HIT-L1"
    assert await alice_again.text() == "for Bearer alice"


async def test_vary_keeps_representations_apart(make_proxy: MakeProxy, origin: Origin) -> None:
    proxy = await make_proxy()
    json_miss = await proxy.get("/products/1", headers={"Accept": "application/json"})
    xml_miss = await proxy.get("/products/1", headers={"Accept": "application/xml"})
    assert json_miss.headers["X-Cache"] == xml_miss.headers["X-Cache"] == "MISS"
    assert origin.received[-1].headers["Accept"] == "application/xml"
    json_hit = await proxy.get("/products/1", headers={"Accept": "application/json"})
    assert json_hit.headers["X-Cache"] == "HIT-L1"
    assert await json_hit.read() == await json_miss.read()


async def test_if_none_match_is_answered_304_from_the_cache(
    make_proxy: MakeProxy, origin: Origin
) -> None:
    origin.reply("/users/1", b'{"id": 1}', headers={"ETag": '"v1"', "Cache-Control": "max-age=60"})
    proxy = await make_proxy()
    # On a miss the validator is not forwarded: the full answer is fetched, stored, then judged.
    miss = await proxy.get("/users/1", headers={"If-None-Match": '"v1"'})
    assert miss.status == 304
    assert "if-none-match" not in origin.last("/users/1").headers
    hit = await proxy.get("/users/1", headers={"If-None-Match": 'W/"v0", "v1"'})
    assert hit.status == 304
    assert hit.headers["ETag"] == '"v1"'
    assert hit.headers["X-Cache"] == "HIT-L1"
    assert hit.headers["Cache-Control"] == "max-age=60"
    assert await hit.read() == b""
    other = await proxy.get("/users/1", headers={"If-None-Match": '"v2"'})
    assert other.status == 200
    assert await other.read() == b'{"id": 1}'
    assert origin.count("/users/1") == 1


async def test_if_modified_since_is_answered_304_when_not_modified(
    make_proxy: MakeProxy, origin: Origin
) -> None:
    origin.reply("/users/1", b"x", headers={"Last-Modified": "Wed, 01 Jan 2025 00:00:00 GMT"})
    proxy = await make_proxy()
    await proxy.get("/users/1")
    later = await proxy.get(
        "/users/1", headers={"If-Modified-Since": "Thu, 02 Jan 2025 00:00:00 GMT"}
    )
    assert later.status == 304
    earlier = await proxy.get(
        "/users/1", headers={"If-Modified-Since": "Tue, 31 Dec 2024 00:00:00 GMT"}
    )
    assert earlier.status == 200


async def test_head_is_answered_from_the_cache_and_filled_with_a_get(
    make_proxy: MakeProxy, origin: Origin
) -> None:
    origin.reply(
        "/users/1", b'{"id": 1, "name": "ada"}', headers={"Content-Type": "application/json"}
    )
    proxy = await make_proxy()
    head = await proxy.head("/users/1")
    assert head.status == 200
    assert head.headers["X-Cache"] == "MISS"
    assert head.headers["Content-Length"] == str(len(b'{"id": 1, "name": "ada"}'))
    assert await head.read() == b""
    assert origin.last("/users/1").method == "GET"  # filled with the full answer
    get = await proxy.get("/users/1")
    assert get.headers["X-Cache"] == "HIT-L1"
    assert await get.read() == b'{"id": 1, "name": "ada"}'
    assert (await proxy.head("/users/1")).headers["X-Cache"] == "HIT-L1"


@pytest.mark.parametrize(
    "spelling",
    ["/users/1", "/users/%31", "/users/./1", "/x/../users/1", "//users//1", "/users/1/."],
)
async def test_spellings_of_one_resource_share_one_entry(
    make_proxy: MakeProxy, origin: Origin, spelling: str
) -> None:
    proxy = await make_proxy()
    await proxy.get("/users/1")
    response = await proxy.session.get(raw(proxy, spelling))
    if spelling == "/users/1/.":
        # A trailing dot-segment names the directory /users/1/, another resource.
        assert origin.last("/users/1/").path == "/users/1/"
        return
    assert response.headers["X-Cache"] == "HIT-L1"
    assert {r.path for r in origin.received} == {"/users/1"}


async def test_a_malformed_percent_encoding_is_a_400_with_a_json_body(
    make_proxy: MakeProxy, origin: Origin
) -> None:
    proxy = await make_proxy()
    response = await proxy.session.get(raw(proxy, "/users/%zz"))
    assert response.status == 400
    assert (await response.json())["error"] == "bad request path"
    assert not origin.received


async def test_the_default_key_is_the_path_and_the_sorted_query(
    make_proxy: MakeProxy, origin: Origin
) -> None:
    proxy = await make_proxy()
    await proxy.get("/products?b=2&a=1")
    hit = await proxy.get("/products?a=1&b=2")
    assert hit.headers["X-Cache"] == "HIT-L1"
    assert (await proxy.get("/products?a=1")).headers["X-Cache"] == "MISS"
    assert origin.received[0].path == "/products?b=2&a=1"  # forwarded as the client wrote it


async def test_on_a_key_template_the_query_selects_a_variant_of_the_key(
    make_proxy: MakeProxy, origin: Origin
) -> None:
    proxy = await make_proxy()
    await proxy.get("/users/1?fields=name")
    assert (await proxy.get("/users/1")).headers["X-Cache"] == "MISS"
    assert (await proxy.get("/users/1?fields=name")).headers["X-Cache"] == "HIT-L1"
    await proxy.put("/users/1", data=b"{}")  # a write drops every variant of users:1
    assert (await proxy.get("/users/1?fields=name")).headers["X-Cache"] == "MISS"
    assert (await proxy.get("/users/1")).headers["X-Cache"] == "MISS"


async def test_a_cacheable_miss_forwards_only_headers_that_cannot_poison_the_entry(
    make_proxy: MakeProxy, origin: Origin
) -> None:
    proxy = await make_proxy()
    await proxy.get(
        "/tenants/1",
        headers={
            "Accept": "application/json",
            "User-Agent": "test-client",
            "X-Tenant": "acme",
            "X-Forwarded-Host": "evil.example",
            "X-Original-URL": "/admin",
            "X-Forwarded-For": "6.6.6.6",
            "If-None-Match": '"x"',
            "Accept-Encoding": "gzip",
            "X-Debug": "1",
        },
    )
    sent = origin.last("/tenants/1").headers
    assert sent["Accept"] == "application/json"
    assert sent["User-Agent"] == "test-client"
    assert sent["X-Tenant"] == "acme"  # the route's forward_headers
    assert sent["X-Forwarded-For"] == "127.0.0.1"  # set by cachecar, the client's dropped
    assert sent["X-Forwarded-Proto"] == "http"
    for unkeyed in (
        "X-Forwarded-Host",
        "X-Original-URL",
        "If-None-Match",
        "Accept-Encoding",
        "X-Debug",
    ):
        assert unkeyed not in sent


async def test_hop_by_hop_headers_are_stripped_both_ways(
    make_proxy: MakeProxy, origin: Origin
) -> None:
    origin.reply(
        "/users/1",
        b"x",
        headers={"Connection": "X-Hop", "X-Hop": "origin-side", "X-Kept": "yes"},
    )
    proxy = await make_proxy()
    miss = await proxy.get("/users/1")
    hit = await proxy.get("/users/1")
    for response in (miss, hit):
        assert "X-Hop" not in response.headers
        assert response.headers["X-Kept"] == "yes"


@pytest.mark.parametrize(
    ("wanted", "status", "content_range", "body"),
    [
        ("bytes=0-3", 206, "bytes 0-3/10", b"0123"),
        ("bytes=6-", 206, "bytes 6-9/10", b"6789"),
        ("bytes=-3", 206, "bytes 7-9/10", b"789"),
        ("bytes=8-100", 206, "bytes 8-9/10", b"89"),
        ("bytes=10-", 416, "bytes */10", b""),
        ("bytes=0-1,4-5", 200, None, b"0123456789"),  # several: the whole body
        ("items=0-3", 200, None, b"0123456789"),  # another unit: the whole body
        ("bytes=3-1", 200, None, b"0123456789"),  # malformed: ignored
    ],
)
async def test_a_range_is_answered_from_the_stored_entry(
    make_proxy: MakeProxy,
    origin: Origin,
    wanted: str,
    status: int,
    content_range: str | None,
    body: bytes,
) -> None:
    origin.reply("/users/1", b"0123456789", headers={"ETag": '"v1"'})
    proxy = await make_proxy()
    first = await proxy.get("/users/1", headers={"Range": wanted})  # a miss: fetched whole
    assert "range" not in origin.last("/users/1").headers
    again = await proxy.get("/users/1", headers={"Range": wanted})
    for answer, x_cache in ((first, "MISS"), (again, "HIT-L1")):
        assert (answer.status, answer.headers["X-Cache"]) == (status, x_cache)
        assert answer.headers.get("Content-Range") == content_range
        assert await answer.read() == body
    assert origin.count("/users/1") == 1


async def test_if_range_and_head_and_a_stored_404_take_no_part(
    make_proxy: MakeProxy, origin: Origin
) -> None:
    origin.reply("/users/1", b"0123456789", headers={"ETag": '"v1"'})
    proxy = await make_proxy()
    await proxy.get("/users/1")
    # If-Range: the origin judges whether the client's copy is the one to take a part of.
    judged = await proxy.get("/users/1", headers={"Range": "bytes=0-3", "If-Range": '"v1"'})
    assert judged.headers["X-Cache"] == "BYPASS"
    assert origin.last("/users/1").headers["If-Range"] == '"v1"'
    head = await proxy.head("/users/1", headers={"Range": "bytes=0-3"})
    assert (head.status, head.headers["X-Cache"]) == (200, "HIT-L1")
    await proxy.get("/users/404")  # kept for negative_ttl (the default origin answers 404 JSON)
    origin.reply("/users/2", b"gone", status=404)
    await proxy.get("/users/2")
    missing = await proxy.get("/users/2", headers={"Range": "bytes=0-1"})
    assert (missing.status, await missing.read()) == (404, b"gone")


async def test_repeated_query_parameters_in_another_order_are_another_entry(
    make_proxy: MakeProxy, origin: Origin
) -> None:
    proxy = await make_proxy()
    await proxy.get("/products?id=1&id=2")
    other = await proxy.get("/products?id=2&id=1")
    assert other.headers["X-Cache"] == "MISS"


async def test_time_spent_fresh_elsewhere_counts_against_max_age(
    make_proxy: MakeProxy, origin: Origin, clock: FakeClock
) -> None:
    # A cache before the origin already held it 55 of its 60 seconds.
    origin.reply("/users/1", b"x", headers={"Cache-Control": "max-age=60", "Age": "55"})
    origin.reply("/users/2", b"x", headers={"Cache-Control": "max-age=60", "Age": "60"})
    proxy = await make_proxy()
    await proxy.get("/users/1")
    clock.advance(4.9)
    hit = await proxy.get("/users/1")
    assert (hit.headers["X-Cache"], hit.headers["Age"]) == ("HIT-L1", "59")
    clock.advance(0.2)
    assert (await proxy.get("/users/1")).headers["X-Cache"] == "MISS"
    assert (await proxy.get("/users/2")).headers[
        "Cache-Status"
    ] == "cachecar; fwd=miss; detail=max-age"


@pytest.mark.parametrize("headers", [{"Age": "²"}, {"Cache-Control": "max-age=¹"}, {"Age": "-3"}])
async def test_odd_numbers_in_origin_headers_are_never_a_500(
    make_proxy: MakeProxy, origin: Origin, headers: dict[str, str]
) -> None:
    origin.reply("/users/1", b"x", headers=headers)
    proxy = await make_proxy()
    response = await proxy.get("/users/1")
    assert response.status == 200
    assert await response.read() == b"x"


async def test_a_key_template_that_leaves_out_a_parameter_never_mixes_two_resources(
    make_proxy: MakeProxy, origin: Origin
) -> None:
    proxy = await make_proxy(
        routes="routes: [{path: '/users/{id}/posts/{post}', key: 'users:{id}'}]"
    )
    first = await proxy.get("/users/1/posts/1")
    second = await proxy.get("/users/1/posts/2")
    assert second.headers["X-Cache"] == "MISS"
    assert await second.json() != await first.json()
    assert (await proxy.get("/users/1/posts/2")).headers["X-Cache"] == "HIT-L1"
    await proxy.put("/users/1/posts/1", data=b"{}")  # drops users:1, every post of it
    assert (await proxy.get("/users/1/posts/2")).headers["X-Cache"] == "MISS"


async def test_a_miss_passes_the_origin_s_age_on_and_a_hit_adds_its_own_time(
    make_proxy: MakeProxy, origin: Origin, clock: FakeClock
) -> None:
    origin.reply("/users/1", b"x", headers={"Cache-Control": "max-age=600", "Age": "30"})
    proxy = await make_proxy()
    miss = await proxy.get("/users/1")
    assert (miss.headers["X-Cache"], miss.headers["Age"]) == ("MISS", "30")
    clock.advance(3)
    hit = await proxy.get("/users/1")
    assert (hit.headers["X-Cache"], hit.headers["Age"]) == ("HIT-L1", "33")


@pytest.mark.parametrize(
    ("age", "fresh"),
    [
        ("7200, 0", False),  # a list: its first member counts
        ("0, 7200", True),
        ("abc", True),  # not a delta-seconds: ignored (RFC 9111 §5.1)
        ("-7200", True),
        ("7200.0", True),
    ],
)
async def test_the_first_member_of_the_origin_s_age_counts_and_an_invalid_one_is_ignored(
    make_proxy: MakeProxy, origin: Origin, age: str, fresh: bool
) -> None:
    origin.reply("/users/1", b"x", headers={"Cache-Control": "max-age=3600", "Age": age})
    proxy = await make_proxy()
    await proxy.get("/users/1")
    again = await proxy.get("/users/1")
    assert again.headers["X-Cache"] == ("HIT-L1" if fresh else "MISS")


async def test_a_catch_all_route_fronts_the_whole_origin(
    make_proxy: MakeProxy, origin: Origin
) -> None:
    proxy = await make_proxy(routes="routes: [{path: '/{path...}'}]")
    for target in ("/", "/a", "/a/b/c.json", "/a/b/c.json?x=1"):
        first = await proxy.get(target)
        assert first.headers["Cache-Status"] == "cachecar; fwd=miss; stored", target
        again = await proxy.get(target)
        assert again.headers["X-Cache"] == "HIT-L1", target
    written = await proxy.put("/a/b/c.json", data=b"{}")
    assert written.status == 200
    assert (await proxy.get("/a/b/c.json")).headers["X-Cache"] == "MISS"  # its own key dropped
    assert (await proxy.get("/a")).headers["X-Cache"] == "HIT-L1"  # others kept


async def test_a_rest_parameter_can_make_the_key(make_proxy: MakeProxy, origin: Origin) -> None:
    routes = "routes: [{path: '/files/{name...}', key: 'files:{name}'}]"
    proxy = await make_proxy(routes=routes)
    await proxy.get("/files/a/b.txt")
    assert (await proxy.get("/files/a/b.txt")).headers["X-Cache"] == "HIT-L1"
    assert (await proxy.get("/files/a%2Fb.txt")).status == 400  # an encoded slash is refused


async def test_a_miss_announces_cachecar_as_a_surrogate_and_obeys_what_is_aimed_at_it(
    make_proxy: MakeProxy, origin: Origin, clock: FakeClock
) -> None:
    headers = {"Cache-Control": "no-store", "Surrogate-Control": "max-age=5;cachecar"}
    origin.reply("/users/1", b"x", headers=headers)
    proxy = await make_proxy()
    first = await proxy.get("/users/1")
    assert origin.last("/users/1").headers["Surrogate-Capability"] == 'cachecar="Surrogate/1.0"'
    assert first.headers["Cache-Status"] == "cachecar; fwd=miss; stored"
    clock.advance(4)
    assert (await proxy.get("/users/1")).headers["X-Cache"] == "HIT-L1"
    clock.advance(2)
    assert (await proxy.get("/users/1")).headers["X-Cache"] == "MISS"
