"""Writes on write-through and write-behind routes, through the proxy."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient
from redis.asyncio import Redis

from cache.write_behind.shards import DEFAULT_SHARDS, shard_of
from cache.write_behind.writer import WriteBehind
from proxy.admin import build_admin_app
from proxy.app import RUNTIME
from tests.fakes import FakeClock
from tests.ports import free_port
from tests.proxy.conftest import MakeProxy, Origin

Client = TestClient[web.Request, web.Application]

ROUTES = """
routes:
  - path: /users/{id}
    key: "users:{id}"
    mode: write-behind
  - path: /items/{id}
    key: "items:{id}"
    mode: write-through
"""
# No flush on its own: each test flushes when it wants the origin to see the queue.
QUIET = "write_behind: {flush_interval: 1h}\n"


async def proxy_for(make_proxy: MakeProxy, extra: str = QUIET, **kwargs: str) -> Client:
    return await make_proxy(extra, routes=ROUTES, **kwargs)


def write_behind_of(proxy: Client) -> WriteBehind:
    found = proxy.app[RUNTIME].write_behind
    assert found is not None
    return found


async def flush(proxy: Client, clock: FakeClock) -> int:
    """One flush round, once the keys' coalescing window (flush_interval) has passed."""
    clock.advance(proxy.app[RUNTIME].settings.write_behind.flush_interval)
    return await write_behind_of(proxy).flusher.flush_once()


# -- write-through -------------------------------------------------------------------------------


async def test_write_through_put_becomes_the_cached_value(
    make_proxy: MakeProxy, origin: Origin
) -> None:
    async def created(request: web.Request) -> web.Response:
        return web.Response(status=201, headers={"ETag": '"v7"'})

    origin.handlers["/items/1"] = created
    proxy = await proxy_for(make_proxy)
    response = await proxy.put(
        "/items/1", data=b'{"price": 3}', headers={"Content-Type": "application/json"}
    )
    assert response.status == 201
    assert response.headers["Cache-Status"] == "cachecar; fwd=method; stored"
    assert origin.last("/items/1").body == b'{"price": 3}'
    read = await proxy.get("/items/1")
    assert read.headers["X-Cache"] == "HIT-L1"
    assert await read.read() == b'{"price": 3}'
    assert read.headers["Content-Type"] == "application/json"
    assert read.headers["ETag"] == '"v7"'
    assert origin.count("/items/1") == 0  # no GET reached the origin


async def test_write_through_refused_by_the_origin_changes_nothing(
    make_proxy: MakeProxy, origin: Origin
) -> None:
    proxy = await proxy_for(make_proxy)
    before = await (await proxy.get("/items/1")).read()
    origin.reply("/items/1", b'{"error": "conflict"}', status=409)
    response = await proxy.put("/items/1", data=b'{"price": 4}')
    assert response.status == 409
    assert await response.read() == b'{"error": "conflict"}'
    again = await proxy.get("/items/1")
    assert again.headers["X-Cache"] == "HIT-L1"
    assert await again.read() == before


async def test_concurrent_write_through_puts_leave_the_cache_with_what_the_origin_got_last(
    make_proxy: MakeProxy, origin: Origin
) -> None:
    applied: list[bytes] = []

    async def slow_first(request: web.Request) -> web.Response:
        body = await request.read()
        applied.append(body)
        await asyncio.sleep(0.2 if body == b"first" else 0.0)
        return web.Response(status=200)

    origin.handlers["/items/1"] = slow_first
    proxy = await proxy_for(make_proxy)
    first = asyncio.create_task(proxy.put("/items/1", data=b"first"))
    await asyncio.sleep(0.05)  # "first" is at the origin, slowly
    await proxy.put("/items/1", data=b"second")
    await first
    assert applied == [b"first", b"second"]
    assert await (await proxy.get("/items/1")).read() == b"second"


async def test_write_through_patch_invalidates(make_proxy: MakeProxy, origin: Origin) -> None:
    proxy = await proxy_for(make_proxy)
    await proxy.get("/items/1")
    assert (await proxy.patch("/items/1", data=b"{}")).status == 200
    assert (await proxy.get("/items/1")).headers["X-Cache"] == "MISS"


async def test_write_through_body_over_max_body_is_413_and_not_forwarded(
    make_proxy: MakeProxy, origin: Origin
) -> None:
    proxy = await proxy_for(make_proxy, QUIET + "server: {max_body: 1KiB}\n")
    response = await proxy.put("/items/1", data=b"x" * 2048)
    assert response.status == 413
    assert (await response.json())["error"] == "request body too large"
    assert origin.received == []


# -- write-behind --------------------------------------------------------------------------------


async def test_write_behind_put_is_accepted_at_once_and_flushed_later(
    clock: FakeClock, make_proxy: MakeProxy, origin: Origin
) -> None:
    proxy = await proxy_for(make_proxy)
    response = await proxy.put(
        "/users/1", data=b'{"name": "ada"}', headers={"Content-Type": "application/json"}
    )
    assert response.status == 202
    assert response.headers["X-Cache-Write"] == "queued"
    assert await response.json() == {"queued": "PUT", "key": "users:1"}
    assert origin.received == []  # not yet

    read = await proxy.get("/users/1")  # read-your-writes, before the origin has it
    assert read.status == 200
    assert await read.read() == b'{"name": "ada"}'
    assert read.headers["Content-Type"] == "application/json"

    assert await flush(proxy, clock) == 1
    [sent] = origin.received
    assert (sent.method, sent.path, sent.body) == ("PUT", "/users/1", b'{"name": "ada"}')
    assert sent.headers["Content-Type"] == "application/json"


async def test_write_behind_delete_reads_as_404_and_is_sent_as_delete(
    clock: FakeClock, make_proxy: MakeProxy, origin: Origin
) -> None:
    proxy = await proxy_for(make_proxy)
    assert (await proxy.get("/users/1")).status == 200
    response = await proxy.delete("/users/1")
    assert response.status == 202
    read = await proxy.get("/users/1")
    assert read.status == 404
    assert read.headers["X-Cache"] == "HIT-L1"
    await flush(proxy, clock)
    assert origin.last("/users/1").method == "DELETE"


async def test_repeated_writes_reach_the_origin_once_with_the_last_value(
    clock: FakeClock, make_proxy: MakeProxy, origin: Origin
) -> None:
    proxy = await proxy_for(make_proxy)
    for n in range(50):
        assert (await proxy.put("/users/1", data=str(n).encode())).status == 202
    await flush(proxy, clock)
    assert [(r.method, r.body) for r in origin.received] == [("PUT", b"49")]


async def test_a_queued_write_is_read_back_after_both_tiers_dropped_it(
    make_proxy: MakeProxy, origin: Origin
) -> None:
    proxy = await proxy_for(make_proxy)
    await proxy.put("/users/1", data=b"queued")
    runtime = proxy.app[RUNTIME]
    await runtime.cache.l1.delete("users:1")
    assert runtime.l2 is not None
    await runtime.l2.delete("users:1")
    read = await proxy.get("/users/1")
    assert await read.read() == b"queued"
    assert origin.count("/users/1") == 0  # the origin's older value was never asked for


async def test_a_queue_that_cannot_take_the_write_is_503_and_the_write_is_nowhere(
    make_proxy: MakeProxy, origin: Origin
) -> None:
    dead = f"redis://127.0.0.1:{free_port()}"
    proxy = await proxy_for(
        make_proxy, "write_behind: {flush_interval: 1h, timeout: 200ms}\n", l2=dead
    )
    assert (await proxy.get("/users/1")).status == 200  # cached in L1 (L2 is down)
    # The failed calls so far (the queue's first look, the flusher's claims) may have opened
    # the breaker, which would refuse the write before Redis is asked (nothing to undo then):
    # this test is about a write Redis was asked for, so the queue's calls go unguarded.
    proxy.app[RUNTIME].guard.breaker = None
    response = await proxy.put("/users/1", data=b"lost?")
    assert response.status == 503
    assert response.headers["Retry-After"] == "1"
    body = await response.json()
    assert body["error"] == "write-behind queue unavailable"
    assert body["detail"].startswith("not accepted: queue enqueue")
    assert "circuit breaker open" not in body["detail"]  # Redis was asked
    # The write is nowhere; the key is dropped from L1, since a Redis that timed out may have
    # queued it after all, so the read asks the origin again.
    again = await proxy.get("/users/1")
    assert again.headers["X-Cache"] == "MISS"
    assert await again.read() != b"lost?"
    assert origin.count("/users/1", "PUT") == 0


@pytest.mark.parametrize("header", ["Authorization", "Cookie"])
async def test_a_write_behind_write_with_credentials_is_refused_not_stripped(
    make_proxy: MakeProxy, origin: Origin, header: str
) -> None:
    proxy = await proxy_for(make_proxy)
    response = await proxy.put("/users/1", data=b"mine", headers={header: "secret"})
    assert response.status == 400
    body = await response.json()
    assert body["error"] == "credentials on a write-behind write"
    assert header.lower() in body["detail"]
    assert await (await proxy.get("/users/1")).read() != b"mine"
    assert (await write_behind_of(proxy).queue.stats()).depth == 0


async def test_past_max_pending_a_new_key_is_refused(make_proxy: MakeProxy) -> None:
    # One shard: with more, max_pending is shared out and 1 key is a bound per shard.
    proxy = await proxy_for(
        make_proxy, "write_behind: {flush_interval: 1h, max_pending: 1, shards: 1}\n"
    )
    assert (await proxy.put("/users/1", data=b"1")).status == 202
    refused = await proxy.put("/users/2", data=b"2")
    assert refused.status == 503
    assert "1 keys are waiting for the origin" in (await refused.json())["detail"]
    assert (await proxy.put("/users/1", data=b"1b")).status == 202


async def test_patch_while_a_write_is_queued_is_409_and_after_the_flush_is_forwarded(
    clock: FakeClock, make_proxy: MakeProxy, origin: Origin
) -> None:
    proxy = await proxy_for(make_proxy)
    await proxy.put("/users/1", data=b'{"a": 1}')
    conflict = await proxy.patch("/users/1", data=b'{"b": 2}')
    assert conflict.status == 409
    assert (await conflict.json())["error"] == "write still queued"
    assert [r.method for r in origin.received] == []
    await flush(proxy, clock)
    patched = await proxy.patch("/users/1", data=b'{"b": 2}')
    assert patched.status == 200
    assert [r.method for r in origin.received] == ["PUT", "PATCH"]
    assert (await proxy.get("/users/1")).headers["X-Cache"] == "MISS"  # dropped by the PATCH


async def test_a_write_the_origin_refuses_is_dead_lettered_and_dropped_from_the_cache(
    clock: FakeClock, make_proxy: MakeProxy, origin: Origin
) -> None:
    origin.reply("/users/1", b'{"error": "invalid"}', status=422)
    proxy = await proxy_for(make_proxy)
    await proxy.put("/users/1", data=b"refused")
    await flush(proxy, clock)
    [letter] = await write_behind_of(proxy).queue.dead_letters()
    assert letter.last_error == 'the origin answered 422: {"error": "invalid"}'
    read = await proxy.get("/users/1")
    assert await read.read() != b"refused"  # what the origin holds, not what it refused


@pytest.mark.parametrize(
    ("status", "retried"),
    [(500, True), (503, True), (429, True), (408, True), (400, False), (404, False)],
)
async def test_which_origin_answers_are_retried(
    clock: FakeClock, make_proxy: MakeProxy, origin: Origin, status: int, retried: bool
) -> None:
    origin.reply("/users/1", b"", status=status)
    proxy = await proxy_for(make_proxy)
    await proxy.put("/users/1", data=b"x")
    await flush(proxy, clock)
    queue = write_behind_of(proxy).queue
    stats = await queue.stats()
    assert (stats.depth, stats.dead) == ((1, 0) if retried else (0, 1))


async def test_a_delete_of_what_the_origin_no_longer_has_is_done(
    clock: FakeClock, make_proxy: MakeProxy, origin: Origin
) -> None:
    origin.reply("/users/1", b"", status=404)
    proxy = await proxy_for(make_proxy)
    await proxy.delete("/users/1")
    await flush(proxy, clock)
    stats = await write_behind_of(proxy).queue.stats()
    assert (stats.depth, stats.dead) == (0, 0)


async def test_stopping_the_app_flushes_the_queue(make_proxy: MakeProxy, origin: Origin) -> None:
    proxy = await proxy_for(make_proxy)
    for n in range(5):
        await proxy.put(f"/users/{n}", data=b"bye")
    await proxy.close()
    assert sorted(r.path for r in origin.received) == [f"/users/{n}" for n in range(5)]


async def test_writes_flow_on_their_own_within_about_one_flush_interval(
    make_proxy: MakeProxy, origin: Origin, clock: FakeClock
) -> None:
    proxy = await proxy_for(make_proxy, "write_behind: {flush_interval: 50ms}\n")
    await proxy.put("/users/1", data=b"soon")
    await proxy.put("/users/1", data=b"sooner")
    waited = 0.0
    while not origin.received and waited < 2.0:
        await asyncio.sleep(0.01)
        clock.advance(0.01)  # the queue's clock is the test's
        waited += 0.01
    assert [r.body for r in origin.received] == [b"sooner"]  # the two writes coalesced
    assert 0.05 <= waited < 0.5  # not before its window, and not long after


# -- the admin API -------------------------------------------------------------------------------


async def admin_of(aiohttp_client: AiohttpClient, proxy: Client) -> Client:
    return await aiohttp_client(build_admin_app(proxy.app))


async def test_admin_shows_the_queue_and_replays_dead_letters_with_the_token(
    clock: FakeClock, make_proxy: MakeProxy, origin: Origin, aiohttp_client: AiohttpClient
) -> None:
    origin.reply("/users/9", b"no", status=400)
    proxy = await proxy_for(make_proxy, QUIET + "admin: {token: s3cret}\n")
    admin = await admin_of(aiohttp_client, proxy)
    await proxy.put("/users/9", data=b"bad")
    await proxy.put("/users/1", data=b"good")
    shown = await (await admin.get("/admin/write-behind")).json()
    assert shown["queue_depth"] == 2
    assert shown["dead_letters"] == []
    await flush(proxy, clock)
    shown = await (await admin.get("/admin/write-behind")).json()
    assert shown["queue_depth"] == 0
    [letter] = shown["dead_letters"]
    assert {k: letter[k] for k in ("key", "method", "path", "attempts")} == {
        "key": "users:9",
        "method": "PUT",
        "path": "/users/9",
        "attempts": 1,
    }
    assert letter["last_error"] == "the origin answered 400: no"
    assert set(letter) == {"key", "method", "path", "attempts", "last_error", "failed_at"}

    missing = await admin.post("/admin/write-behind/replay")
    assert missing.status == 401
    assert (await missing.json())["error"] == "unauthorized"
    wrong = await admin.post("/admin/write-behind/replay", headers={"Authorization": "Bearer x"})
    assert wrong.status == 403
    assert (await (await admin.get("/admin/write-behind")).json())["dead_letter_count"] == 1

    del origin.handlers["/users/9"]
    await proxy.get("/users/9")  # the origin's value, now cached
    assert (await proxy.get("/users/9")).headers["X-Cache"] == "HIT-L1"
    right = await admin.post(
        "/admin/write-behind/replay", headers={"Authorization": "Bearer s3cret"}
    )
    assert await right.json() == {"replayed": 1}
    # Replayed, the write replaces what the origin held: the cached copy of that is dropped
    # (the read gets the queued write, or the origin once the replay is flushed).
    assert (await proxy.get("/users/9")).headers["X-Cache"] == "MISS"
    await flush(proxy, clock)

    def puts() -> list[bytes]:
        return [r.body for r in origin.received if (r.path, r.method) == ("/users/9", "PUT")]

    for _ in range(200):  # the replay woke the flusher: the write is sent again, now accepted
        if len(puts()) == 2:
            break
        await asyncio.sleep(0.01)
    assert puts() == [b"bad", b"bad"]
    assert (await (await admin.get("/admin/write-behind")).json())["dead_letter_count"] == 0


async def test_replay_is_refused_while_no_token_is_configured(
    make_proxy: MakeProxy, aiohttp_client: AiohttpClient
) -> None:
    proxy = await proxy_for(make_proxy)
    admin = await admin_of(aiohttp_client, proxy)
    response = await admin.post(
        "/admin/write-behind/replay", headers={"Authorization": "Bearer anything"}
    )
    assert response.status == 403
    assert (await response.json())["error"] == "admin calls disabled"


async def test_admin_write_behind_without_write_behind_routes(
    make_proxy: MakeProxy, aiohttp_client: AiohttpClient
) -> None:
    proxy = await make_proxy()
    admin = await admin_of(aiohttp_client, proxy)
    shown = await (await admin.get("/admin/write-behind")).json()
    assert shown["enabled"] is False
    assert shown["queue_depth"] == 0


@pytest.mark.redis
async def test_a_queue_key_holding_something_else_is_503_not_500(
    make_proxy: MakeProxy, redis_url: str, key_prefix: str, redis_client: Redis
) -> None:
    shard = shard_of("users:1", DEFAULT_SHARDS)
    await redis_client.set(f"{key_prefix}{{wb:{shard}}}:values", b"some other program's string")
    proxy = await proxy_for(make_proxy, l2=redis_url, key_prefix=key_prefix)
    response = await proxy.put("/users/1", data=b"x")
    assert response.status == 503
    assert "another Redis type" in (await response.json())["detail"]
