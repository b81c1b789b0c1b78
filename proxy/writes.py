"""Writes on a cached route, by the route's mode.

    cache-aside     forward (streamed) -> 2xx or no answer: drop the key everywhere
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

``OriginSink`` is how the flusher sends queued writes: PUT with the stored body and
Content-Type, DELETE for a tombstone; 2xx (and 404/410 for a DELETE) is done, 5xx, 408, 429 and
no answer are retried, any other 4xx is permanent.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from multidict import CIMultiDict, CIMultiDictProxy

from cache.entry import Entry
from cache.write_behind.flusher import Outcome, Sent
from cache.write_behind.records import QueuedWrite
from proxy.headers import Pairs, find
from proxy.origin import OriginClient, OriginError

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
