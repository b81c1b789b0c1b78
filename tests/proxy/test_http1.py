"""proxy/http1.py against an origin that writes raw bytes: each answer framed as RFC 9112 says,
connections kept, retired and retried as a proxy in front of a real origin needs."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from multidict import CIMultiDict
from yarl import URL

from proxy.framing import AnswerError
from proxy.http1 import BodyFailed, ConnectFailed, Pool
from tests.proxy.conftest import MakeProxy

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"


@dataclass
class Close:
    """Write ``data``, then close the connection."""

    data: bytes = b""


@dataclass
class RawOrigin:
    """Answers the requests it reads with ``answers`` in turn: bytes, or ``Close``."""

    answers: list[bytes | Close]
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)
    url: str = ""
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            while self.answers:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                if b"\r\nTransfer-Encoding: chunked\r\n" in head:
                    self.requests.append(head + await reader.readuntil(b"0\r\n\r\n"))
                else:
                    self.requests.append(head + await reader.readexactly(length))
                answer = self.answers.pop(0)
                if isinstance(answer, Close):
                    writer.write(answer.data)
                    await writer.drain()
                    return
                writer.write(answer)
                await writer.drain()
            await reader.read()  # nothing more to answer: wait for the client to close
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def raw_origin(*answers: bytes | Close) -> AsyncIterator[RawOrigin]:
    origin = RawOrigin(list(answers))
    server = await asyncio.start_server(origin.serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    origin.url = f"http://127.0.0.1:{port}"
    try:
        yield origin
    finally:
        server.close()
        for writer in origin.writers:
            writer.close()
        await asyncio.sleep(0)


def pool_for(origin: RawOrigin, idle: float = 5.0) -> Pool:
    return Pool(URL(origin.url), idle=idle, max_idle=4, read_timeout=2.0)


async def get(
    pool: Pool,
    origin: RawOrigin,
    method: str = "GET",
    body: bytes | None = None,
    headers: CIMultiDict[str] | None = None,
) -> tuple[int, CIMultiDict[str], bytes]:
    answer = await pool.request(method, URL(f"{origin.url}/x?a=1"), headers or CIMultiDict(), body)
    try:
        data = await answer.read()
        assert data is not None
        return answer.status, CIMultiDict(answer.headers), data
    finally:
        answer.release()


async def test_a_body_longer_than_its_content_length_ends_at_its_length_on_a_new_connection() -> (
    None
):
    # What nginx and Varnish do: the bytes past the length are dropped, the connection too.
    async with raw_origin(OK + b"JUNK", OK) as origin:
        pool = pool_for(origin)
        assert (await get(pool, origin))[2] == b"hello"
        assert (await get(pool, origin))[2] == b"hello"
        assert origin.connections == 2
        pool.close()


async def test_keep_alive_answers_share_one_connection_and_the_request_is_sent_as_given() -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n"
    )
    async with raw_origin(chunked, OK) as origin:
        pool = pool_for(origin)
        status, headers, body = await get(pool, origin, headers=CIMultiDict({"X-A": "é"}))
        assert (status, body, "X-Trailer" in headers) == (200, b"hello world", False)
        assert (await get(pool, origin, "PUT", b"data"))[2] == b"hello"
        assert origin.connections == 1
        first, second = origin.requests
        port = URL(origin.url).port
        assert first == f"GET /x?a=1 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-A: é\r\n\r\n".encode()
        assert second.endswith(b"Content-Length: 4\r\n\r\ndata")
        pool.close()


async def test_an_answer_without_a_length_ends_when_the_origin_closes() -> None:
    async with raw_origin(Close(b"HTTP/1.1 200 OK\r\n\r\nall of it"), OK) as origin:
        pool = pool_for(origin)
        assert (await get(pool, origin))[2] == b"all of it"
        assert (await get(pool, origin))[2] == b"hello"
        assert origin.connections == 2
        pool.close()


async def test_interim_answers_are_skipped_and_folded_headers_joined() -> None:
    answer = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nX-Long: one\r\n two\r\nContent-Length: 2\r\n\r\nok"
    )
    async with raw_origin(answer) as origin:
        pool = pool_for(origin)
        status, headers, body = await get(pool, origin)
        assert (status, headers["X-Long"], body) == (200, "one two", b"ok")
        pool.close()


@pytest.mark.parametrize("status", [204, 304])
async def test_no_body_after_a_head_request_or_a_204_or_304(status: int) -> None:
    no_body = f"HTTP/1.1 {status} X\r\nContent-Length: 5\r\n\r\n".encode()
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
    async with raw_origin(no_body, head, OK) as origin:
        pool = pool_for(origin)
        assert await get(pool, origin) == (status, CIMultiDict({"Content-Length": "5"}), b"")
        assert (await get(pool, origin, "HEAD"))[2] == b""
        assert (await get(pool, origin))[2] == b"hello"  # the connection was left clean
        assert origin.connections == 1
        pool.close()


async def test_a_reused_connection_the_origin_closed_is_retried_for_an_idempotent_method() -> None:
    # The origin reads the second request and closes without answering, as a server does
    # whose keep-alive timeout ran out just as the request came.
    async with raw_origin(OK, Close(), OK) as origin:
        pool = pool_for(origin)
        await get(pool, origin)
        assert (await get(pool, origin))[2] == b"hello"
        assert origin.connections == 2
        pool.close()
    async with raw_origin(OK, Close(), OK) as origin:
        pool = pool_for(origin)
        await get(pool, origin)
        with pytest.raises(AnswerError, match="closed the connection without answering"):
            await get(pool, origin, "POST", b"x")  # it may have been acted on: never resent
        pool.close()


async def test_a_connection_idle_past_the_keepalive_timeout_is_not_reused() -> None:
    async with raw_origin(OK, OK) as origin:
        pool = pool_for(origin, idle=0.05)
        await get(pool, origin)
        await asyncio.sleep(0.1)
        await get(pool, origin)
        assert origin.connections == 2
        pool.close()


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (b"garbage\r\n\r\n", "not an HTTP/1.1 status line: b'garbage'"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2, 3\r\n\r\nok", "invalid Content-Length: '2, 3'"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "invalid Content-Length: '-1'"),
        (b"HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n", "not a header line"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "not hexadecimal"),
        (Close(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nhello"), "4 bytes before the end"),
        (Close(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"), "before its last chunk"),
        (Close(b"HTTP/1.1 200 OK\r\n"), "inside its answer's head"),
        (b"HTTP/1.1 101 Switching Protocols\r\n\r\n", "switched protocols"),
        (b"HTTP/1.1 200 OK\r\nX: a\nSet-Cookie: evil=1\r\n\r\n", "bare CR, LF or NUL"),
        (b"HTTP/1.1 200 OK\r\nX: a\rSet-Cookie: evil=1\r\n\r\n", "bare CR, LF or NUL"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: \xc2\xb2\r\n\r\n", "invalid Content-Length"),
    ],
)
async def test_what_is_not_an_answer_is_an_error_that_names_it(
    answer: bytes | Close, error: str
) -> None:
    async with raw_origin(answer) as origin:
        pool = pool_for(origin)
        with pytest.raises(AnswerError, match=error.replace("(", r"\(").replace(")", r"\)")):
            await get(pool, origin)
        pool.close()


async def test_a_line_break_in_a_header_is_refused_before_anything_is_sent() -> None:
    async with raw_origin(OK) as origin:
        pool = pool_for(origin)
        with pytest.raises(ValueError, match="line break"):
            await get(pool, origin, headers=CIMultiDict({"X-A": "1\r\nX-Injected: 1"}))
        assert origin.connections == 0
        pool.close()


async def test_no_connection_names_the_address() -> None:
    async with raw_origin() as origin:
        url = origin.url
    pool = Pool(URL(url), idle=1.0, max_idle=1, read_timeout=1.0)
    with pytest.raises(ConnectFailed, match=f"cannot connect to {URL(url).host}:{URL(url).port}"):
        await pool.request("GET", URL(url), CIMultiDict(), None)


async def test_a_large_answer_streams_whole_through_paused_reads() -> None:
    size = 5 << 20
    async with raw_origin(
        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + b"x" * size
    ) as o:
        pool = pool_for(o)
        answer = await pool.request("GET", URL(o.url), CIMultiDict(), None)
        assert await answer.read(1 << 10) is None  # longer than the limit: left to stream
        received = 0
        async for chunk in answer.iter_any():
            received += len(chunk)
            await asyncio.sleep(0)
        answer.release()
        assert received == size
        pool.close()


async def pieces(*chunks: bytes, fail: bool = False) -> AsyncIterator[bytes]:
    for chunk in chunks:
        await asyncio.sleep(0)
        yield chunk
    if fail:
        raise OSError("the client went away")


@pytest.mark.parametrize(
    ("length", "sent"),
    [
        (None, b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"),
        (5, b"Content-Length: 5\r\n\r\nabcde"),
    ],
)
async def test_a_body_given_in_pieces_is_sent_as_it_comes(length: int | None, sent: bytes) -> None:
    async with raw_origin(OK) as origin:
        pool = pool_for(origin)
        answer = await pool.request(
            "POST", URL(origin.url), CIMultiDict(), pieces(b"abc", b"de"), length=length
        )
        assert (answer.status, await answer.read()) == (200, b"hello")
        answer.release()
        assert origin.requests[0].endswith(sent)
        pool.close()


async def test_a_body_that_fails_while_sent_is_body_failed_and_the_connection_closed() -> None:
    async with raw_origin(OK) as origin:
        pool = pool_for(origin)
        with pytest.raises(BodyFailed, match="the client went away") as failed:
            await pool.request("PUT", URL(origin.url), CIMultiDict(), pieces(b"ab", fail=True))
        assert isinstance(failed.value.__cause__, OSError)
        pool.close()


async def test_an_answer_before_the_whole_body_ends_the_sending() -> None:
    early = b"HTTP/1.1 413 Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"

    async def endless() -> AsyncIterator[bytes]:
        while True:
            await asyncio.sleep(0.01)
            yield b"x" * 1024

    writers = []

    async def answer_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        await reader.readuntil(b"\r\n\r\n")
        writer.write(early)
        await writer.drain()
        await reader.read(4096)
        writer.close()

    server = await asyncio.start_server(answer_at_once, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    pool = Pool(URL(url), idle=1.0, max_idle=1, read_timeout=1.0)
    answer = await pool.request("PUT", URL(url), CIMultiDict(), endless())
    assert answer.status == 413
    sending = answer.sending
    answer.release()
    await asyncio.sleep(0)
    assert sending is not None
    assert sending.cancelled()
    server.close()
    for writer in writers:
        writer.close()
    await asyncio.sleep(0)


async def test_a_connection_left_with_its_reading_paused_is_not_reused() -> None:
    size = 1 << 20  # all of it queued at once: reading pauses as the answer ends
    big = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + b"x" * size
    async with raw_origin(big, OK) as origin:
        pool = pool_for(origin)
        answer = await pool.request("GET", URL(origin.url), CIMultiDict(), None)
        assert await answer.read(1 << 10) is None  # too long: left to stream, then given up
        await asyncio.sleep(0.2)
        answer.release()
        assert (await get(pool, origin))[2] == b"hello"
        assert origin.connections == 2
        pool.close()


async def test_an_answer_cut_by_a_failed_request_body_is_an_error_not_a_whole_answer() -> None:
    writers = []

    async def early(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\n\r\npartial-")  # ends only when it closes
        await writer.drain()
        await reader.read()

    async def failing() -> AsyncIterator[bytes]:
        yield b"ab"
        await asyncio.sleep(0.05)
        raise OSError("the client went away")

    server = await asyncio.start_server(early, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    pool = Pool(URL(url), idle=1.0, max_idle=1, read_timeout=1.0)
    answer = await pool.request("POST", URL(url), CIMultiDict(), failing())
    with pytest.raises(AnswerError, match="closed before the answer ended"):
        await answer.read()
    answer.release()
    server.close()
    for writer in writers:
        writer.close()
    await asyncio.sleep(0)


async def test_credentials_in_the_origin_url_are_sent_unless_the_request_has_its_own() -> None:
    async with raw_origin(OK, OK) as origin:
        with_user = origin.url.replace("http://", "http://user:secret@")
        pool = Pool(URL(with_user), idle=5.0, max_idle=1, read_timeout=1.0)
        await get(pool, origin)
        await get(pool, origin, headers=CIMultiDict({"Authorization": "Bearer own"}))
        first, second = origin.requests
        assert b"Authorization: Basic dXNlcjpzZWNyZXQ=\r\n" in first
        assert second.count(b"Authorization") == 1
        assert b"Authorization: Bearer own\r\n" in second
        pool.close()


async def test_the_proxy_keeps_an_answer_longer_than_its_content_length_cut_at_its_length(
    make_proxy: MakeProxy,
) -> None:
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nCache-Control: max-age=60\r\n\r\nhello"
    async with raw_origin(answer + b"JUNK", answer) as origin:
        proxy = await make_proxy(upstream=origin.url)
        first = await proxy.get("/users/1")
        assert (first.status, await first.read(), first.headers["X-Cache"]) == (
            200,
            b"hello",
            "MISS",
        )
        again = await proxy.get("/users/1")
        assert (await again.read(), again.headers["X-Cache"]) == (b"hello", "HIT-L1")
        assert len(origin.requests) == 1


async def test_header_names_are_one_object_for_every_answer() -> None:
    # L1 counts an entry's header names as shared between entries (Entry.size).
    answer = b"HTTP/1.1 200 OK\r\nX-Shared-Name: 1\r\nContent-Length: 0\r\n\r\n"
    async with raw_origin(answer, answer) as origin:
        pool = pool_for(origin)
        first = (await get(pool, origin))[1]
        second = (await get(pool, origin))[1]
        names = [
            next(name for name in headers if name == "X-Shared-Name") for headers in (first, second)
        ]
        assert names[0] is names[1]
        pool.close()


async def test_a_slot_given_up_mid_answer_is_freed_once_its_socket_is_closed() -> None:
    # A request let through at once could reach the origin before the origin sees the one
    # given up end: upstream.max_connections would be one over, for the origin.
    async with raw_origin(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf", OK) as origin:
        pool = pool_for(origin)
        answer = await pool.request("GET", URL(origin.url), CIMultiDict(), None)
        freed: list[str] = []
        answer.release()  # given up before its end
        pool.after_closed(lambda: freed.append("slot"))
        assert freed == []
        for _ in range(5):
            await asyncio.sleep(0)
        assert freed == ["slot"]
        pool.after_closed(lambda: freed.append("at once"))  # nothing closing: at once
        assert freed == ["slot", "at once"]
        pool.close()
