"""The one pooled client to the origin, with its failures named once.

Two ways to call it: ``fetch`` reads a whole response (a cacheable miss: it is going to be stored),
bounded by ``upstream.timeout`` end to end; ``stream`` hands the response over as it arrives
(everything proxied uncached), bounded by ``upstream.timeout`` to connect and between reads, so a
large download is not cut but a stalled origin is. A ``fetch`` with a ``limit`` stops reading past
it and hands the rest over as a stream (``Oversized``): too large to keep, relayed as it comes.

At most ``upstream.max_connections`` calls are in flight; a call that waits longer than
``upstream.timeout`` for one of them is ``OriginBusy`` (503), without reaching the origin.

    aiohttp errors -> OriginTimeout (504) | OriginUnreachable (502)
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from cache.errors import LoadDeclined
from proxy.errors import ProxyError
from proxy.units import format_duration, format_size


class OriginError(ProxyError):
    """The origin did not give an answer; ``status`` is what cachecar answers instead."""

    status = 502
    title = "origin unreachable"


class RequestBodyError(ProxyError):
    """The body being sent failed on the client's side: not the origin's failure."""


class OriginUnreachable(OriginError):
    """Refused, reset, unresolvable, or an answer that is not HTTP."""


class OriginTimeout(OriginError):
    """No answer within ``upstream.timeout``."""

    status = 504
    title = "origin timeout"


class OriginBusy(OriginError):
    """Every one of ``upstream.max_connections`` stayed in use for ``upstream.timeout``."""

    status = 503
    title = "origin connections busy"


class Oversized(LoadDeclined, ProxyError):
    """An answer larger than the ``limit`` a fetch was given, still open: the first caller to
    ``take`` it relays it and then ``close``s it. One nobody takes is closed after ``grace``."""

    def __init__(
        self,
        response: aiohttp.ClientResponse,
        prefix: bytes,
        limit: int,
        release: Callable[[], None],
        grace: float,
    ) -> None:
        super().__init__(f"the answer is larger than server.max_cacheable ({format_size(limit)})")
        self._response: aiohttp.ClientResponse | None = response
        self._prefix = prefix
        self._release = release
        self._closed = False
        asyncio.get_running_loop().call_later(grace, self._abandoned)

    def take(self) -> tuple[aiohttp.ClientResponse, bytes] | None:
        """The open response and the bytes already read from it; None once taken."""
        response, self._response = self._response, None
        return None if response is None else (response, self._prefix)

    def discard(self) -> None:
        self._response = None
        self.close()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._release()

    def _abandoned(self) -> None:
        if self._response is not None:  # every caller left before taking it
            self._response = None
            self.close()


@dataclass(frozen=True, slots=True)
class OriginResponse:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes


# (route, method, status or "timeout"/"unreachable", seconds: to the whole answer, or to the
# head of a streamed one)
OnOrigin = Callable[[str, str, str, float], None]


def _ignore(route: str, method: str, status: str, seconds: float) -> None:
    pass


class OriginClient:
    """Calls made with a ``route`` are reported to ``on_origin``; probes are not traffic."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        timeout: float,
        on_origin: OnOrigin = _ignore,
        max_connections: int | None = None,
    ) -> None:
        self._session = session
        self._base = base_url.rstrip("/")
        self._timeout = timeout
        self._on_origin = on_origin
        self._max_connections = max_connections
        self._slots = asyncio.Semaphore(max_connections) if max_connections else None
        self._stream_timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=timeout, sock_read=timeout
        )

    @classmethod
    def create(
        cls,
        base_url: str,
        *,
        timeout: float,
        max_connections: int,
        on_origin: OnOrigin = _ignore,
    ) -> OriginClient:
        session = aiohttp.ClientSession(
            # One connection beyond the requests' max_connections: the readiness probe's, so a
            # saturated pool is not reported as an origin that does not answer.
            connector=aiohttp.TCPConnector(limit=max_connections + 1, ttl_dns_cache=60),
            # Bodies pass through as the origin encoded them; what is cached is what was sent.
            auto_decompress=False,
            # One client serves every user: it must never remember one user's cookies.
            cookie_jar=aiohttp.DummyCookieJar(),
            # Send what the client sent, not aiohttp's defaults.
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
            timeout=aiohttp.ClientTimeout(total=None),
        )
        return cls(session, base_url, timeout, on_origin, max_connections)

    def url(self, path: str, query: str) -> URL:
        """The origin URL for a normalized path and its raw query string."""
        return URL(f"{self._base}{path}?{query}" if query else f"{self._base}{path}", encoded=True)

    async def fetch(
        self,
        method: str,
        url: URL,
        headers: CIMultiDict[str],
        data: bytes | None = None,
        *,
        route: str | None = None,
        limit: int | None = None,
        slot: bool = True,
    ) -> OriginResponse:
        """The whole response, within ``upstream.timeout`` (the wait for a connection
        included); ``Oversized`` past ``limit`` bytes. ``slot=False``: not counted against
        ``upstream.max_connections`` (the readiness probe, on the pool's spare connection)."""
        deadline = asyncio.get_running_loop().time() + self._timeout
        slot = slot and self._slots is not None
        if slot:
            await self._acquire(deadline)
        handed_over = False
        try:
            with self._call(method, route) as call:
                async with asyncio.timeout_at(deadline):
                    # Read timeouts too: the rest of an Oversized answer may not stall either.
                    response = await self._request(method, url, headers, data)
                    try:
                        call.status = str(response.status)
                        if limit is None:
                            body = await response.read()
                        else:
                            read = await _read_up_to(response, limit)
                            if read is None or len(read) > limit:
                                handed_over = True
                                raise Oversized(
                                    response,
                                    read or b"",
                                    limit,
                                    partial(self._hand_back, response, slot),
                                    self._timeout,
                                )
                            body = read
                        return OriginResponse(response.status, response.headers, body)
                    finally:
                        if not handed_over:
                            response.release()
        finally:
            if slot and not handed_over:
                self._free()

    async def _request(
        self, method: str, url: URL, headers: CIMultiDict[str], data: Any
    ) -> aiohttp.ClientResponse:
        """The origin's response head; connect and every read bounded by ``upstream.timeout``."""
        return await self._session.request(
            method,
            url,
            headers=headers,
            data=data,
            allow_redirects=False,
            timeout=self._stream_timeout,
        )

    def _hand_back(self, response: aiohttp.ClientResponse, slot: bool) -> None:
        response.release()
        if slot:
            self._free()

    async def _acquire(self, deadline: float) -> None:
        if self._slots is None:
            return
        try:
            async with asyncio.timeout_at(deadline):
                await self._slots.acquire()
        except TimeoutError:
            raise OriginBusy(
                f"all {self._max_connections} connections to the origin "
                f"(upstream.max_connections) stayed busy for {format_duration(self._timeout)}"
            ) from None

    def _free(self) -> None:
        if self._slots is not None:
            self._slots.release()

    @contextlib.asynccontextmanager
    async def stream(
        self,
        method: str,
        url: URL,
        headers: CIMultiDict[str],
        data: Any = None,
        *,
        route: str | None = None,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """The response as it arrives; errors before its head are ``OriginError``."""
        await self._acquire(asyncio.get_running_loop().time() + self._timeout)
        try:
            with self._call(method, route) as call:
                response = await self._request(method, url, headers, data)
                call.status = str(response.status)
            try:
                yield response
            finally:
                response.release()
        finally:
            self._free()

    @contextlib.contextmanager
    def _call(self, method: str, route: str | None) -> Iterator[_Call]:
        """aiohttp's failures as ``OriginError``; the call reported when it has a ``route``."""
        call = _Call()
        started = time.perf_counter()
        try:
            yield call
        except TimeoutError as exc:  # aiohttp's ServerTimeoutError is one too
            call.status = "timeout"
            raise OriginTimeout(f"no answer within {self._timeout:g}s") from exc
        except aiohttp.ClientError as exc:
            call.status = "unreachable"  # also when the answer broke off after its head
            if _caused_by(exc, RequestBodyError):
                route = None  # the request's body failed: that says nothing about the origin
            raise _unreachable(exc) from exc
        except asyncio.CancelledError:
            route = None  # the caller gave up: that says nothing about the origin
            raise
        finally:
            if route is not None:
                self._on_origin(route, method, call.status, time.perf_counter() - started)

    async def probe(self, path: str) -> str | None:
        """None when the origin answers ``path`` below 500; else what is wrong."""
        try:
            response = await self.fetch("GET", self.url(path, ""), CIMultiDict(), slot=False)
        except OriginError as exc:
            return f"{exc.title}: {exc}"
        if response.status >= 500:
            return f"{path} answered {response.status}"
        return None

    async def aclose(self) -> None:
        await self._session.close()


async def _read_up_to(response: aiohttp.ClientResponse, limit: int) -> bytes | None:
    """The whole body when it is at most ``limit`` bytes; else what was read past it (more
    than ``limit`` bytes), or None when its Content-Length says so before any is read."""
    length = response.content_length
    if length is not None and length > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_any():
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            break
    return b"".join(chunks)


@dataclass(slots=True)
class _Call:
    status: str = "unreachable"  # until the origin's response head says otherwise


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    """Whether ``kind`` is in ``exc``'s chain of causes."""
    chain: list[BaseException] = []
    found: BaseException | None = exc
    while found is not None and found not in chain:
        if isinstance(found, kind):
            return True
        chain.append(found)
        found = found.__cause__ or found.__context__
    return False


def _unreachable(exc: aiohttp.ClientError) -> OriginUnreachable:
    if isinstance(exc, aiohttp.ClientConnectorError):
        return OriginUnreachable(f"cannot connect to {exc.host}:{exc.port}: {exc.os_error}")
    return OriginUnreachable(f"{type(exc).__name__}: {exc}")
