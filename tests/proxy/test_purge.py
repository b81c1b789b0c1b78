"""POST /admin/purge on one proxy: who may call it, what it accepts, what it removes."""

from __future__ import annotations

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient
from redis.asyncio import Redis

from proxy.admin import build_admin_app
from tests.proxy.conftest import MakeProxy

Client = TestClient[web.Request, web.Application]

ROUTES = """
routes:
  - path: /users/{id}
    key: "users:{id}"
    tags: ["user:{id}", "users"]
  - path: /items/{id}
    key: "items:{id}"
"""
TOKEN = "t0ken"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
async def proxy(
    make_proxy: MakeProxy, redis_url: str, key_prefix: str, redis_client: Redis
) -> Client:
    return await make_proxy(
        f"admin: {{token: {TOKEN}}}\n", routes=ROUTES, l2=redis_url, key_prefix=key_prefix
    )


@pytest.fixture
async def admin(proxy: Client, aiohttp_client: AiohttpClient) -> Client:
    return await aiohttp_client(build_admin_app(proxy.app))


async def cached(proxy: Client, path: str) -> bool:
    return (await proxy.get(path)).headers["X-Cache"] == "HIT-L1"


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        (b"not json", 'the body is not JSON; send {"key": "users:1"}'),
        (b'["users:1"]', 'send a JSON object: {"key"|"prefix"|"tag": "..."}'),
        (b'{"keys": "users:1"}', "unknown field 'keys': use key, prefix or tag"),
        (b'{"key": "users:1", "tag": "users"}', "give exactly one of key, prefix or tag"),
        (b"{}", "give exactly one of key, prefix or tag"),
        (b'{"prefix": ""}', "prefix must be a non-empty string"),
        (b'{"key": 7}', "key must be a non-empty string"),
    ],
)
async def test_a_bad_purge_is_a_400_naming_the_problem_and_removes_nothing(
    proxy: Client, admin: Client, body: bytes, detail: str
) -> None:
    await proxy.get("/users/1")
    response = await admin.post("/admin/purge", data=body, headers=AUTH)
    assert response.status == 400
    assert await response.json() == {"error": "bad purge", "detail": detail}
    assert await cached(proxy, "/users/1")


async def test_purge_needs_the_token(proxy: Client, admin: Client) -> None:
    await proxy.get("/users/1")
    for headers, status in (({}, 401), ({"Authorization": "Bearer nope"}, 403)):
        response = await admin.post("/admin/purge", json={"key": "users:1"}, headers=headers)
        assert response.status == status
        assert set(await response.json()) == {"error", "detail"}
    assert await cached(proxy, "/users/1")


async def test_purge_is_refused_while_no_token_is_configured(
    make_proxy: MakeProxy, aiohttp_client: AiohttpClient
) -> None:
    proxy = await make_proxy()
    admin = await aiohttp_client(build_admin_app(proxy.app))
    await proxy.get("/users/1")
    response = await admin.post(
        "/admin/purge", json={"key": "users:1"}, headers={"Authorization": "Bearer x"}
    )
    assert response.status == 403
    assert (await response.json())["error"] == "admin calls disabled"
    assert await cached(proxy, "/users/1")


async def test_purge_by_key_prefix_and_tag_counts_what_it_removed(
    proxy: Client, admin: Client, redis_client: Redis, key_prefix: str
) -> None:
    async def purge(body: dict[str, str]) -> int:
        response = await admin.post("/admin/purge", json=body, headers=AUTH)
        assert response.status == 200
        purged: int = (await response.json())["purged"]
        return purged

    for path in ("/users/1", "/users/2", "/items/1"):
        await proxy.get(path)
    assert await purge({"key": "users:1"}) == 1
    assert await purge({"key": "users:1"}) == 0  # nothing left to remove
    assert not await cached(proxy, "/users/1")  # (fills it again)

    assert await purge({"tag": "user:2"}) == 1
    assert not await cached(proxy, "/users/2")
    assert await cached(proxy, "/items/1")

    assert await purge({"prefix": "users:"}) == 2
    assert await cached(proxy, "/items/1")
    assert await purge({"tag": "users"}) == 0  # its members were purged by prefix

    # Only tagged routes are indexed; a tag's set expires with the entries.
    await proxy.get("/users/5")
    names = {name async for name in redis_client.scan_iter(match=f"{key_prefix}!tag:*")}
    tags = {"user:1", "user:2", "user:5", "users"}  # /items/1 (untagged) is in none
    assert names == {f"{key_prefix}!tag:{tag}".encode() for tag in tags}
    for name in names:
        # The entries' 10 minutes, and as long again kept to be revalidated (they have an ETag).
        assert 0 < await redis_client.pttl(name) <= 600_000 + 600_000
