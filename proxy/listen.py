"""The listeners: the proxy port (hit path in front of aiohttp), and binding errors worded once.

    proxy_site      the proxy port's site: a ``FastSite`` (L1 hits answered by
                    ``proxy.fastpath``; with the access log on, every request by the app),
                    which cuts off clients that leave answers unread (server.send_timeout)
    listen_on       starts a site; a port that cannot be bound is a ``ListenError`` naming it
    check_free      refuses an address something else holds (workers bind with SO_REUSEPORT)

``FastSite`` is an aiohttp ``BaseSite`` of its own rather than a ``TCPSite`` with its attributes
copied: what it reads and sets of aiohttp's is the runner's public ``server`` and ``BaseSite``'s
``_server`` (which ``BaseSite.stop`` closes); ``tests/proxy/test_listen.py`` pins the latter.
"""

from __future__ import annotations

import asyncio
import socket
from ssl import SSLContext

from aiohttp import web
from yarl import URL

from proxy.app import RUNTIME
from proxy.errors import ProxyError
from proxy.fastpath import FastPath, Hits
from proxy.settings import Address, Settings

# Set by the supervisor in a worker's environment: the Unix socket its figures are read on.
WORKER_SOCKET = "CACHECAR_WORKER_SOCKET"

BACKLOG = 1024  # the proxy port's: bursts of new connections wait rather than fail


class ListenError(ProxyError):
    """A listener could not bind its address."""

    @classmethod
    def at(cls, address: Address, exc: OSError) -> ListenError:
        return cls(f"cannot listen on {address}: {exc.strerror or exc}")


async def listen_on(site: web.BaseSite, address: Address) -> None:
    """Start ``site``, which binds ``address``."""
    try:
        await site.start()
    except OSError as exc:
        raise ListenError.at(address, exc) from exc


def check_free(address: Address) -> None:
    """Refuse to start when something holds ``address``: workers bind the proxy port with
    SO_REUSEPORT, which would let them share it with another cachecar's, silently."""
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((address.host, address.port))
        except OSError as exc:
            raise ListenError.at(address, exc) from exc


def proxy_site(
    app: web.Application, runner: web.AppRunner, settings: Settings, reuse_port: bool
) -> web.BaseSite:
    """The proxy port: L1 hits answered by ``proxy.fastpath``, the rest by the app. With the
    access log on, every request goes through the app (it writes the log lines)."""
    address = settings.server.listen
    send_timeout = settings.server.send_timeout
    if settings.server.access_log:
        return FastSite(
            runner,
            None,
            address.host,
            address.port,
            reuse_port=reuse_port,
            send_timeout=send_timeout,
        )
    runtime = app[RUNTIME]
    hits = Hits(
        runtime.proxy.router,
        runtime.cache,
        runtime.metrics,
        clock=runtime.proxy.clock.time,
        max_key_length=settings.server.max_key_length,
        max_header_size=settings.server.max_header_size,
        max_headers=settings.server.max_headers,
        idle_timeout=settings.server.idle_timeout,
    )
    return FastSite(
        runner, hits, address.host, address.port, reuse_port=reuse_port, send_timeout=send_timeout
    )


class FastSite(web.BaseSite):
    """A TCP site whose connections go through ``FastPath`` first (``hits`` None: only to be
    cut off past ``send_timeout``; None: never).

    Takes what ``TCPSite`` takes that cachecar uses, ``ssl_context`` included (the hit path
    reads the decrypted bytes, as aiohttp's protocol would).
    """

    def __init__(
        self,
        runner: web.BaseRunner,
        hits: Hits | None,
        host: str,
        port: int,
        *,
        backlog: int = BACKLOG,
        reuse_port: bool = False,
        ssl_context: SSLContext | None = None,
        send_timeout: float | None = None,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=backlog)
        self._hits = hits
        self._send_timeout = send_timeout
        self._app_runner = runner
        self._host = host
        self._port = port
        self._listen_backlog = backlog
        self._reuse_port = reuse_port
        self._tls = ssl_context
        self._bound: int | None = None

    @property
    def port(self) -> int:
        """The port bound (once started; the one asked for before)."""
        return self._bound if self._bound is not None else self._port

    @property
    def name(self) -> str:
        scheme = "https" if self._tls is not None else "http"
        return str(URL.build(scheme=scheme, host=self._host, port=self.port))

    async def start(self) -> None:
        await super().start()
        server = self._app_runner.server
        assert server is not None
        hits, send_timeout = self._hits, self._send_timeout

        def connection() -> FastPath:
            return FastPath(server(), hits, send_timeout)

        loop = asyncio.get_running_loop()
        listening = await loop.create_server(
            connection,
            self._host,
            self._port,
            ssl=self._tls,
            backlog=self._listen_backlog,
            reuse_port=self._reuse_port,
        )
        self._server = listening  # BaseSite.stop closes it
        sockets = listening.sockets
        self._bound = sockets[0].getsockname()[1] if sockets else self._port
