"""Writes on a cached route (cache-aside): forwarded, then the key is dropped everywhere."""

from __future__ import annotations

import asyncio
import socket

import pytest
from redis.asyncio import Redis

from tests.proxy.conftest import MakeProxy, Origin


@pytest.mark.parametrize("method", ["PUT", "PATCH", "POST", "DELETE"])
async def test_a_successful_write_is_forwarded_and_drops_the_key(
    make_proxy: MakeProxy, origin: Origin, method: str
) -> None:
    proxy = await make_proxy()
    await proxy.get("/users/1")
    assert (await proxy.get("/users/1")).headers["X-Cache"] == "HIT-L1"
    response = await proxy.request(method, "/users/1", data=b'{"name": "new"}')
    assert response.status == 200
    assert response.headers["X-Cache"] == "BYPASS"
    assert origin.last("/users/1").method == method
    assert origin.last("/users/1").body == b'{"name": "new"}'
    after = await proxy.get("/users/1")
    assert after.headers["X-Cache"] == "MISS"  # the next read fetches the written value


async def test_a_refused_write_leaves_the_entry(make_proxy: MakeProxy, origin: Origin) -> None:
    proxy = await make_proxy()
    await proxy.get("/users/1")
    origin.reply("/users/1", b'{"error": "conflict"}', status=409)
    response = await proxy.put("/users/1", data=b"{}")
    assert response.status == 409
    assert (await proxy.get("/users/1")).headers["X-Cache"] == "HIT-L1"


async def test_a_write_whose_outcome_is_unknown_drops_the_key_too(
    make_proxy: MakeProxy, origin: Origin
) -> None:
    proxy = await make_proxy()
    await proxy.get("/users/1")

    async def hang(request: object) -> object:
        await asyncio.sleep(5)  # longer than upstream.timeout (1s): the origin may have applied it
        raise AssertionError("unreachable")

    origin.handlers["/users/1"] = hang  # type: ignore[assignment]
    response = await proxy.put("/users/1", data=b"{}")
    assert response.status == 504
    origin.handlers.pop("/users/1")
    assert (await proxy.get("/users/1")).headers["X-Cache"] == "MISS"


@pytest.mark.redis
async def test_a_write_drops_the_key_from_redis_too(
    make_proxy: MakeProxy, redis_url: str, key_prefix: str, redis_client: Redis
) -> None:
    proxy = await make_proxy(l2=redis_url, key_prefix=key_prefix)
    await proxy.get("/products/1", headers={"Accept": "application/json"})
    await proxy.get("/products/1", headers={"Accept": "text/html"})
    await asyncio.sleep(0.05)
    assert await redis_client.hlen(f"{key_prefix}products:1") == 2
    await proxy.delete("/products/1")
    # Every variant is gone; what is left is the write's mark that fences late fills.
    assert await redis_client.hkeys(f"{key_prefix}products:1") == [b"!w"]


async def test_a_write_with_the_origin_down_is_502_and_drops_the_key(
    make_proxy: MakeProxy, origin: Origin
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    proxy = await make_proxy(upstream=dead)
    response = await proxy.put("/users/1", data=b"{}")
    assert response.status == 502
    assert (await response.json())["error"] == "origin unreachable"


@pytest.mark.parametrize("field", ["Location", "Content-Location"])
@pytest.mark.parametrize(
    ("named", "dropped"),
    [
        ("/users/2", True),  # path-absolute
        ("2", True),  # relative to the written URL
        ("http://{host}/users/2", True),  # absolute, on the host the client addressed
        ("http://elsewhere.example/users/2", False),  # another host's resource: not ours
        ("/users/%zz", False),  # no path cachecar can read: nothing dropped, no error
    ],
)
async def test_a_write_drops_the_resources_its_answer_names(
    make_proxy: MakeProxy, origin: Origin, field: str, named: str, dropped: bool
) -> None:
    proxy = await make_proxy()
    await proxy.get("/users/2")
    assert (await proxy.get("/users/2")).headers["X-Cache"] == "HIT-L1"
    target = named.format(host=f"{proxy.host}:{proxy.port}")
    origin.reply("/users/1", b"", status=201, headers={field: target})
    assert (await proxy.post("/users/1", data=b"{}")).status == 201
    after = await proxy.get("/users/2")
    assert after.headers["X-Cache"] == ("MISS" if dropped else "HIT-L1")


async def test_a_failed_write_drops_nothing_it_names(make_proxy: MakeProxy, origin: Origin) -> None:
    proxy = await make_proxy()
    await proxy.get("/users/2")
    origin.reply("/users/1", b"", status=500, headers={"Location": "/users/2"})
    await proxy.post("/users/1", data=b"{}")
    assert (await proxy.get("/users/2")).headers["X-Cache"] == "HIT-L1"


@pytest.mark.parametrize(("method", "dropped"), [("PROPFIND", True), ("OPTIONS", False)])
async def test_a_method_cachecar_does_not_know_is_taken_for_a_write(
    make_proxy: MakeProxy, origin: Origin, method: str, dropped: bool
) -> None:
    proxy = await make_proxy()
    await proxy.get("/users/1")
    answer = await proxy.request(method, "/users/1")
    assert answer.status == 200
    assert origin.last("/users/1").method == method
    after = await proxy.get("/users/1")
    assert after.headers["X-Cache"] == ("MISS" if dropped else "HIT-L1")
