"""A test origin built inside each test, and a factory for proxies in front of it."""

from __future__ import annotations

import asyncio
import textwrap
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from multidict import CIMultiDictProxy
from pytest_aiohttp import AiohttpClient, AiohttpServer
from yarl import URL

from proxy.app import build_proxy_app
from proxy.config import parse_settings
from proxy.settings import Settings
from tests.fakes import FakeClock, RecordingObserver

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Received:
    method: str
    path: str
    headers: CIMultiDictProxy[str]
    body: bytes


@dataclass
class Origin:
    """An origin whose answers each test sets; it records every request it receives."""

    url: str = ""
    received: list[Received] = field(default_factory=list)
    handlers: dict[str, Handler] = field(default_factory=dict)
    gate: asyncio.Event | None = None  # when set, GETs wait for it

    def reply(
        self,
        path: str,
        body: bytes = b"{}",
        *,
        status: int = 200,
        headers: dict[str, str] | None = None,
    ) -> None:
        async def handler(request: web.Request) -> web.Response:
            return web.Response(body=body, status=status, headers=headers)

        self.handlers[path] = handler

    def count(self, path: str, method: str = "GET") -> int:
        return sum(1 for r in self.received if r.path == path and r.method == method)

    def last(self, path: str) -> Received:
        return [r for r in self.received if r.path == path][-1]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.received.append(Received(request.method, request.raw_path, request.headers, body))
        if self.gate is not None and request.method == "GET":
            await self.gate.wait()
        handler = self.handlers.get(request.path)
        if handler is not None:
            return await handler(request)
        n = len(self.received)
        return web.json_response({"path": request.raw_path, "n": n}, headers={"ETag": f'"{n}"'})


@pytest.fixture
async def origin(aiohttp_server: AiohttpServer) -> Origin:
    found = Origin()
    app = web.Application(client_max_size=64 << 20)
    app.router.add_route("*", "/{path:.*}", found.handle)
    server: TestServer = await aiohttp_server(app)
    found.url = str(server.make_url("")).rstrip("/")
    return found


ROUTES = """
routes:
  - path: /users/{id}
    key: "users:{id}"
    negative_ttl: 5s
  - path: /products/{id}
    key: "products:{id}"
    vary: [Accept]
  - path: /products
  - path: /private/{id}
    key: "private:{id}"
    vary: [Authorization]
  - path: /tenants/{id}
    key: "tenants:{id}"
    forward_headers: [X-Tenant]
  - path: /raw/{id}
    mode: bypass
"""


def raw(proxy: TestClient[web.Request, web.Application], target: str) -> URL:
    """The proxy's URL for ``target`` exactly as written: no client-side normalization."""
    return URL(str(proxy.make_url("/")).rstrip("/") + target, encoded=True)


MakeProxy = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]


@pytest.fixture
def make_proxy(
    aiohttp_client: AiohttpClient, origin: Origin, clock: FakeClock, observer: RecordingObserver
) -> MakeProxy:
    """``await make_proxy(extra_yaml)``: a proxy in front of ``origin`` (L2 in memory)."""

    async def make(
        extra: str = "",
        *,
        routes: str = ROUTES,
        l2: str = "memory://",
        key_prefix: str = "cachecar:",
        upstream: str = "",
    ) -> TestClient[web.Request, web.Application]:
        settings = settings_for(
            origin, extra=extra, routes=routes, l2=l2, key_prefix=key_prefix, upstream=upstream
        )
        app = build_proxy_app(settings, clock=clock, observer=observer)
        return await aiohttp_client(app)

    return make


def settings_for(
    origin: Origin,
    *,
    extra: str = "",
    routes: str = ROUTES,
    l2: str = "memory://",
    key_prefix: str = "cachecar:",
    upstream: str = "",
) -> Settings:
    text = "\n".join(
        [
            f"upstream: {{url: {upstream or origin.url!r}, timeout: 1s}}",
            f"l2: {{url: {l2!r}, key_prefix: {key_prefix!r}, timeout: 200ms}}" if l2 else "",
            textwrap.dedent(routes),
            textwrap.dedent(extra),
        ]
    )
    return parse_settings(text, env={})
