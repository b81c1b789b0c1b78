"""The demo data store: a small JSON REST key/value store over SQLite.

    GET    /                     {"status": "ok"}: the health path
    GET    /{collection}         {"items": [{"id", "value"}, ...], "count": N}
    GET    /{collection}/{id}    the stored JSON, with ETag and Last-Modified; 404 when absent
    PUT    /{collection}/{id}    store the body (any JSON): 201 created, 200 replaced
    PATCH  /{collection}/{id}    JSON merge patch (RFC 7386) onto a stored object: 200; 404
    DELETE /{collection}/{id}    204; 404 when absent
    GET    /_stats               what it received: requests by method and by path
    GET    /_writes[?path=P]     every PUT/PATCH/DELETE it applied, in arrival order, with the
                                 body as received (the newest 100,000)
    POST   /_stats/reset         forget those counts and writes

``latency`` is added to every data request, as a slow database would. Used by the demo, the
tests and the benchmarks, which read ``/_stats`` to count what reached the origin.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections import Counter, deque
from email.utils import formatdate
from typing import Any

from aiohttp import web

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    collection TEXT NOT NULL,
    id TEXT NOT NULL,
    body BLOB NOT NULL,
    version INTEGER NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (collection, id)
)
"""


class Store:
    """The SQLite table behind the demo origin; every call is short and synchronous."""

    def __init__(self, path: str) -> None:
        # Autocommit: each write is its own transaction, one statement.
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        if path != ":memory:":
            self._db.execute("PRAGMA journal_mode=WAL")
            # In WAL mode NORMAL syncs at checkpoints, not at every commit: a write survives
            # the process dying, not the machine losing power, which is enough for a demo
            # store and keeps an fsync out of every write.
            self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(_SCHEMA)

    def get(self, collection: str, item: str) -> tuple[bytes, int, float] | None:
        row = self._db.execute(
            "SELECT body, version, updated_at FROM items WHERE collection = ? AND id = ?",
            (collection, item),
        ).fetchone()
        return None if row is None else (bytes(row[0]), row[1], row[2])

    def put(self, collection: str, item: str, body: bytes) -> bool:
        """Store ``body``; True when the item is new (its first version: one statement, no
        look beforehand)."""
        (version,) = self._db.execute(
            "INSERT INTO items (collection, id, body, version, updated_at) VALUES (?, ?, ?, 1, ?)"
            " ON CONFLICT (collection, id) DO UPDATE SET body = excluded.body,"
            " version = version + 1, updated_at = excluded.updated_at RETURNING version",
            (collection, item, body, time.time()),
        ).fetchone()
        return bool(version == 1)

    def delete(self, collection: str, item: str) -> bool:
        cursor = self._db.execute(
            "DELETE FROM items WHERE collection = ? AND id = ?", (collection, item)
        )
        return cursor.rowcount > 0

    def list(self, collection: str, limit: int) -> list[tuple[str, bytes]]:
        rows = self._db.execute(
            "SELECT id, body FROM items WHERE collection = ? ORDER BY id LIMIT ?",
            (collection, limit),
        ).fetchall()
        return [(row[0], bytes(row[1])) for row in rows]

    def close(self) -> None:
        self._db.close()


STORE = web.AppKey("store", Store)
STATS = web.AppKey("stats", Counter[tuple[str, str]])
WRITES = web.AppKey("writes", deque[dict[str, Any]])
WRITES_KEPT = 100_000
LATENCY = web.AppKey("latency", float)


def build_origin_app(db: str = ":memory:", latency: float = 0.0) -> web.Application:
    app = web.Application(client_max_size=16 << 20)
    app[STATS] = Counter()
    app[WRITES] = deque(maxlen=WRITES_KEPT)
    app[LATENCY] = latency

    async def store_ctx(app: web.Application) -> Any:
        app[STORE] = Store(db)
        yield
        app[STORE].close()

    app.cleanup_ctx.append(store_ctx)
    app.router.add_get("/", health)
    app.router.add_get("/_stats", stats)
    app.router.add_post("/_stats/reset", reset_stats)
    app.router.add_get("/_writes", writes)
    app.router.add_get("/{collection}", list_items)
    app.router.add_route("*", "/{collection}/{id}", item)
    return app


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def _arrive(request: web.Request) -> None:
    request.app[STATS][request.method, request.raw_path] += 1
    if request.app[LATENCY] > 0:
        await asyncio.sleep(request.app[LATENCY])


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def stats(request: web.Request) -> web.Response:
    counts = request.app[STATS]
    by_method: Counter[str] = Counter()
    by_path: Counter[str] = Counter()
    for (method, path), n in counts.items():
        by_method[method] += n
        by_path[path] += n
    return web.json_response(
        {
            "requests": sum(counts.values()),
            "by_method": dict(by_method),
            "by_path": dict(by_path),
            "by_request": {f"{method} {path}": n for (method, path), n in counts.items()},
        }
    )


async def reset_stats(request: web.Request) -> web.Response:
    request.app[STATS].clear()
    request.app[WRITES].clear()
    return web.json_response({"requests": 0})


async def writes(request: web.Request) -> web.Response:
    path = request.query.get("path")
    found = [w for w in request.app[WRITES] if path is None or w["path"] == path]
    return web.json_response({"writes": found, "count": len(found)})


def _applied(request: web.Request, status: int, body: bytes) -> None:
    request.app[WRITES].append(
        {
            "method": request.method,
            "path": request.raw_path,
            "status": status,
            "body": body.decode("utf-8", "replace"),
            "at": time.time(),
        }
    )


async def list_items(request: web.Request) -> web.Response:
    await _arrive(request)
    collection = request.match_info["collection"]
    try:
        limit = int(request.query.get("limit", "1000"))
    except ValueError:
        return _error(400, "limit must be a whole number")
    items = [
        {"id": item, "value": json.loads(body)}
        for item, body in request.app[STORE].list(collection, limit)
    ]
    return web.json_response({"items": items, "count": len(items)})


async def item(request: web.Request) -> web.Response:
    await _arrive(request)
    store = request.app[STORE]
    collection, key = request.match_info["collection"], request.match_info["id"]
    if collection.startswith("_"):
        return _error(404, f"/{collection} is reserved")
    if request.method in {"GET", "HEAD"}:
        found = store.get(collection, key)
        if found is None:
            return _error(404, f"{collection}/{key} not found")
        body, version, updated_at = found
        return web.Response(
            body=body,
            content_type="application/json",
            headers={
                "ETag": f'"{version}"',
                "Last-Modified": formatdate(updated_at, usegmt=True),
            },
        )
    if request.method == "PUT":
        raw = await request.read()
        if not _is_json(raw):
            return _error(400, "the body must be JSON")
        created = store.put(collection, key, raw)
        _applied(request, 201 if created else 200, raw)
        return web.Response(
            body=raw, status=201 if created else 200, content_type="application/json"
        )
    if request.method == "PATCH":
        found = store.get(collection, key)
        if found is None:
            return _error(404, f"{collection}/{key} not found")
        try:
            patch = json.loads(await request.read())
        except ValueError:
            return _error(400, "the body must be JSON")
        merged = json.dumps(_merge_patch(json.loads(found[0]), patch)).encode()
        store.put(collection, key, merged)
        _applied(request, 200, merged)
        return web.Response(body=merged, content_type="application/json")
    if request.method == "DELETE":
        if not store.delete(collection, key):
            return _error(404, f"{collection}/{key} not found")
        _applied(request, 204, b"")
        return web.Response(status=204)
    return _error(405, f"{request.method} is not supported here")


def _is_json(raw: bytes) -> bool:
    try:
        json.loads(raw)
    except ValueError:
        return False
    return True


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: objects merge key by key, null removes, anything else replaces."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for name, value in patch.items():
        if value is None:
            result.pop(name, None)
        else:
            result[name] = _merge_patch(result.get(name), value)
    return result
