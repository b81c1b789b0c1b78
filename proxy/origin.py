"""The one pooled client to the origin, with its failures named once.

Two ways to call it: ``fetch`` reads a whole response (a cacheable miss: it is going to be stored),
bounded by ``upstream.timeout`` end to end; ``stream`` hands the response over as it arrives
(everything proxied uncached), bounded by ``upstream.timeout`` to connect and between reads, so a
large download is not cut but a stalled origin is.

    aiohttp errors -> OriginTimeout (504) | OriginUnreachable (502)
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL


class OriginError(Exception):
    """The origin did not give an answer; ``status`` is what cachecar answers instead."""

    status = 502
    title = "origin unreachable"


class RequestBodyError(Exception):
    """The body being sent failed on the client's side: not the origin's failure."""


class OriginUnreachable(OriginError):
    """Refused, reset, unresolvable, or an answer that is not HTTP."""


class OriginTimeout(OriginError):
    """No answer within ``upstream.timeout``."""

    status = 504
    title = "origin timeout"


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
    ) -> None:
        self._session = session
        self._base = base_url.rstrip("/")
        self._timeout = timeout
        self._on_origin = on_origin
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
            connector=aiohttp.TCPConnector(limit=max_connections, ttl_dns_cache=60),
            # Bodies pass through as the origin encoded them; what is cached is what was sent.
            auto_decompress=False,
            # One client serves every user: it must never remember one user's cookies.
            cookie_jar=aiohttp.DummyCookieJar(),
            # Send what the client sent, not aiohttp's defaults.
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
            timeout=aiohttp.ClientTimeout(total=None),
        )
        return cls(session, base_url, timeout, on_origin)

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
    ) -> OriginResponse:
        """The whole response, within ``upstream.timeout``."""
        with self._call(method, route) as call:
            async with asyncio.timeout(self._timeout):
                async with self._session.request(
                    method, url, headers=headers, data=data, allow_redirects=False
                ) as response:
                    call.status = str(response.status)
                    body = await response.read()
                    return OriginResponse(response.status, response.headers, body)

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
        with self._call(method, route) as call:
            response = await self._session.request(
                method,
                url,
                headers=headers,
                data=data,
                allow_redirects=False,
                timeout=self._stream_timeout,
            )
            call.status = str(response.status)
        try:
            yield response
        finally:
            response.release()

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
            response = await self.fetch("GET", self.url(path, ""), CIMultiDict())
        except OriginError as exc:
            return f"{exc.title}: {exc}"
        if response.status >= 500:
            return f"{path} answered {response.status}"
        return None

    async def aclose(self) -> None:
        await self._session.close()


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
