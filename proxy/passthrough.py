"""Requests cachecar does not answer itself, streamed to the origin and back.

Neither body is held whole: the request's is passed on as it arrives, cut off past
``server.max_body`` (413), and the answer is relayed as it comes. Who failed is kept apart: a
client whose body broke off is ``ClientGone`` (counted 499), never the origin's failure.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
from aiohttp import web

from proxy import headers as forwarding
from proxy.answers import error_response
from proxy.origin import OriginClient, OriginError, RequestBodyError
from proxy.units import format_size

logger = logging.getLogger("cachecar.proxy")

OnAnswer = Callable[[int | None], Awaitable[None]]


class BodyTooLarge(RequestBodyError):
    """A request body past ``server.max_body``, found while streaming it."""


class ClientGone(Exception):
    """The client went away before its request was whole; nothing reached the origin whole."""


class PassThrough:
    def __init__(self, origin: OriginClient, max_body: int) -> None:
        self._origin = origin
        self._max_body = max_body

    async def __call__(
        self,
        request: web.Request,
        route: str,
        path: str,
        query: str,
        cache_status: str,
        *,
        on_answer: OnAnswer | None = None,
    ) -> web.StreamResponse:
        """``request`` sent on to the origin as ``path?query``; its answer streamed back.

        ``on_answer`` hears the origin's status before the answer is relayed (None: no
        answer). Raises ``ClientGone`` when the client's body broke off on the way.
        """
        length = request.content_length
        if length is not None and length > self._max_body:
            return self.too_large(cache_status)
        sent = forwarding.forward_uncached(request.headers, request.remote, request.scheme)
        body: _ClientBody | None = None
        if request.body_exists:
            body = _ClientBody(request.content, self._max_body)
            if length is not None:
                sent["Content-Length"] = str(length)
        try:
            async with self._origin.stream(
                request.method,
                self._origin.url(path, query),
                sent,
                body,
                route=route,
            ) as upstream:
                if on_answer is not None:
                    await on_answer(upstream.status)
                return await relay(request, upstream, cache_status)
        except OriginError as exc:
            if on_answer is not None:
                await on_answer(None)
            if body is not None and body.exceeded:
                return self.too_large(cache_status)
            if body is not None and body.broken:
                raise ClientGone("the request body broke off while it was being forwarded") from exc
            return error_response(exc.status, exc.title, str(exc), cache_status)

    def too_large(self, cache_status: str) -> web.Response:
        return error_response(
            413,
            "request body too large",
            f"the body exceeds server.max_body ({format_size(self._max_body)})",
            cache_status,
        )


async def relay(
    request: web.Request,
    upstream: aiohttp.ClientResponse,
    cache_status: str,
    *,
    x_cache: str = "BYPASS",
    prefix: bytes = b"",
) -> web.StreamResponse:
    """``upstream`` streamed to the client as it comes, after ``prefix`` (already read)."""
    response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
    response.headers.extend(forwarding.to_pass(upstream.headers))
    response.headers["X-Cache"] = x_cache
    response.headers["Cache-Status"] = cache_status
    await response.prepare(request)
    try:
        if prefix:
            await response.write(prefix)
    except ConnectionResetError:
        return response
    try:
        async for chunk in upstream.content.iter_any():
            try:
                await response.write(chunk)
            except ConnectionResetError:
                return response  # the client went away: nothing left to relay to
    except aiohttp.ClientError as exc:
        # The head is sent: no error status is possible any more. Cut the connection so the
        # client sees a truncated answer as truncated, never as complete.
        logger.warning("origin broke off %s %s: %s", request.method, request.path, exc)
        if request.transport is not None:
            request.transport.abort()
        return response
    await response.write_eof()
    return response


class _ClientBody:
    """A request body streamed to the origin, cut off once it passes ``limit``.

    aiohttp reports any failure of the body as its own client error; ``exceeded`` says it was
    this limit, ``broken`` that the client's side failed (gone, or a body shorter than its
    Content-Length). Either way the origin is not to blame: ``RequestBodyError`` says so.
    """

    def __init__(self, content: aiohttp.StreamReader, limit: int) -> None:
        self._content = content
        self._limit = limit
        self.exceeded = False
        self.broken = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        seen = 0
        chunks = self._content.iter_any().__aiter__()
        while True:
            try:
                chunk = await chunks.__anext__()
            except StopAsyncIteration:
                return
            except Exception as exc:
                self.broken = True
                raise RequestBodyError(f"{type(exc).__name__}: {exc}") from exc
            seen += len(chunk)
            if seen > self._limit:
                self.exceeded = True
                raise BodyTooLarge(f"more than {self._limit} bytes")
            yield chunk
