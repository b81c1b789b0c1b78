"""The client to the origin, on ``http1``'s pooled connections, with its failures named once.

Two ways to call it: ``fetch`` reads a whole response (a cacheable miss: it is going to be stored;
a write), bounded by ``upstream.timeout`` end to end; ``stream`` hands the response over as it
arrives (everything proxied uncached, the request body streamed too), bounded by
``upstream.timeout`` to connect, for the head once the body is sent, and between reads, so a large
download is not cut but a stalled origin is. A ``fetch`` with a ``limit`` stops reading past it and
hands the rest over as a stream (``Oversized``): too large to keep, relayed as it comes. A
connection idle for ``upstream.keepalive_timeout`` is closed, not reused.

At most ``upstream.max_connections`` calls are in flight; a call that waits longer than
``upstream.timeout`` for one of them is ``OriginBusy`` (503), without reaching the origin.

    http1's errors -> OriginTimeout (504) | OriginUnreachable (502)
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from functools import partial

from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from cache.errors import LoadDeclined
from proxy.errors import ProxyError
from proxy.framing import Answer, AnswerError
from proxy.http1 import ConnectFailed, Pool
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
        self, response: Answer, limit: int, release: Callable[[], None], grace: float
    ) -> None:
        super().__init__(f"the answer is larger than server.max_cacheable ({format_size(limit)})")
        self._response: Answer | None = response
        self._release = release
        self._closed = False
        asyncio.get_running_loop().call_later(grace, self._abandoned)

    def take(self) -> Answer | None:
        """The open response, what was read of its body still to come; None once taken."""
        response, self._response = self._response, None
        return response

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
        pool: Pool,
        base_url: str,
        timeout: float,
        on_origin: OnOrigin = _ignore,
        max_connections: int | None = None,
    ) -> None:
        self._pool = pool
        self._base = base_url.rstrip("/")
        self._timeout = timeout
        self._on_origin = on_origin
        self._max_connections = max_connections
        self._slots = asyncio.Semaphore(max_connections) if max_connections else None

    @classmethod
    def create(
        cls,
        base_url: str,
        *,
        timeout: float,
        max_connections: int,
        keepalive_timeout: float = 4.0,
        on_origin: OnOrigin = _ignore,
    ) -> OriginClient:
        # One connection beyond the requests' max_connections: the readiness probe's, so a
        # saturated pool is not reported as an origin that does not answer. Bodies pass as the
        # origin encoded them, no cookie is kept, and only the headers given are sent.
        pool = Pool(
            URL(base_url),
            idle=keepalive_timeout,
            max_idle=max_connections + 1,
            read_timeout=timeout,
        )
        return cls(pool, base_url, timeout, on_origin, max_connections)

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
                    response = await self._pool.request(method, url, headers, data)
                    try:
                        call.status = str(response.status)
                        body = await response.read(limit)
                        if body is None:
                            # The rest of it is read with a timeout between reads.
                            handed_over = True
                            raise Oversized(
                                response,
                                limit or 0,
                                partial(self._hand_back, response, slot),
                                self._timeout,
                            )
                        return OriginResponse(response.status, response.headers, body)
                    finally:
                        if not handed_over:
                            response.release()
        finally:
            if slot and not handed_over:
                self._free()

    def _hand_back(self, response: Answer, slot: bool) -> None:
        response.release()
        if slot:
            self._free()

    async def _acquire(self, deadline: float) -> None:
        if self._slots is None:
            return
        if not self._slots.locked():  # taken at once: no timeout to set up
            await self._slots.acquire()
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
            self._pool.after_closed(self._slots.release)

    @contextlib.asynccontextmanager
    async def stream(
        self,
        method: str,
        url: URL,
        headers: CIMultiDict[str],
        data: bytes | AsyncIterable[bytes] | None = None,
        *,
        route: str | None = None,
        length: int | None = None,
    ) -> AsyncIterator[Answer]:
        """The response as it arrives; errors before its head are ``OriginError``. ``data``
        is sent whole, or as it comes with ``length`` its size when known (else chunked)."""
        await self._acquire(asyncio.get_running_loop().time() + self._timeout)
        try:
            with self._call(method, route) as call:
                response = await self._pool.request(
                    method, url, headers, data, length=length, wait=self._timeout
                )
                call.status = str(response.status)
            try:
                yield response
            finally:
                response.release()
        finally:
            self._free()

    @contextlib.contextmanager
    def _call(self, method: str, route: str | None) -> Iterator[_Call]:
        """http1's failures as ``OriginError``; the call reported when it has a ``route``."""
        call = _Call()
        started = time.perf_counter()
        try:
            yield call
        except TimeoutError as exc:
            call.status = "timeout"
            raise OriginTimeout(f"no answer within {self._timeout:g}s") from exc
        except AnswerError as exc:
            call.status = "unreachable"  # also when the answer broke off after its head
            if _caused_by(exc, RequestBodyError):
                route = None  # the request's body failed: that says nothing about the origin
            where = "" if isinstance(exc, ConnectFailed) else f" ({self._pool.address})"
            raise OriginUnreachable(f"{exc}{where}") from exc
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
        self._pool.close()


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
