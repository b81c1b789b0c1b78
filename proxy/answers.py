"""cachecar's own answers, when it has no origin answer to give: a JSON body saying why."""

from __future__ import annotations

from aiohttp import web

CLIENT_GONE = 499  # nginx's "client closed request": the status counted and logged


def error_response(
    status: int, error: str, detail: str, cache_status: str, x_cache: str = "BYPASS"
) -> web.Response:
    """cachecar's own error answer: a JSON body saying what went wrong."""
    return web.json_response(
        {"error": error, "detail": detail},
        status=status,
        headers={"X-Cache": x_cache, "Cache-Status": cache_status},
    )
