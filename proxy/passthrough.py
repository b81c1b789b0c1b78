"""Requests cachecar does not answer itself, sent on to the origin and their answers back.

Slow clients must not hold the ``upstream.max_connections`` origin connections, so what is
small is held whole in between (``HELD_WHOLE``, by Content-Length), the rest streamed:

    request body <= HELD_WHOLE -> read whole first, then an origin connection is taken
                 larger, or chunked -> streamed to the origin as it arrives
      either way cut off past server.max_body (413), after a pause longer than
      server.body_timeout or once server.body_deadline has passed since the head (408; a
      streamed one's origin connection is closed, not reused: it holds part of a request)
    answer <= HELD_WHOLE -> read whole, the origin connection given back, then written
           larger, or without a length (it may be a stream of events) -> relayed as it comes;
      a client that leaves it unread for server.send_timeout is cut off (``proxy.fastpath``),
      and the relay's origin connection is closed with it

Who failed is kept apart: a client whose body broke off is ``ClientGone`` (counted 499), never
the origin's failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import NamedTuple

import aiohttp
from aiohttp import web
from multidict import CIMultiDictProxy

from proxy import headers as forwarding
from proxy.answers import error_response
from proxy.errors import ProxyError
from proxy.framing import AnswerError
from proxy.origin import (
    OriginClient,
    OriginError,
    OriginTimeout,
    OriginUnreachable,
    RequestBodyError,
)
from proxy.units import format_duration, format_size

logger = logging.getLogger("cachecar.proxy")

# Request bodies and answers up to this size (by their Content-Length) are held whole in
# between: a slow client then holds this much memory at most, never an origin connection.
HELD_WHOLE = 256 << 10

# Hears the origin's status and headers before an answer is relayed; (None, None): no answer.
OnAnswer = Callable[[int | None, CIMultiDictProxy[str] | None], Awaitable[None]]


class BodyTooLarge(RequestBodyError):
    """A request body past ``server.max_body``, found while streaming it."""


class BodyStalled(RequestBodyError):
    """A request body that stopped arriving for ``server.body_timeout``."""


class BodyOverdue(RequestBodyError):
    """A request body still arriving once ``server.body_deadline`` has passed."""


class ClientGone(ProxyError):
    """The client went away before its request was whole; nothing reached the origin whole."""


class PassThrough:
    def __init__(
        self,
        origin: OriginClient,
        max_body: int,
        body_timeout: float = 30.0,
        body_deadline: float = 60.0,
    ) -> None:
        self._origin = origin
        self._max_body = max_body
        self._body_timeout = body_timeout
        self._body_deadline = body_deadline

    async def __call__(
        self,
        request: web.Request,
        route: str,
        path: str,
        query: str,
        cache_status: str,
        *,
        on_answer: OnAnswer | None = None,
        x_cache: str = "BYPASS",
    ) -> web.StreamResponse:
        """``request`` sent on to the origin as ``path?query``; its answer streamed back.

        ``on_answer`` hears the origin's status and headers before the answer is relayed
        (None: no answer). Raises ``ClientGone`` when the client's body broke off on the way.
        """
        length = request.content_length
        if length is not None and length > self._max_body:
            return self.too_large(cache_status)
        sent = forwarding.forward_uncached(request.headers, request.remote, request.scheme)
        body: _ClientBody | None = None
        data: bytes | _ClientBody | None = None
        if request.body_exists:
            body = data = self._body(request)
            if length is not None and length <= HELD_WHOLE:
                # Read before an origin connection is taken: a client that trickles its body
                # holds none, and is answered 408 without the origin hearing of it.
                whole = await self._whole(body, cache_status)
                if isinstance(whole, web.Response):
                    return whole
                data = whole
        try:
            async with self._origin.stream(
                request.method,
                self._origin.url(path, query),
                sent,
                data,
                route=route,
                length=length if body is not None else None,
            ) as upstream:
                if on_answer is not None:
                    told, on_answer = on_answer, None
                    await told(upstream.status, upstream.headers)
                head = Head(upstream.status, upstream.reason, upstream.headers)
                if upstream.length is None or upstream.length > HELD_WHOLE:
                    return await relay(
                        request, head, upstream.iter_any(), cache_status, x_cache=x_cache
                    )
                try:
                    answer = [chunk async for chunk in upstream.iter_any()]
                except TimeoutError as exc:
                    raise OriginTimeout(
                        "the origin paused inside its answer's body for upstream.timeout"
                    ) from exc
                except AnswerError as exc:
                    raise OriginUnreachable(f"the answer broke off: {exc}") from exc
            # The origin connection is back in the pool (or closed) before the client reads.
            return await relay(request, head, _replay(answer), cache_status, x_cache=x_cache)
        except OriginError as exc:
            if on_answer is not None:
                await on_answer(None, None)
            refusal = self._refusal(body, cache_status) if body is not None else None
            if refusal is not None:
                return refusal
            if body is not None and body.broken:
                raise ClientGone("the request body broke off while it was being forwarded") from exc
            return error_response(exc.status, exc.title, str(exc), cache_status)

    async def read_body(self, request: web.Request, cache_status: str) -> bytes | web.Response:
        """The whole request body, or the answer to give instead (413, 408); raises
        ``ClientGone`` when it broke off."""
        length = request.content_length
        if length is not None and length > self._max_body:
            return self.too_large(cache_status)
        return await self._whole(self._body(request), cache_status)

    async def _whole(self, body: _ClientBody, cache_status: str) -> bytes | web.Response:
        chunks: list[bytes] = []
        try:
            async for chunk in body:
                chunks.append(chunk)
        except RequestBodyError as exc:
            refusal = self._refusal(body, cache_status)
            if refusal is not None:
                return refusal
            raise ClientGone(f"the request body broke off: {exc}") from exc
        return b"".join(chunks)

    def _body(self, request: web.Request) -> _ClientBody:
        return _ClientBody(request.content, self._max_body, self._body_timeout, self._body_deadline)

    def _refusal(self, body: _ClientBody, cache_status: str) -> web.Response | None:
        """The answer to a body cut off by one of its limits (413, 408); None when it failed
        on the client's side."""
        if body.exceeded:
            return self.too_large(cache_status)
        if body.overdue:
            title = "request body too slow"
            detail = "the request body was not whole within server.body_deadline "
            limit = self._body_deadline
        elif body.stalled:
            title = "request body stalled"
            detail = "no byte of the request body arrived for server.body_timeout "
            limit = self._body_timeout
        else:
            return None
        response = error_response(408, title, f"{detail}({format_duration(limit)})", cache_status)
        response.force_close()  # the rest of the body is not waited for
        return response

    def too_large(self, cache_status: str) -> web.Response:
        return error_response(
            413,
            "request body too large",
            f"the body exceeds server.max_body ({format_size(self._max_body)})",
            cache_status,
        )


class Head(NamedTuple):
    """An origin answer's head: what is relayed before its body."""

    status: int
    reason: str | None
    headers: CIMultiDictProxy[str]


async def relay(
    request: web.Request,
    head: Head,
    body: AsyncIterator[bytes],
    cache_status: str,
    *,
    x_cache: str = "BYPASS",
) -> web.StreamResponse:
    """An origin answer streamed to the client as its ``body`` comes."""
    response = web.StreamResponse(status=head.status, reason=head.reason)
    response.headers.extend(forwarding.to_pass(head.headers))
    response.headers["X-Cache"] = x_cache
    response.headers["Cache-Status"] = cache_status
    try:
        await response.prepare(request)
    except ConnectionResetError:
        return response  # the client went away: nothing left to relay to
    try:
        async for chunk in body:
            try:
                await response.write(chunk)
            except ConnectionResetError:
                return response
            if request.transport is None or request.transport.is_closing():
                # Cut off (server.send_timeout) while it waited: a write can return then.
                return response
    except (AnswerError, TimeoutError) as exc:
        # The head is sent: no error status is possible any more. Cut the connection so the
        # client sees a truncated answer as truncated, never as complete.
        logger.warning("origin broke off %s %s: %s", request.method, request.path, exc)
        if request.transport is not None:
            request.transport.abort()
        return response
    with contextlib.suppress(ConnectionResetError):
        await response.write_eof()
    return response


async def _replay(chunks: list[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


class _ClientBody:
    """A request body streamed to the origin, cut off once it passes ``limit``, pauses for
    longer than ``idle`` seconds, or is not whole ``deadline`` seconds after it was made.

    The origin client reports any failure of the body as its own error (``BodyFailed``);
    ``exceeded`` says it was this limit, ``stalled`` the pause, ``overdue`` the deadline,
    ``broken`` that the client's side failed (gone, or a body shorter than its Content-Length).
    Either way the origin is not to blame: ``RequestBodyError`` says so.
    """

    def __init__(
        self, content: aiohttp.StreamReader, limit: int, idle: float, deadline: float
    ) -> None:
        self._content = content
        self._limit = limit
        self._idle = idle
        self._loop = asyncio.get_running_loop()
        # From the head on: time spent waiting for an origin connection counts too, since
        # a client that trickles meanwhile is just as slow.
        self._deadline = self._loop.time() + deadline
        self.exceeded = False
        self.stalled = False
        self.overdue = False
        self.broken = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        seen = 0
        chunks = self._content.iter_any().__aiter__()
        while True:
            until = min(self._loop.time() + self._idle, self._deadline)
            try:
                async with asyncio.timeout_at(until):
                    chunk = await chunks.__anext__()
            except StopAsyncIteration:
                return
            except TimeoutError as exc:
                if until >= self._deadline:
                    self.overdue = True
                    raise BodyOverdue("not whole by server.body_deadline") from exc
                self.stalled = True
                raise BodyStalled(f"nothing for {self._idle:g}s") from exc
            except Exception as exc:
                self.broken = True
                raise RequestBodyError(f"{type(exc).__name__}: {exc}") from exc
            seen += len(chunk)
            if seen > self._limit:
                self.exceeded = True
                raise BodyTooLarge(f"more than {self._limit} bytes")
            yield chunk
