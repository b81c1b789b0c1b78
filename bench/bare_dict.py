"""The floor for anything on aiohttp: one handler that answers ``GET /{collection}/{id}`` from a
dict filled at start with the same 1 KiB bodies the origin holds. No cache logic, no headers but
Content-Type: what cachecar's L1 hit costs above this is cachecar's own.

python -m bench.bare_dict --port P [--keys N]      (keys /items/0 .. /items/N-1 and /items/hot)
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Sequence

from aiohttp import web

from bench.wrk import body

TABLE = web.AppKey("table", dict[str, bytes])


async def answer(request: web.Request) -> web.Response:
    found = request.app[TABLE].get(request.path)
    if found is None:
        return web.Response(status=404, text="not found")
    return web.Response(body=found, content_type="application/json")


def build_app(keys: int) -> web.Application:
    app = web.Application()
    table = {f"/items/{n}": body(str(n)) for n in range(keys)}
    table["/items/hot"] = body("hot")
    app[TABLE] = table
    app.router.add_get("/{collection}/{id}", answer)
    app.router.add_get("/", answer)  # the readiness probe: a 404 answers too
    return app


def event_loop() -> asyncio.AbstractEventLoop:
    """uvloop where it is installed, as ``cachecar serve`` runs on it."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bare_dict")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--keys", type=int, default=10_000)
    args = parser.parse_args(argv)
    web.run_app(
        build_app(args.keys),
        host="127.0.0.1",
        port=args.port,
        access_log=None,
        print=None,
        loop=event_loop(),
    )


if __name__ == "__main__":
    main()
