"""HTTP/1.1 to the origin: keep-alive connections on an asyncio protocol, each answer framed as
RFC 9112 §6.3 says, a request body sent whole or as it comes.

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
              AnswerError (what came is not an answer, or broke off)
"""

from __future__ import annotations

import asyncio
import base64
import collections
import logging
import ssl
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from typing import Final, TypeVar, cast

from multidict import CIMultiDict, CIMultiDictProxy, istr
from yarl import URL

from proxy.errors import ProxyError

logger = logging.getLogger("cachecar.proxy")

T = TypeVar("T")

MAX_HEAD: Final = 64 * 1024  # bytes of an answer's head, 1xx heads included
_MAX_LINE: Final = 4096  # bytes of a chunk-size or trailer line
_PAUSE_AT: Final = 1 << 20  # bytes queued by a streamed answer before reading pauses
_IDEMPOTENT: Final = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS", "TRACE"})
_WITH_BODY: Final = frozenset({"POST", "PUT", "PATCH"})
_HEX: Final = frozenset(b"0123456789abcdefABCDEF")
_TOKEN: Final = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
# Header names as one object each, shared by every answer (and so every stored entry) that has
# them: L1 counts an entry's header names as shared (``Entry.size``). ``istr``: a multidict keeps
# an istr key as it is, where it makes a new one of a str. Bounded: an origin that makes up
# names gets fresh strings past this many.
_NAMES: dict[bytes, istr] = {}
_MAX_NAMES: Final = 4096

# What is being read of an answer.
_HEAD, _LENGTH, _UNTIL_CLOSE, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILERS, _DONE = range(8)


class AnswerError(ProxyError):
    """What the origin sent is not an HTTP/1.1 answer, or it broke off; the message says which."""


class ConnectFailed(AnswerError):
    """No connection to the origin."""


class _Unanswered(AnswerError):
    """The connection closed before one byte of the answer came."""


class BodyFailed(AnswerError):
    """The request body being sent failed on the sender's side; its cause says how."""


class Answer:
    """One answer, read as it arrives: the head first (``status``, ``reason``, ``headers``),
    then the body, whole (``read``) or in pieces (``iter_any``). ``release`` gives the
    connection back when the answer ended cleanly and the origin keeps it open; else closes it."""

    def __init__(self, connection: _Connection, head_only: bool, read_timeout: float) -> None:
        self.status = 0
        self.reason = ""
        self.headers: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())
        self.length: int | None = None  # the body's length, where the head says it
        self.keep_alive = True
        self.received = False  # a byte of the answer came
        self._connection: _Connection | None = connection
        self._head_only = head_only
        self._read_timeout = read_timeout
        self._buffer = bytearray()
        self._state = _HEAD
        self._remaining = 0
        self._chunks: collections.deque[bytes] = collections.deque()
        self._queued = 0
        self._streamed = False
        self._paused = False
        self._error: AnswerError | None = None
        self.sending: asyncio.Task[None] | None = None  # a request body still being sent
        self._waiter: asyncio.Future[None] | None = None
        self.head_read: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # -- the consumer's side

    async def head(self) -> None:
        await self.head_read

    async def read(self, limit: int | None = None) -> bytes | None:
        """The whole body; None once it is known to be longer than ``limit``: what was read of
        it stays queued for ``iter_any``, and reading pauses while much of it is queued."""
        while limit is None or (self._queued <= limit and (self.length or 0) <= limit):
            if self._state == _DONE:
                body = b"".join(self._chunks)
                self._chunks.clear()
                self._queued = 0
                return body
            if self._error is not None:
                raise self._error
            await self._wait()
        self._streamed = True
        self._deliver(b"")
        return None

    async def iter_any(self) -> AsyncIterator[bytes]:
        """The body in the pieces it came in; a pause longer than the read timeout is a
        ``TimeoutError``."""
        self._streamed = True
        while True:
            if self._chunks:
                chunk = self._chunks.popleft()
                self._queued -= len(chunk)
                if self._paused and self._queued < _PAUSE_AT // 2:
                    self._resume()
                yield chunk
            elif self._state == _DONE:
                return
            elif self._error is not None:
                raise self._error
            else:
                async with asyncio.timeout(self._read_timeout):
                    await self._wait()

    def release(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        connection.answer = None
        if not self.head_read.done():
            self.head_read.cancel()
        elif not self.head_read.cancelled():
            self.head_read.exception()  # seen: nobody is to be told of it any more
        sending, self.sending = self.sending, None
        if sending is not None and not sending.done():
            sending.cancel()  # answered before the whole body went: it will not be read
            self.keep_alive = False
        elif sending is not None and not sending.cancelled():
            sending.exception()  # seen: the answer says what the origin made of it
        if (
            self._state == _DONE
            and self._error is None
            and self.keep_alive
            and not self._paused  # a connection that reads nothing is no use to the next
        ):
            connection.idle()
        else:
            connection.close(outstanding=self._state != _DONE)

    async def _wait(self) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _resume(self) -> None:
        self._paused = False
        if self._connection is not None and self._connection.transport is not None:
            self._connection.transport.resume_reading()

    # -- the connection's side

    def feed(self, data: bytes) -> None:
        self.received = True
        self._buffer += data
        try:
            self._advance()
        except AnswerError as exc:
            self._fail(exc)
            if self._connection is not None:
                self._connection.close()

    def ended(self, exc: Exception | None) -> None:
        """The connection closed (``exc``: why, when it was not a clean close)."""
        if self._state == _DONE:
            return
        if self._state == _UNTIL_CLOSE:
            if exc is None:
                self._finish()
            else:
                self._fail(AnswerError(f"the connection broke off inside the answer: {exc}"))
            return
        if not self.received:
            self._fail(_Unanswered("the origin closed the connection without answering"))
        elif self._state == _HEAD:
            self._fail(AnswerError("the origin closed the connection inside its answer's head"))
        elif self._state == _LENGTH:
            self._fail(
                AnswerError(
                    f"the origin closed the connection {self._remaining} bytes before the end "
                    f"its Content-Length ({self.length}) gives"
                )
            )
        else:
            self._fail(AnswerError("the origin closed the connection before its last chunk"))

    def cut(self) -> None:
        """cachecar closes the connection: what is still to come of the answer never will."""
        self._fail(AnswerError("the connection was closed before the answer ended"))

    def _fail(self, error: AnswerError) -> None:
        if self._error is not None or self._state == _DONE:
            return
        self._error = error
        if not self.head_read.done():
            self.head_read.set_exception(error)
        self._wake()

    def _finish(self) -> None:
        self._state = _DONE
        if not self.head_read.done():
            self.head_read.set_result(None)
        self._wake()

    def _deliver(self, chunk: bytes) -> None:
        if chunk:
            self._chunks.append(chunk)
            self._queued += len(chunk)
        if self._streamed and not self._paused and self._queued >= _PAUSE_AT:
            connection = self._connection
            if connection is not None and connection.transport is not None:
                self._paused = True
                connection.transport.pause_reading()
        self._wake()

    def _take(self, size: int) -> None:
        """Up to ``size`` bytes of the buffer to the body, counted off ``_remaining``."""
        buffer = self._buffer
        if len(buffer) <= size:
            chunk = bytes(buffer)
            buffer.clear()
        else:
            chunk = bytes(buffer[:size])
            del buffer[:size]
        self._remaining -= len(chunk)
        if chunk:
            self._deliver(chunk)

    def _advance(self) -> None:
        buffer = self._buffer
        while True:
            state = self._state
            if state == _HEAD:
                end = buffer.find(b"\r\n\r\n")
                if end < 0:
                    if len(buffer) > MAX_HEAD:
                        raise AnswerError(f"the answer's head is longer than {MAX_HEAD} bytes")
                    return
                head = bytes(buffer[:end])
                del buffer[: end + 4]
                self._read_head(head)
            elif state == _LENGTH:
                if not buffer:
                    return
                self._take(self._remaining)
                if self._remaining == 0:
                    self._finish()
            elif state == _UNTIL_CLOSE:
                if buffer:
                    self._remaining = len(buffer)
                    self._take(len(buffer))
                return
            elif state == _CHUNK_DATA:
                if not buffer:
                    return
                self._take(self._remaining)
                if self._remaining == 0:
                    self._state = _CHUNK_END
            elif state == _CHUNK_END:
                if len(buffer) < 2:
                    return
                if buffer[:2] != b"\r\n":
                    raise AnswerError("a chunk longer than its size line says")
                del buffer[:2]
                self._state = _CHUNK_SIZE
            elif state in (_CHUNK_SIZE, _TRAILERS):
                line = self._line()
                if line is None:
                    return
                if state == _TRAILERS:
                    if not line:  # the empty line that ends the trailers (which are dropped)
                        self._finish()
                    continue
                size = line.split(b";", 1)[0].strip(b" \t")
                if not size or not _HEX.issuperset(size):
                    raise AnswerError(f"a chunk size that is not hexadecimal: {line[:40]!r}")
                self._remaining = int(size, 16)
                self._state = _CHUNK_DATA if self._remaining else _TRAILERS
            else:  # _DONE
                if buffer:
                    # More than the answer's framing says (a body longer than its
                    # Content-Length): dropped, and the connection is not reused.
                    logger.warning(
                        "the origin sent %d bytes past the end of its answer (status %d); "
                        "they are dropped and the connection closed",
                        len(buffer),
                        self.status,
                    )
                    buffer.clear()
                    self.keep_alive = False
                return

    def _line(self) -> bytes | None:
        end = self._buffer.find(b"\r\n")
        if end < 0:
            if len(self._buffer) > _MAX_LINE:
                raise AnswerError(f"a chunk-size or trailer line longer than {_MAX_LINE} bytes")
            return None
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 2]
        return line

    def _read_head(self, head: bytes) -> None:
        breaks = head.count(b"\r\n")
        if head.count(b"\r") != breaks or head.count(b"\n") != breaks or b"\x00" in head:
            # Stored and written to every client on a hit, it would split their answers.
            raise AnswerError("a bare CR, LF or NUL in the answer's head")
        lines = head.split(b"\r\n")
        status_line = lines[0]
        version, _, rest = status_line.partition(b" ")
        code, _, reason = rest.partition(b" ")
        if version not in (b"HTTP/1.1", b"HTTP/1.0") or len(code) != 3 or not code.isdigit():
            raise AnswerError(f"not an HTTP/1.1 status line: {status_line[:80]!r}")
        status = int(code)
        if 100 <= status < 200:
            if status == 101:
                raise AnswerError("the origin switched protocols (101): cachecar relays HTTP only")
            return  # an interim answer: the final one follows
        headers: CIMultiDict[str] = CIMultiDict()
        name: str = ""
        value = b""
        for line in lines[1:]:
            if line[:1] in (b" ", b"\t"):  # obs-fold: replaced by a space (RFC 9112 §5.2)
                if not name:
                    raise AnswerError("the answer's first header line is a continuation")
                value += b" " + line.strip(b" \t")
                continue
            if name:
                headers.add(name, value.decode("utf-8", "surrogateescape"))
            raw_name, colon, raw_value = line.partition(b":")
            if not colon or not raw_name or raw_name.translate(None, _TOKEN):
                raise AnswerError(f"not a header line: {line[:80]!r}")
            name = _NAMES.get(raw_name) or _name(raw_name)
            value = raw_value.strip(b" \t")
        if name:
            headers.add(name, value.decode("utf-8", "surrogateescape"))
        self.status = status
        self.reason = reason.decode("latin-1")
        self.headers = CIMultiDictProxy(headers)
        self._frame(version, headers)
        if not self.head_read.done():
            self.head_read.set_result(None)

    def _frame(self, version: bytes, headers: CIMultiDict[str]) -> None:
        """How the body ends, as RFC 9112 §6.3 says, and whether the connection is kept."""
        options = _tokens(headers, "Connection")
        if "close" in options or (version == b"HTTP/1.0" and "keep-alive" not in options):
            self.keep_alive = False
        if self._head_only or self.status in (204, 304):
            self.length = 0
            self._finish()
            return
        codings = _tokens(headers, "Transfer-Encoding")
        if codings:
            if "Content-Length" in headers:
                self.keep_alive = False  # both framings: the connection may not be reused
            if codings[-1] == "chunked":
                self._state = _CHUNK_SIZE
            else:
                self._state = _UNTIL_CLOSE
                self.keep_alive = False
            return
        lengths = {
            v.strip() for raw in headers.getall("Content-Length", ()) for v in raw.split(",")
        }
        if not lengths:
            self._state = _UNTIL_CLOSE
            self.keep_alive = False
            return
        length = lengths.pop()
        if lengths or not (length.isascii() and length.isdigit()):
            raise AnswerError(
                f"an invalid Content-Length: {', '.join(headers.getall('Content-Length'))!r}"
            )
        self.length = self._remaining = int(length)
        if self._remaining:
            self._state = _LENGTH
        else:
            self._finish()


def _name(raw: bytes) -> istr:
    name = istr(raw.decode("latin-1"))
    if len(_NAMES) < _MAX_NAMES:
        _NAMES[raw] = name
    return name


def _tokens(headers: CIMultiDict[str], name: str) -> list[str]:
    """A list-valued header's members, lowercased, in order."""
    return [t for v in headers.getall(name, ()) for t in v.lower().replace(" ", "").split(",") if t]


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
            except _Unanswered:
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
