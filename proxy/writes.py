"""A write on a cached route, by the route's mode.

    cache-aside     forward (streamed) -> 2xx or no answer: drop the key everywhere; 2xx or
                    3xx: drop the keys of the URLs its Location and Content-Location name too
                    (RFC 9111 §4.4; on this host only). A method the cache does not know is
                    taken for a write, as RFC 9111 asks of a method whose safety is unknown
    write-through   PUT: forward (read whole) -> 2xx: the body becomes the key's entry
                    -> a refusal changes nothing; no answer: drop the key
                    PATCH/POST/DELETE: as cache-aside
    write-behind    PUT/DELETE with Authorization or Cookie: 400 (they cannot be kept for the
                    later origin write, and acknowledging would skip the origin's check)
                    PUT/DELETE: queue it (durable) -> entry (DELETE: a 404 tombstone) in L1, L2
                    -> 202 Accepted, X-Cache-Write: queued; the queue refusing -> 503, nothing kept
                    PATCH/POST: forwarded as cache-aside, unless the key has a write still queued:
                    then 409, since the origin would apply the patch to a value the queued write
                    is about to replace
    any mode        the key or a tag too long: passed through, nothing dropped or stored (it
                    is never cached); on write-behind a PUT or DELETE is refused (414)

``OriginSink`` is how the flusher sends queued writes: PUT with the stored body and
Content-Type, DELETE for a tombstone; 2xx (and 404/410 for a DELETE) is done, 5xx, 408, 429 and
no answer are retried, any other 4xx is permanent.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from cache.clock import Clock
from cache.entry import Entry
from cache.errors import CacheError, TierError
from cache.locks import KeyLocks
from cache.tiered import TieredCache
from cache.write_behind.flusher import Outcome, Sent
from cache.write_behind.records import QueuedWrite
from cache.write_behind.writer import WriteBehind
from proxy import headers as forwarding
from proxy.answers import BYPASS_METHOD, WRITTEN, error_response
from proxy.headers import Pairs, find
from proxy.origin import OriginClient, OriginError
from proxy.passthrough import PassThrough
from proxy.paths import BadPath, normalize_path
from proxy.request import CacheRequest, locate
from proxy.routes import Router
from proxy.settings import Mode

RETRIED_STATUS = frozenset({408, 429})


def written_entry(
    body: bytes, content_type: str | None, now: float, ttl: float, validators: Pairs = ()
) -> Entry:
    """The entry a written body becomes: what a GET of the key answers from now on."""
    headers = (("Content-Type", content_type or "application/octet-stream"), *validators)
    return Entry(status=200, headers=headers, body=body, stored_at=now, ttl=ttl)


def validators_of(headers: CIMultiDictProxy[str]) -> Pairs:
    """The validators the origin gave the written representation (ETag, Last-Modified)."""
    return tuple((name, headers[name]) for name in ("ETag", "Last-Modified") if name in headers)


def tombstone(key: str, now: float, ttl: float) -> Entry:
    """What a read of a key answers between its queued DELETE and the origin applying it."""
    body = json.dumps({"error": "not found", "detail": f"{key} was deleted"}).encode()
    return Entry(
        status=404,
        headers=(("Content-Type", "application/json"),),
        body=body,
        stored_at=now,
        ttl=ttl,
    )


def _named(request: web.Request, value: str) -> tuple[str, str] | None:
    """The normalized path and query a Location or Content-Location names, when it is a URL of
    the host the client addressed (relative ones are); None otherwise."""
    try:
        target = request.url.join(URL(value.strip()))
        path = normalize_path(target.raw_path)
    except (ValueError, BadPath):
        return None
    if (target.host, target.port) != (request.url.host, request.url.port):
        return None
    return path, target.raw_query_string


class Writes:
    def __init__(
        self,
        cache: TieredCache,
        origin: OriginClient,
        passthrough: PassThrough,
        *,
        clock: Clock,
        write_behind: WriteBehind | None,
        max_key_length: int,
        router: Router,
    ) -> None:
        """``router``: to find the keys of the URLs a write's answer names."""
        self._cache = cache
        self._router = router
        self._origin = origin
        self._passthrough = passthrough
        self._clock = clock
        self._write_behind = write_behind
        self._max_key_length = max_key_length
        self._write_through_locks = KeyLocks()

    async def __call__(self, request: web.Request, cached: CacheRequest) -> web.StreamResponse:
        route, key, path, query = cached.route, cached.key, cached.path, cached.query
        method = request.method
        if cached.too_long:
            if route.mode is Mode.WRITE_BEHIND and method in {"PUT", "DELETE"}:
                return error_response(
                    414,
                    "key too long",
                    f"the key of this write has {len(key)} characters (or one of its tags has "
                    f"more than server.max_key_length, {self._max_key_length}); a write-behind "
                    "write cannot be queued under it",
                    BYPASS_METHOD,
                )
            # Never cached (reads of it are passed through too): nothing to drop or store.
            return await self._passthrough(request, route.name, path, query, BYPASS_METHOD)
        if route.mode is Mode.WRITE_BEHIND and self._write_behind is not None:
            if method in {"PUT", "DELETE"}:
                return await self._queue(request, cached)
            conflict = await self._still_queued(key)
            if conflict is not None:
                return conflict
        elif route.mode is Mode.WRITE_THROUGH and method == "PUT":
            return await self._write_through(request, cached)

        async def invalidate(status: int | None, answer: CIMultiDictProxy[str] | None) -> None:
            # Dropped on success, and also when the outcome is unknown (the origin may have
            # applied a write it never confirmed): a needless miss is cheap, a stale hit is not.
            if status is None or 200 <= status < 300:
                await self._cache.invalidate(key)
            if status is not None and 200 <= status < 400 and answer is not None:
                await self._invalidate_named(request, answer)

        return await self._passthrough(
            request, route.name, path, query, BYPASS_METHOD, on_answer=invalidate
        )

    async def _invalidate_named(self, request: web.Request, answer: CIMultiDictProxy[str]) -> None:
        """Drop the keys of the resources a write's answer names in Location and
        Content-Location: the write may have changed them too. Only URLs of this host, as
        the client addressed it (another host's resources are not this cache's)."""
        for field in ("Location", "Content-Location"):
            for value in answer.getall(field, ()):
                found = _named(request, value)
                if found is None:
                    continue
                named = locate(self._router, *found, self._max_key_length)
                if isinstance(named, CacheRequest) and not named.too_long:
                    await self._cache.invalidate(named.key)

    async def _write_through(
        self, request: web.Request, cached: CacheRequest
    ) -> web.StreamResponse:
        route, key = cached.route, cached.key
        body = await self._passthrough.read_body(request, BYPASS_METHOD)
        if isinstance(body, web.Response):
            return body
        sent = forwarding.forward_uncached(request.headers, request.remote, request.scheme)
        # One PUT of a key at a time from here: the cache ends with what the origin got last.
        async with self._write_through_locks.hold(key):
            try:
                response = await self._origin.fetch(
                    "PUT", self._origin.url(cached.path, cached.query), sent, body, route=route.name
                )
            except OriginError as exc:
                await self._cache.invalidate(key)  # the origin may have applied it: unknown
                return error_response(exc.status, exc.title, str(exc), BYPASS_METHOD)
            stored = 200 <= response.status < 300
            if stored:
                entry = written_entry(
                    body,
                    request.headers.get("Content-Type"),
                    self._clock.time(),
                    max(route.l1_ttl, route.l2_ttl),
                    validators_of(response.headers),
                )
                await self._cache.put(
                    key,
                    cached.variant(request.headers),
                    entry,
                    l1_ttl=route.l1_ttl,
                    l2_ttl=route.l2_ttl,
                    tags=cached.tags,
                )
        headers = forwarding.to_pass(response.headers)
        headers.popall("Content-Length", None)
        headers["X-Cache"] = "BYPASS"
        headers["Cache-Status"] = WRITTEN if stored else BYPASS_METHOD
        return web.Response(status=response.status, headers=headers, body=response.body)

    async def _queue(self, request: web.Request, cached: CacheRequest) -> web.StreamResponse:
        assert self._write_behind is not None
        route, key = cached.route, cached.key
        sent_credentials = sorted(
            name for name in forwarding.CREDENTIALS if name in request.headers
        )
        if sent_credentials:
            # The flusher sends the body later, without them (credentials are never stored):
            # acknowledging now would let readers see a write the origin never authorized.
            return error_response(
                400,
                "credentials on a write-behind write",
                f"{' and '.join(sent_credentials)} cannot be kept for the later origin write; "
                "send the write without them (the origin must accept writes from cachecar), or "
                "use mode: write-through",
                BYPASS_METHOD,
            )
        now = self._clock.time()
        ttl = max(route.l1_ttl, route.l2_ttl)
        if request.method == "PUT":
            body = await self._passthrough.read_body(request, BYPASS_METHOD)
            if isinstance(body, web.Response):
                return body
            entry = written_entry(body, request.headers.get("Content-Type"), now, ttl)
        else:
            entry = tombstone(key, now, ttl)
        write = QueuedWrite(key, request.method, cached.target, entry)
        try:
            await self._write_behind.write(
                write,
                cached.variant(request.headers),
                l1_ttl=route.l1_ttl,
                l2_ttl=route.l2_ttl,
                tags=cached.tags,
            )
        except CacheError as exc:  # unavailable, full, or its keys are not ours to read
            response = error_response(
                503, "write-behind queue unavailable", f"not accepted: {exc}", BYPASS_METHOD
            )
            response.headers["Retry-After"] = "1"
            return response
        return web.json_response(
            {"queued": request.method, "key": key},
            status=202,
            headers={"X-Cache": "BYPASS", "Cache-Status": WRITTEN, "X-Cache-Write": "queued"},
        )

    async def _still_queued(self, key: str) -> web.Response | None:
        """A 409 when ``key`` has a queued write a PATCH or POST would race; else None."""
        assert self._write_behind is not None
        try:
            pending = await self._write_behind.queue.pending(key)
        except TierError as exc:
            response = error_response(
                503,
                "write-behind queue unavailable",
                f"cannot tell whether a write of {key} is still queued: {exc}",
                BYPASS_METHOD,
            )
            response.headers["Retry-After"] = "1"
            return response
        if pending is None:
            return None
        return error_response(
            409,
            "write still queued",
            f"a {pending.method} of {key} has not reached the origin yet; retry once it is "
            "flushed, or PUT the whole value",
            BYPASS_METHOD,
        )


class OriginSink:
    """The flusher's way to the origin."""

    def __init__(self, origin: OriginClient, route_of: Callable[[str], str]) -> None:
        self._origin = origin
        self._route_of = route_of  # a write's path -> its route's name, for the origin metrics

    async def send(self, write: QueuedWrite) -> Sent:
        path, _, query = write.target.partition("?")
        headers: CIMultiDict[str] = CIMultiDict()
        data = None
        if write.method == "PUT":
            content_type = find(write.entry.headers, "content-type")
            if content_type is not None:
                headers["Content-Type"] = content_type
            data = write.entry.body
        try:
            response = await self._origin.fetch(
                write.method,
                self._origin.url(path, query),
                headers,
                data,
                route=self._route_of(path),
            )
        except OriginError as exc:
            return Sent(Outcome.RETRY, f"{exc.title}: {exc}")
        status = response.status
        if 200 <= status < 300 or (write.method == "DELETE" and status in {404, 410}):
            return Sent(Outcome.OK)
        said = response.body[:200].decode("utf-8", "replace")
        detail = f"the origin answered {status}" + (f": {said}" if said else "")
        if status >= 500 or status in RETRIED_STATUS:
            return Sent(Outcome.RETRY, detail)
        return Sent(Outcome.PERMANENT, detail)
