"""What cachecar writes of its own on an answer, for both doors (``proxy.fastpath``'s hit path
and ``proxy.handler``): the X-Cache and Cache-Status values, and its own error answers (a JSON
body saying why) when it has no origin answer to give.
"""

from __future__ import annotations

from aiohttp import web

from cache.lookup import Source

# RFC 9211 Cache-Status values; "cachecar" is the cache's name in them.
HIT_L1 = "cachecar; hit; detail=l1"
HIT_L2 = "cachecar; hit; detail=l2"
BYPASS_ROUTE = "cachecar; fwd=bypass"
BYPASS_METHOD = "cachecar; fwd=method"
WRITTEN = "cachecar; fwd=method; stored"

# X-Cache by where a lookup's answer came from.
X_CACHE = {
    Source.L1: "HIT-L1",
    Source.L2: "HIT-L2",
    Source.LOADER: "MISS",
    Source.STALE: "STALE",
}
# A stale entry the origin confirmed (a 304 to a revalidation) answered the read: one origin
# round trip, no body (nginx's $upstream_cache_status says the same).
REVALIDATED = "REVALIDATED"
OUTCOMES = {
    "HIT-L1": "hit_l1",
    "HIT-L2": "hit_l2",
    "MISS": "miss",
    "STALE": "stale",
    REVALIDATED: "revalidated",
}


def head_lines(source: Source, cache_status: str) -> bytes:
    """The X-Cache and Cache-Status lines of a serialized head (the hit path's)."""
    return f"X-Cache: {X_CACHE[source]}\r\nCache-Status: {cache_status}\r\n".encode()


# The hit path's two answers, as it writes them.
HIT_L1_LINES = head_lines(Source.L1, HIT_L1)
HIT_L2_LINES = head_lines(Source.L2, HIT_L2)

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
