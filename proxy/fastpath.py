"""The hit path: a cache hit (L1, or L2 at one round trip) answered straight from the
connection's bytes, without aiohttp.

    bytes -> FastPath (one per connection, in front of aiohttp's protocol)
      a whole request head: GET or HEAD, no body, a canonical path on a cached route, no
      credentials, range, validators or upgrade, the write side not paused
        its entry fresh in L1 (not due for an early refresh)
          -> Hits.answer: the entry's head, serialized once per entry, + Age, Date, X-Cache,
             Cache-Status, and the body, in one write; counted as ``proxy.handler`` counts
        not in L1, no lookup of it under way, L2 up
          -> L2 asked (``cache.peek``: the reads of one round of the event loop go to
             Redis in one round trip); the connection's next bytes wait meanwhile
             fresh there -> answered as above (HIT-L2), and kept in L1
             else -> aiohttp's, with what L2 said kept for the full path's lookup
             (the read's one future and three calls are drawn in ``cache.peek``)
      anything else -> aiohttp's protocol, from that head on: the full handler answers it

A client that leaves its answers unread is cut off: once the transport's buffer is past its
high-water mark (writes paused, for the hit path and aiohttp's alike) and stays there for
``server.send_timeout``, the connection is aborted. Whatever waits to write to it then fails,
and a relay that held an origin connection closes that connection (``proxy.passthrough``).
While writes are paused the hit path writes nothing: heads go to aiohttp, which waits to drain.

Answers leave in the order requests came: while aiohttp has a request in hand, every head goes
to it, and the hit path answers again only once aiohttp waits for the next one. aiohttp is only
ever given whole heads; once it is given a body, a partial head or an upgrade, the connection is
its own for good. A head that never ends is aiohttp's to time out (``server.idle_timeout``).

This reads three private attributes of aiohttp's ``RequestHandler`` (``_waiter``, ``_messages``,
``_payload_parser``: whether it waits for a request) and sets a fourth
(``_next_keepalive_close_time``: its idle timer, restarted by each answer written here; aiohttp
has no public call for either). ``tests/proxy/test_fastpath.py`` fails if a release changes
them. The loop and the keep-alive timeout are not read from it: the timeout is
``server.idle_timeout``, given to both.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import logging
import re
import socket
import struct
import time
from collections.abc import Callable
from email.utils import formatdate
from functools import partial
from typing import Any, cast

from multidict import CIMultiDict, CIMultiDictProxy

from cache.entry import Entry
from cache.tiered import TieredCache
from proxy.answers import HIT_L1_LINES, HIT_L2_LINES
from proxy.headers import FULL_PATH, FULL_PATH_PREFIX, HANDED_OVER
from proxy.metrics import Metrics
from proxy.paths import is_canonical
from proxy.request import CacheRequest, locate
from proxy.routes import Router

logger = logging.getLogger("cachecar.proxy")
_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST, drops what is unsent

_REQUEST_LINE = re.compile(rb"(GET|HEAD) (/[^ \r\n]*) HTTP/1\.([01])")
_FIELDS = re.compile(rb"(?:\r\n[!#$%&'*+.^_`|~0-9A-Za-z-]+:[^\r\n]*)*")


def _names(names: frozenset[str]) -> bytes:
    return b"|".join(re.escape(name.encode()) for name in sorted(names))


# Request headers that send a request down the full path (answered there, or passed through),
# from proxy.headers' one list.
_FULL_PATH_FIELD = re.compile(
    rb"\r\n(?:" + _names(FULL_PATH) + b"|" + re.escape(FULL_PATH_PREFIX.encode()) + rb"[a-z-]+)"
    rb"[ \t]*:",
    re.IGNORECASE,
)
_CONNECTION = re.compile(rb"\r\nconnection:([^\r\n]*)", re.IGNORECASE)
# Headers that make a connection aiohttp's for good: a body, or a protocol change.
_HANDED_OVER = re.compile(rb"\n(?:" + _names(HANDED_OVER) + rb")[ \t]*:", re.IGNORECASE)
# Response headers the hit path sets itself (or that describe one delivery).
_OWN = frozenset({"x-cache", "cache-status", "age", "content-length", "connection"})
_DATED = b"\r\nDate: "  # in a serialized head: the entry has a Date of its own, kept
MAX_HEAD = 16 << 10  # a head longer than this is aiohttp's to refuse

Answer = tuple[bytes, bool]  # the whole answer, and whether the connection stays open
Later = Callable[[Answer | None], None]  # takes an answer that waited for L2 (None: the full
# path's)
# What ``Hits.answer`` returns while L2 is asked: the answer goes to its ``later`` instead.
ASKED: Answer = (b"", True)


def _nobody(answer: Answer | None) -> None:
    """The ``later`` of a caller that takes L1 hits only."""


def _fields(head: bytes, start: int) -> CIMultiDictProxy[str]:
    """The header fields of a head, for the (rarer) routes that vary on some."""
    fields: CIMultiDict[str] = CIMultiDict()
    for line in head[start:].decode("latin-1").split("\r\n")[1:]:
        name, _, value = line.partition(":")
        fields.add(name, value.strip(" \t"))
    return CIMultiDictProxy(fields)


def _serialize(entry: Entry, cache_lines: bytes) -> bytes:
    """The status line and the entry's headers, with ``cache_lines`` (X-Cache, Cache-Status)
    and Content-Length. A Date of the entry's own is written ``Date:`` (``_DATED`` finds it)."""
    try:
        reason = http.HTTPStatus(entry.status).phrase
    except ValueError:
        reason = ""
    lines = [f"HTTP/1.1 {entry.status} {reason}\r\n".encode()]
    for name, value in entry.headers:
        lowered = name.lower()
        if lowered == "date":
            name = "Date"
        elif lowered in _OWN:
            continue
        lines.append(f"{name}: {value}\r\n".encode("utf-8", "surrogateescape"))
    lines.append(cache_lines)
    lines.append(b"Content-Length: %d\r\n" % len(entry.body))
    return b"".join(lines)


def _l1_head(entry: Entry) -> bytes:
    """What L1 keeps with an entry for the hit path (``cache.peek``): the part of an L1
    hit that is the same for every request."""
    return _serialize(entry, HIT_L1_LINES)


class Hits:
    """Answers L1 and L2 hits from request heads; shared by a runtime's connections."""

    def __init__(
        self,
        router: Router,
        cache: TieredCache,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.time,
        max_key_length: int = 1024,
        max_header_size: int = 8190,
        max_headers: int = 128,
        idle_timeout: float = 75.0,
    ) -> None:
        """``max_header_size``, ``max_headers``: aiohttp's limits; a head past them is left to
        aiohttp, which refuses it. ``idle_timeout``: the keep-alive timeout aiohttp was given
        (``server.idle_timeout``), restarted by every answer the hit path writes."""
        self.idle_timeout = idle_timeout
        self._max_line = max_header_size
        self._max_headers = max_headers
        self._router = router
        self._peek = cache.hit_path.peek
        self._metrics = metrics
        self._clock = clock
        self._max_key_length = max_key_length
        self._date_second = -1
        self._date = b""

    def answer(self, head: bytes, later: Later = _nobody) -> Answer | None:
        """The whole answer to a request ``head`` (without its blank line) and whether the
        connection stays open; None when the full path must answer; ``ASKED`` when L2 is
        asked first, and either goes to ``later``."""
        started = time.perf_counter()
        request = _REQUEST_LINE.match(head)
        # Every header line well formed (else aiohttp's to judge), none that needs the full
        # path, none past aiohttp's limits.
        if (
            request is None
            or _FIELDS.fullmatch(head, request.end()) is None
            or _FULL_PATH_FIELD.search(head) is not None
            or head.count(b"\n") > self._max_headers
            or (len(head) > self._max_line and max(map(len, head.split(b"\r\n"))) > self._max_line)
        ):
            return None
        method = "GET" if request.group(1) == b"GET" else "HEAD"
        keep_alive = request.group(3) == b"1"
        target = request.group(2).decode("latin-1")
        path, _, query = target.partition("?")
        if "#" in query or not is_canonical(path):
            return None
        cached = locate(self._router, path, query, self._max_key_length)
        if type(cached) is not CacheRequest or cached.too_long:
            return None
        route = cached.route
        variant = cached.variant(_fields(head, request.end())) if cached.varies else ""
        http_1_0 = not keep_alive
        connection = _CONNECTION.search(head)
        if connection is not None:
            value = connection.group(1).lower()
            if b"close" in value:
                keep_alive = False
            elif b"keep-alive" in value:
                keep_alive = True
        found = self._peek(cached.key, variant, _l1_head, route.stale, route.l1_ttl)
        if found is None:
            return None
        if not isinstance(found, tuple):  # not in L1: L2 is being asked
            found.then = partial(
                self._from_l2, later, route.name, method, keep_alive, http_1_0, started
            )
            return ASKED
        entry, wire = found
        now = self._clock()
        # GET and HEAD are their own method labels: the tuple Metrics.series would make.
        self._metrics.answered(
            (route.name, method, entry.status, "hit_l1"), time.perf_counter() - started, now
        )
        return self._assemble(entry, wire, method, keep_alive, http_1_0, now), keep_alive

    def _from_l2(
        self,
        later: Later,
        route: str,
        method: str,
        keep_alive: bool,
        http_1_0: bool,
        started: float,
        entry: Entry | None,
    ) -> None:
        if entry is None:
            later(None)
            return
        # Not kept: L1 keeps its own rendering, of its own entry, once it holds one.
        wire = _serialize(entry, HIT_L2_LINES)
        now = self._clock()
        whole = self._assemble(entry, wire, method, keep_alive, http_1_0, now)
        self._metrics.answered(
            (route, method, entry.status, "hit_l2"), time.perf_counter() - started, now
        )
        later((whole, keep_alive))

    def _assemble(
        self,
        entry: Entry,
        wire: bytes,
        method: str,
        keep_alive: bool,
        http_1_0: bool,
        now: float,
    ) -> bytes:
        age = now - entry.stored_at  # Entry.age, without the call
        parts = [wire, b"Age: %d\r\n" % (age if age > 0 else 0)]
        if _DATED not in wire:  # the origin's Date is kept, as the full path keeps it
            parts.append(self._date_line(now))
        if not keep_alive:
            parts.append(b"Connection: close\r\n")
        elif http_1_0:
            parts.append(b"Connection: keep-alive\r\n")
        parts.append(b"\r\n")
        if method == "GET":
            parts.append(entry.body)
        return b"".join(parts)

    def _date_line(self, now: float) -> bytes:
        second = int(now)
        if second != self._date_second:
            self._date_second = second
            self._date = b"Date: %s\r\n" % formatdate(second, usegmt=True).encode()
        return self._date


class FastPath(asyncio.Protocol):
    """One connection: hits answered here, everything else by ``inner`` (aiohttp's); a client
    that leaves answers unread for ``send_timeout`` seconds is cut off. ``hits`` None: every
    request is aiohttp's (the access log is on), only the cut-off is done here."""

    def __init__(self, inner: Any, hits: Hits | None, send_timeout: float | None = None) -> None:
        self._inner = inner
        self._hits = hits
        self._send_timeout = send_timeout
        self._unread: asyncio.TimerHandle | None = None  # while writes are paused
        self._transport: asyncio.Transport | None = None
        self._buffer = b""
        self._handed_over = hits is None  # aiohttp's for good
        self._waiting: bytes | None = None  # the head whose answer waits for L2
        self._writing_paused = False
        self._loop = asyncio.get_running_loop()
        self._later: Later = self._from_l2

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._unread is not None:
            self._unread.cancel()
            self._unread = None
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._writing_paused = True
        if self._send_timeout is not None and self._unread is None:
            self._unread = self._loop.call_later(self._send_timeout, self._cut_off)
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._unread is not None:
            self._unread.cancel()
            self._unread = None
        self._inner.resume_writing()

    def _cut_off(self) -> None:
        """The client read nothing of what waits for it for ``send_timeout``: it goes."""
        self._unread = None
        transport = self._transport
        if transport is not None and not transport.is_closing():
            logger.debug(
                "cut off %s: answers left unread for server.send_timeout (%gs)",
                transport.get_extra_info("peername"),
                self._send_timeout,
            )
            # A reset, not a close: a close would leave the kernel pushing what is buffered
            # to a peer that reads nothing, for minutes (nginx's reset_timedout_connection).
            sock = transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
            transport.abort()

    def eof_received(self) -> bool | None:
        result: bool | None = self._inner.eof_received()
        return result

    def data_received(self, data: bytes) -> None:
        if self._handed_over:
            self._inner.data_received(data)
            return
        buffer = self._buffer + data if self._buffer else data
        self._buffer = b""
        if self._waiting is not None:
            self._buffer = buffer  # after the request whose answer waits for L2
            return
        while buffer:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                # Too long, or ended by bare line feeds: aiohttp's to refuse, at once.
                if len(buffer) > MAX_HEAD or b"\n\n" in buffer:
                    self._hand_over(buffer)
                else:
                    self._buffer = buffer  # the rest of the head is on its way
                return
            head = buffer[:end]
            if _HANDED_OVER.search(head) is not None:
                self._hand_over(buffer)
                return
            hits = self._hits
            answer = hits.answer(head, self._later) if hits is not None and self._idle() else None
            if answer is None:
                self._inner.data_received(buffer[: end + 4])  # one whole head, no body
            elif answer is ASKED:
                # Answered once L2 has been asked; what comes meanwhile waits its turn.
                self._waiting = buffer[: end + 4]
                self._buffer = buffer[end + 4 :]
                self._busy()
                return
            else:
                self._send(*answer)
                if self._transport is None or self._transport.is_closing():
                    return
            buffer = buffer[end + 4 :]

    def _from_l2(self, answer: Answer | None) -> None:
        head, self._waiting = self._waiting, None
        transport = self._transport
        if transport is None or transport.is_closing() or head is None:
            return
        if answer is None:
            self._inner.data_received(head)  # not in L2 after all: the full path answers
        else:
            self._send(*answer)
            if transport.is_closing():
                return
        rest, self._buffer = self._buffer, b""
        if rest:
            self.data_received(rest)

    def _idle(self) -> bool:
        """Whether aiohttp waits for a request, with nothing of its own to answer first."""
        inner = self._inner
        waiter = inner._waiter
        return (
            not self._writing_paused
            and waiter is not None
            and not waiter.done()
            and not inner._messages
            and inner._payload_parser is None
        )

    def _send(self, answer: bytes, keep_alive: bool) -> None:
        transport = self._transport
        assert transport is not None
        transport.write(answer)
        if not keep_alive:
            transport.close()
            return
        self._busy()

    def _busy(self) -> None:
        """The connection is in use: aiohttp's idle timer must not count this as idle time."""
        if self._hits is not None:
            self._inner._next_keepalive_close_time = self._loop.time() + self._hits.idle_timeout

    def _hand_over(self, buffer: bytes) -> None:
        self._handed_over = True
        self._inner.data_received(buffer)
