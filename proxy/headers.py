"""Which headers cross the proxy, in each direction and for each kind of request.

client -> origin, uncached (BYPASS):  everything end-to-end; X-Forwarded-For appended
client -> origin, cacheable miss:     only what cannot poison a shared entry: Accept,
                                      User-Agent, the route's vary and forward_headers, and
                                      the X-Forwarded-For/-Proto and Surrogate-Capability
                                      cachecar sets itself
origin -> client:                     everything end-to-end
origin -> cache:                      end-to-end minus what describes one delivery
                                      (Content-Length, Age, Set-Cookie)
cache -> origin, revalidation:        the cacheable miss's, plus the stored entry's
                                      validators (If-None-Match, If-Modified-Since)
origin 304 -> cache:                  its headers replace the stored ones, but those that
                                      describe the stored body (``refreshed``)
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

from multidict import CIMultiDict, CIMultiDictProxy

# Header names that describe one connection, not the resource: never stored, never forwarded.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
CREDENTIALS = frozenset({"authorization", "cookie"})
RANGE = "range"
# Request headers that make a connection aiohttp's for good: a body, or a protocol change.
HANDED_OVER = frozenset({"content-length", "transfer-encoding", "upgrade", "expect"})
# Request headers that take a read past the hit path to the full handler: credentials and Range
# (policy.bypass_reason decides there), validators (answered 304 there: every If-* header) and
# whatever hands the connection over. proxy.fastpath builds its byte patterns from these.
FULL_PATH = CREDENTIALS | HANDED_OVER | {RANGE}
FULL_PATH_PREFIX = "if-"
# Request headers the client may send but the origin must not see from us as they came.
_NOT_FORWARDED = HOP_BY_HOP | {"host", "content-length", "expect"}
# Response headers about one delivery: a cached answer gets its own. (Set-Cookie stays with the
# entry for the one client it was fetched for; policy.decide never lets such an entry be stored.)
_NOT_STORED = HOP_BY_HOP | {"content-length", "age"}
# Always sent on a cacheable miss, besides the route's vary and forward_headers.
FILL_HEADERS = ("accept", "user-agent")
# cachecar's name as a surrogate (Edge Architecture): announced on a cacheable miss in
# Surrogate-Capability, so the origin may aim Surrogate-Control directives at it ("max-age=60;
# cachecar"), which ``policy`` obeys.
SURROGATE = "cachecar"
_CAPABILITY = f'{SURROGATE}="Surrogate/1.0"'
# Headers an origin must see on a 304's behalf (RFC 9110 §15.4.5).
NOT_MODIFIED_HEADERS = frozenset(
    {"cache-control", "content-location", "date", "etag", "expires", "vary", "last-modified"}
)

# Request headers a route never learns to key on, besides FULL_PATH's (``learnable``).
_NEVER_KEYED = HOP_BY_HOP | {"accept-encoding", "host"}
# Stored headers a 304 does not replace: they describe the stored body (RFC 9111 §3.2), or name
# the representation the 304 confirmed.
_KEPT_ON_REFRESH = frozenset({"content-encoding", "content-range", "content-md5", "etag"})

Pairs = tuple[tuple[str, str], ...]


def _connection_listed(headers: CIMultiDictProxy[str]) -> frozenset[str]:
    """Header names a Connection header declares hop-by-hop (RFC 9110 §7.6.1)."""
    listed = headers.getall("Connection", ())
    if not listed:
        return frozenset()
    return frozenset(
        name.strip().lower() for value in listed for name in value.split(",") if name.strip()
    )


def _without(headers: CIMultiDictProxy[str], dropped: frozenset[str]) -> Iterable[tuple[str, str]]:
    dropped = dropped | _connection_listed(headers)
    return ((name, value) for name, value in headers.items() if name.lower() not in dropped)


def forward_uncached(
    headers: CIMultiDictProxy[str], peer: str | None, scheme: str
) -> CIMultiDict[str]:
    """Request headers for a request passed through: all end-to-end, plus forwarding headers."""
    out = CIMultiDict(_without(headers, _NOT_FORWARDED))
    _set_forwarded(out, headers.get("X-Forwarded-For"), peer, scheme)
    return out


def forward_fill(
    headers: CIMultiDictProxy[str], extra: tuple[str, ...], peer: str | None, scheme: str
) -> CIMultiDict[str]:
    """Request headers for a cacheable miss: the safe few and ``extra`` (a route's), nothing
    the client could poison."""
    out: CIMultiDict[str] = CIMultiDict()
    for name in _fill_names(extra):
        for value in headers.getall(name, ()):
            out.add(name, value)
    # The client's own X-Forwarded-For is not trusted into a shared fetch.
    _set_forwarded(out, None, peer, scheme)
    out["Surrogate-Capability"] = _CAPABILITY
    return out


@functools.lru_cache(maxsize=1024)
def _fill_names(extra: tuple[str, ...]) -> tuple[str, ...]:
    """The names a miss sends with ``extra``, each once (vary may name Accept): worked out once
    per route (and per set of names it learned), not per miss."""
    return tuple(dict.fromkeys((*FILL_HEADERS, *extra)))


def _set_forwarded(out: CIMultiDict[str], prior: str | None, peer: str | None, scheme: str) -> None:
    if peer:
        out["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
    elif prior:
        out["X-Forwarded-For"] = prior
    out.setdefault("X-Forwarded-Proto", scheme)


def to_store(headers: CIMultiDictProxy[str]) -> Pairs:
    """Response headers kept with a cached entry."""
    return tuple(_without(headers, _NOT_STORED))


def to_pass(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """Response headers passed to the client as they came (hop-by-hop removed)."""
    return CIMultiDict(_without(headers, HOP_BY_HOP))


def learnable(name: str) -> bool:
    """May a route learn to key on request header ``name`` (lower case) when the origin's
    answers vary on it? Not on what cachecar never sends on a miss: credentials (a request with
    them bypasses the cache), validators, Range, what describes a body or a connection, and
    Accept-Encoding (cachecar fetches the identity encoding, the right one for every client)."""
    return not (name in _NEVER_KEYED or name in FULL_PATH or name.startswith(FULL_PATH_PREFIX))


def validators(stored: Pairs) -> dict[str, str]:
    """The conditional headers that ask the origin whether ``stored`` is still current."""
    found: dict[str, str] = {}
    etag = find(stored, "etag")
    if etag is not None:
        found["If-None-Match"] = etag
    last_modified = find(stored, "last-modified")
    if last_modified is not None:
        found["If-Modified-Since"] = last_modified
    return found


def refreshed(stored: Pairs, fresh: CIMultiDictProxy[str]) -> Pairs:
    """The stored headers updated by a 304's (RFC 9111 §3.2, §4.3.4)."""
    update = tuple(
        (name, value)
        for name, value in _without(fresh, _NOT_STORED)
        if name.lower() not in _KEPT_ON_REFRESH
    )
    replaced = {name.lower() for name, _ in update}
    return tuple((name, value) for name, value in stored if name.lower() not in replaced) + update


def find(pairs: Pairs, name: str) -> str | None:
    """The first value of ``name`` (lower-case) in stored header pairs."""
    for key, value in pairs:
        if key.lower() == name:
            return value
    return None
