"""The demo data store that the demo, the tests and the benchmarks run against."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

from aiohttp import web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from proxy.demo.origin import Store, build_origin_app

Client = TestClient[web.Request, web.Application]


async def test_put_get_patch_delete_round_trip(aiohttp_client: AiohttpClient) -> None:
    store: Client = await aiohttp_client(build_origin_app())
    assert (await store.get("/users/1")).status == 404
    created = await store.put("/users/1", json={"name": "ada", "tags": {"a": 1, "b": 2}})
    assert created.status == 201
    got = await store.get("/users/1")
    assert await got.json() == {"name": "ada", "tags": {"a": 1, "b": 2}}
    assert got.headers["ETag"] == '"1"'
    assert "Last-Modified" in got.headers
    assert (await store.put("/users/1", json={"name": "ada"})).status == 200
    assert (await store.get("/users/1")).headers["ETag"] == '"2"'
    patched = await store.patch("/users/1", json={"name": None, "role": "admin"})
    assert await patched.json() == {"role": "admin"}
    assert (await store.delete("/users/1")).status == 204
    assert (await store.delete("/users/1")).status == 404
    assert (await store.patch("/users/1", json={})).status == 404


async def test_a_collection_lists_its_items(aiohttp_client: AiohttpClient) -> None:
    store: Client = await aiohttp_client(build_origin_app())
    await store.put("/products/2", json={"p": 2})
    await store.put("/products/1", json={"p": 1})
    await store.put("/users/1", json={})
    listing = await (await store.get("/products")).json()
    assert listing == {
        "items": [{"id": "1", "value": {"p": 1}}, {"id": "2", "value": {"p": 2}}],
        "count": 2,
    }


async def test_a_body_that_is_not_json_is_refused(aiohttp_client: AiohttpClient) -> None:
    store: Client = await aiohttp_client(build_origin_app())
    response = await store.put("/users/1", data=b"not json")
    assert response.status == 400
    assert await response.json() == {"error": "the body must be JSON"}


async def test_stats_count_what_reached_the_store_and_reset(aiohttp_client: AiohttpClient) -> None:
    store: Client = await aiohttp_client(build_origin_app(latency=0.001))
    await store.put("/users/1", json={})
    await store.get("/users/1")
    await store.get("/users/1")
    await store.get("/users/2")
    stats = await (await store.get("/_stats")).json()
    assert stats["requests"] == 4
    assert stats["by_method"] == {"PUT": 1, "GET": 3}
    assert stats["by_path"] == {"/users/1": 3, "/users/2": 1}
    assert stats["by_request"]["GET /users/1"] == 2
    await store.post("/_stats/reset")
    assert (await (await store.get("/_stats")).json())["requests"] == 0


async def test_data_survives_a_restart_with_a_db_file(
    aiohttp_client: AiohttpClient, tmp_path: object
) -> None:
    db = str(tmp_path) + "/origin.sqlite3"
    first: Client = await aiohttp_client(build_origin_app(db))
    await first.put("/users/1", json={"kept": True})
    await first.close()
    second: Client = await aiohttp_client(build_origin_app(db))
    assert await (await second.get("/users/1")).json() == {"kept": True}


async def test_writes_lists_every_applied_write_in_order(aiohttp_client: AiohttpClient) -> None:
    store: Client = await aiohttp_client(build_origin_app())
    await store.put("/users/1", json={"v": 1})
    await store.put("/users/2", json={"v": 2})
    await store.patch("/users/1", json={"w": 3})
    await store.delete("/users/2")
    await store.put("/users/3", data=b"not json")  # refused: not applied, not listed
    await store.delete("/users/9")  # nothing to delete: not applied, not listed
    found = await (await store.get("/_writes")).json()
    assert [(w["method"], w["path"], w["status"], w["body"]) for w in found["writes"]] == [
        ("PUT", "/users/1", 201, '{"v": 1}'),
        ("PUT", "/users/2", 201, '{"v": 2}'),
        ("PATCH", "/users/1", 200, '{"v": 1, "w": 3}'),
        ("DELETE", "/users/2", 204, ""),
    ]
    one = await (await store.get("/_writes", params={"path": "/users/1"})).json()
    assert [w["method"] for w in one["writes"]] == ["PUT", "PATCH"]
    await store.post("/_stats/reset")
    assert (await (await store.get("/_writes")).json())["count"] == 0


async def test_a_file_store_keeps_writes_in_wal_without_a_sync_per_commit(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    db = tmp_path / "origin.db"
    store: Client = await aiohttp_client(build_origin_app(str(db)))
    assert (await store.put("/users/1", json={"v": 1})).status == 201
    assert (await store.put("/users/1", json={"v": 2})).status == 200
    assert (await store.delete("/users/1")).status == 204
    assert (await store.put("/users/1", json={"v": 3})).status == 201  # new again
    assert (await store.get("/users/1")).headers["ETag"] == '"1"'
    with contextlib.closing(sqlite3.connect(db)) as reader:
        assert reader.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert reader.execute("SELECT body FROM items").fetchall() == [(b'{"v": 3}',)]
    with contextlib.closing(Store(str(db))) as own:
        # 1 = NORMAL: synced at checkpoints, not at every commit
        assert own._db.execute("PRAGMA synchronous").fetchone() == (1,)
