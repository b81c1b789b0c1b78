"""The floor for an L2 hit on aiohttp: one handler that makes one redis.asyncio GET per request
(hiredis parses the replies where it is installed) and answers with the value. The benchmark
stores the values under ``--prefix`` + the request path beforehand.

python -m bench.bare_redis --port P --redis URL --prefix PREFIX
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator, Sequence

from aiohttp import web
from redis.asyncio import Redis

from bench.bare_dict import event_loop

REDIS = web.AppKey("redis", Redis)
PREFIX = web.AppKey("prefix", str)


async def answer(request: web.Request) -> web.Response:
    found = await request.app[REDIS].get(request.app[PREFIX] + request.path)
    if found is None:
        return web.Response(status=404, text="not found")
    return web.Response(body=found, content_type="application/json")


def build_app(url: str, prefix: str) -> web.Application:
    app = web.Application()
    app[PREFIX] = prefix

    async def client(app: web.Application) -> AsyncIterator[None]:
        app[REDIS] = Redis.from_url(url)
        yield
        await app[REDIS].aclose()

    app.cleanup_ctx.append(client)
    app.router.add_get("/{collection}/{id}", answer)
    app.router.add_get("/", answer)  # the readiness probe: a 404 answers too
    return app


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bare_redis")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis", required=True)
    parser.add_argument("--prefix", required=True)
    args = parser.parse_args(argv)
    web.run_app(
        build_app(args.redis, args.prefix),
        host="127.0.0.1",
        port=args.port,
        access_log=None,
        print=None,
        loop=event_loop(),
    )


if __name__ == "__main__":
    main()
