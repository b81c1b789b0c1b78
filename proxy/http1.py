"""HTTP/1.1 to the origin: keep-alive connections on an asyncio protocol, a request body sent
whole or as it comes; each answer framed as RFC 9112 §6.3 says (``proxy.framing``).

Why not aiohttp's client:
- An answer with more bytes than its ``Content-Length`` fails there as a whole (its parser
  takes the rest for a next answer). Here the answer ends at its length, and the connection is
  closed instead of reused, as nginx and Varnish do.
- A pooled connection that the origin closes as it is reused (Node closes idle connections
  after 5 s) failed the request. Here idle connections are retired after ``idle`` seconds, and
  a request whose reused connection closed before one byte of the answer came is sent once
  more on a new connection, when its method is idempotent (RFC 9110 §9.2.2).
- The cost of a miss: one request is one write and a head parsed with ``bytes.split``.

    Pool.request -> Answer (head read) -> Answer.read / Answer.iter_any -> Answer.release
    failures: ConnectFailed (no connection), BodyFailed (the request body's sender failed),
              AnswerError (``proxy.framing``: what came is not an answer, or broke off)
"""

from __future__ import annotations

import asyncio
import base64
import ssl
import time
from collections.abc import AsyncIterable, Awaitable, Callable
from typing import Final, TypeVar, cast

from multidict import CIMultiDict
from yarl import URL

from proxy.framing import Answer, AnswerError, Unanswered

T = TypeVar("T")

_IDEMPOTENT: Final = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS", "TRACE"})
_WITH_BODY: Final = frozenset({"POST", "PUT", "PATCH"})


class ConnectFailed(AnswerError):
    """No connection to the origin."""


class BodyFailed(AnswerError):
    """The request body being sent failed on the sender's side; its cause says how."""


class _Connection(asyncio.Protocol):
    def __init__(self, pool: Pool) -> None:
        self._pool = pool
        self.transport: asyncio.Transport | None = None
        self.answer: Answer | None = None
        self.closed = False
        self.lost = False  # connection_lost has been called: the socket is closed
        self.reused = False
        self.idle_since = 0.0
        self._writable: asyncio.Future[None] | None = None  # while the transport is full

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        if self.answer is None:  # bytes nobody asked for, on an idle connection
            self.close()
            return
        self.answer.feed(data)

    def eof_received(self) -> bool:
        return False  # the transport closes itself: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.lost = True
        self.resume_writing()
        if self.answer is not None:
            self.answer.ended(exc)
        self._pool.lost(self)

    def pause_writing(self) -> None:
        if self._writable is None:
            self._writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        writable, self._writable = self._writable, None
        if writable is not None and not writable.done():
            writable.set_result(None)

    async def write(self, data: bytes) -> None:
        """``data`` written once the transport takes more (a request body's piece)."""
        if self._writable is not None:
            await self._writable
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    def send(self, data: bytes, answer: Answer) -> None:
        assert self.transport is not None
        self.answer = answer
        self.transport.write(data)

    def idle(self) -> None:
        self._pool.put(self)

    def close(self, outstanding: bool = False) -> None:
        """Closed by cachecar: an answer still coming is cut off, never taken as whole.
        ``outstanding``: its request was not answered in full (the answer, if any, detached)."""
        self.closed = True
        if self.answer is not None:
            self.answer.cut()
            outstanding = True
        if self.transport is not None and not self.lost:
            if outstanding:
                self._pool.closing(self)  # the origin may still be at work on its request
            self.transport.abort()


class Pool:
    """Keep-alive connections to one origin, most recently used first; one idle longer than
    ``idle`` seconds is closed instead of reused."""

    def __init__(self, base: URL, *, idle: float, max_idle: int, read_timeout: float) -> None:
        if base.scheme not in ("http", "https") or not base.raw_host:
            raise ValueError(f"{base} is not an http:// or https:// URL with a host")
        self._host = base.raw_host
        self._port = base.port or (443 if base.scheme == "https" else 80)
        self._ssl: ssl.SSLContext | None = (
            ssl.create_default_context() if base.scheme == "https" else None
        )
        authority = base.raw_authority.rpartition("@")[2]
        # Credentials in the URL: sent as Basic authentication, unless the request has its own.
        self._auth = ""
        if base.raw_user is not None:
            userinfo = f"{base.user or ''}:{base.password or ''}".encode()
            self._auth = f"Authorization: Basic {base64.b64encode(userinfo).decode('ascii')}\r\n"
        self._fixed = f" HTTP/1.1\r\nHost: {authority}\r\n"
        self._idle_for = idle
        self._max_idle = max_idle
        self._read_timeout = read_timeout
        self._idle: list[_Connection] = []
        # Closed by cachecar with a request outstanding, until their sockets are closed (the
        # next round of the loop): a slot freed meanwhile waits (``after_closed``).
        self._closing: set[_Connection] = set()
        self._after: list[Callable[[], None]] = []
        self.address = f"{self._host}:{self._port}"

    async def request(
        self,
        method: str,
        url: URL,
        headers: CIMultiDict[str],
        body: bytes | AsyncIterable[bytes] | None,
        *,
        length: int | None = None,
        wait: float | None = None,
    ) -> Answer:
        """The answer, its head read; the caller ``release``s it. A body given as pieces is
        sent as they come, with ``length`` as its Content-Length, else chunked. ``wait``: the
        most seconds to wait for a connection, and for the head once the body is sent."""
        pieces = None if body is None or isinstance(body, bytes) else body
        whole = body if isinstance(body, bytes) else None
        data = self._message(method, url.raw_path_qs, headers, whole, pieces is not None, length)
        again = method in _IDEMPOTENT and pieces is None  # a body sent as it came: not twice
        while True:
            connection = self._take()
            if connection is None:
                connection = await _within(wait, self._connect())
            answer = Answer(connection, method == "HEAD", self._read_timeout)
            connection.send(data, answer)
            try:
                if pieces is not None:
                    answer.sending = asyncio.ensure_future(
                        _send(connection, pieces, chunked=length is None)
                    )
                    await _sent(answer, answer.sending)
                await _within(wait, answer.head())
            except Unanswered:
                answer.release()
                if not connection.reused or not again:
                    raise
                again = False  # the origin closed it as it was reused: once more, on a new one
                continue
            except BaseException:
                answer.release()
                raise
            return answer

    def after_closed(self, then: Callable[[], None]) -> None:
        """``then()`` once no connection closed with a request outstanding is still open: a
        request let through then cannot reach the origin before the origin sees the one given
        up end (a slot of ``upstream.max_connections`` is freed this way)."""
        if self._closing:
            self._after.append(then)
        else:
            then()

    def closing(self, connection: _Connection) -> None:
        self._closing.add(connection)

    def lost(self, connection: _Connection) -> None:
        self._closing.discard(connection)
        if not self._closing and self._after:
            after, self._after = self._after, []
            for then in after:
                then()

    def put(self, connection: _Connection) -> None:
        now = time.monotonic()
        idle = self._idle
        while idle and (idle[0].closed or now - idle[0].idle_since > self._idle_for):
            idle.pop(0).close()
        if connection.closed or len(idle) >= self._max_idle:
            connection.close()
            return
        connection.reused = True
        connection.idle_since = now
        idle.append(connection)

    def close(self) -> None:
        for connection in self._idle:
            connection.close()
        self._idle.clear()

    def _take(self) -> _Connection | None:
        now = time.monotonic()
        idle = self._idle
        while idle:
            connection = idle.pop()
            if not connection.closed and now - connection.idle_since <= self._idle_for:
                return connection
            connection.close()
        return None

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            _, connection = await loop.create_connection(
                lambda: _Connection(self),
                self._host,
                self._port,
                ssl=self._ssl,
                server_hostname=self._host if self._ssl else None,
            )
        except OSError as exc:
            if isinstance(exc, TimeoutError):
                raise
            raise ConnectFailed(f"cannot connect to {self.address}: {exc}") from exc
        return connection

    def _message(
        self,
        method: str,
        target: str,
        headers: CIMultiDict[str],
        body: bytes | None,
        streamed: bool,
        length: int | None,
    ) -> bytes:
        parts = [method, " ", target, self._fixed]
        lines = self._fixed.count("\n") + len(headers) + 1  # the fixed ones, these, the end
        if self._auth and "Authorization" not in headers:
            parts.append(self._auth)
            lines += 1
        for name, value in headers.items():
            parts += (name, ": ", value, "\r\n")
        if streamed and length is None:
            parts.append("Transfer-Encoding: chunked\r\n")
            lines += 1
        elif streamed or body is not None or method in _WITH_BODY:
            size = length if streamed else len(body or b"")
            parts += ("Content-Length: ", str(size), "\r\n")
            lines += 1
        parts.append("\r\n")
        text = "".join(parts)
        if text.count("\n") != lines or text.count("\r") != lines:
            raise ValueError(f"a line break inside a header to the origin: {text[:200]!r}")
        head = text.encode("utf-8", "surrogateescape")
        return head + body if body else head


async def _within(seconds: float | None, awaited: Awaitable[T]) -> T:
    """``await awaited``, a ``TimeoutError`` after ``seconds``; None: as long as it takes,
    without a timeout's cost (most requests: the caller's deadline bounds them)."""
    if seconds is None:
        return await awaited
    async with asyncio.timeout(seconds):
        return await awaited


async def _send(connection: _Connection, body: AsyncIterable[bytes], *, chunked: bool) -> None:
    """``body`` written to ``connection`` as it comes; a failure of the body is ``BodyFailed``
    (the connection is then closed: the origin has part of a request)."""
    try:
        async for piece in body:
            if connection.closed:
                return  # the origin closed it: its answer, or its silence, says the rest
            if piece:
                await connection.write(b"%x\r\n%b\r\n" % (len(piece), piece) if chunked else piece)
        if chunked:
            await connection.write(b"0\r\n\r\n")
    except Exception as exc:
        connection.close()
        raise BodyFailed(f"the request body failed while it was sent: {exc}") from exc


async def _sent(answer: Answer, sending: asyncio.Task[None]) -> None:
    """Until the body is sent, or the origin answers first (then the rest is not sent)."""
    await asyncio.wait((sending, answer.head_read), return_when=asyncio.FIRST_COMPLETED)
    if sending.done():
        sending.result()  # BodyFailed
