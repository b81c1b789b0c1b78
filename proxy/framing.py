"""An origin's answer as it arrives on a connection, framed as RFC 9112 §6.3 says: the head
(status, reason, headers, 1xx heads skipped), then the body by Content-Length, chunks, or until
the connection closes; what is not an answer is an ``AnswerError`` naming what was wrong.

The connection that carries it (``proxy.http1``) feeds it bytes (``feed``) and tells it when it
closed (``ended``) or was closed (``cut``); the consumer reads the head, then the body whole
(``read``) or in pieces (``iter_any``), and ``release``s it.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import AsyncIterator
from typing import Final, Protocol

from multidict import CIMultiDict, CIMultiDictProxy, istr

from proxy.errors import ProxyError

logger = logging.getLogger("cachecar.proxy")

MAX_HEAD: Final = 64 * 1024  # bytes of an answer's head, 1xx heads included
_MAX_LINE: Final = 4096  # bytes of a chunk-size or trailer line
_PAUSE_AT: Final = 1 << 20  # bytes queued by a streamed answer before reading pauses
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


class Unanswered(AnswerError):
    """The connection closed before one byte of the answer came."""


class Carrier(Protocol):
    """The connection an answer arrives on (``proxy.http1``'s)."""

    answer: Answer | None
    transport: asyncio.Transport | None

    def idle(self) -> None:
        """The answer ended cleanly and the connection may carry another."""

    def close(self, outstanding: bool = False) -> None:
        """Closed, the answer (if any) cut off."""


class Answer:
    """One answer, read as it arrives: the head first (``status``, ``reason``, ``headers``),
    then the body, whole (``read``) or in pieces (``iter_any``). ``release`` gives the
    connection back when the answer ended cleanly and the origin keeps it open; else closes it."""

    def __init__(self, connection: Carrier, head_only: bool, read_timeout: float) -> None:
        self.status = 0
        self.reason = ""
        self.headers: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())
        self.length: int | None = None  # the body's length, where the head says it
        self.keep_alive = True
        self.received = False  # a byte of the answer came
        self._connection: Carrier | None = connection
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
            self._fail(Unanswered("the origin closed the connection without answering"))
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
