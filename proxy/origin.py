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
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL


class OriginError(Exception):
    """The origin did not give an answer; ``status`` is what cachecar answers instead."""

    status = 502
    title = "origin unreachable"


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


class OriginClient:
    def __init__(self, session: aiohttp.ClientSession, base_url: str, timeout: float) -> None:
        self._session = session
        self._base = base_url.rstrip("/")
        self._timeout = timeout
        self._stream_timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=timeout, sock_read=timeout
        )

    @classmethod
    def create(cls, base_url: str, *, timeout: float, max_connections: int) -> OriginClient:
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
        return cls(session, base_url, timeout)

    def url(self, path: str, query: str) -> URL:
        """The origin URL for a normalized path and its raw query string."""
        return URL(f"{self._base}{path}?{query}" if query else f"{self._base}{path}", encoded=True)

    async def fetch(
        self, method: str, url: URL, headers: CIMultiDict[str], data: bytes | None = None
    ) -> OriginResponse:
        """The whole response, within ``upstream.timeout``."""
        try:
            async with asyncio.timeout(self._timeout):
                async with self._session.request(
                    method, url, headers=headers, data=data, allow_redirects=False
                ) as response:
                    body = await response.read()
                    return OriginResponse(response.status, response.headers, body)
        except TimeoutError as exc:
            raise OriginTimeout(f"no answer within {self._timeout:g}s") from exc
        except aiohttp.ClientError as exc:
            raise _unreachable(exc) from exc

    @contextlib.asynccontextmanager
    async def stream(
        self, method: str, url: URL, headers: CIMultiDict[str], data: Any = None
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """The response as it arrives; errors before its head are ``OriginError``."""
        try:
            response = await self._session.request(
                method,
                url,
                headers=headers,
                data=data,
                allow_redirects=False,
                timeout=self._stream_timeout,
            )
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise OriginTimeout(f"no answer within {self._timeout:g}s") from exc
        except aiohttp.ClientError as exc:
            raise _unreachable(exc) from exc
        try:
            yield response
        finally:
            response.release()

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


def _unreachable(exc: aiohttp.ClientError) -> OriginUnreachable:
    if isinstance(exc, aiohttp.ClientConnectorError):
        return OriginUnreachable(f"cannot connect to {exc.host}:{exc.port}: {exc.os_error}")
    return OriginUnreachable(f"{type(exc).__name__}: {exc}")
