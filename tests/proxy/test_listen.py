"""The listeners (``proxy.listen``): ``FastSite`` on aiohttp's ``BaseSite``, and binding errors
that name the address."""

from __future__ import annotations

import socket
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from proxy.app import RUNTIME, build_proxy_app
from proxy.errors import ProxyError
from proxy.fastpath import Hits
from proxy.listen import FastSite, ListenError, check_free, listen_on
from proxy.settings import Address
from tests.proxy.conftest import Origin, settings_for
from tests.redis_servers import binary


@pytest.fixture
async def served(origin: Origin) -> AsyncIterator[tuple[web.AppRunner, Hits]]:
    """A started proxy app's runner, and the hit path over its runtime, for sites to serve."""
    origin.reply("/users/1", b'{"name": "ada"}')
    app = build_proxy_app(settings_for(origin))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    runtime = app[RUNTIME]
    try:
        yield runner, Hits(runtime.proxy.router, runtime.cache, runtime.metrics)
    finally:
        await runner.cleanup()


def bind(port: int) -> None:
    """Bind and listen on ``port`` of 127.0.0.1 (no SO_REUSEADDR): OSError while it is held."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", port))
        probe.listen()


async def test_stop_closes_the_listening_server_through_base_sites_server_slot(
    served: tuple[web.AppRunner, Hits],
) -> None:
    # FastSite sets BaseSite's private ``_server`` to its listening server, for BaseSite.stop
    # to close: an aiohttp without that slot would leave FastSite's port bound after stop.
    assert "_server" in web.BaseSite.__slots__, "proxy/listen.py's FastSite sets BaseSite._server"
    runner, hits = served
    site = FastSite(runner, hits, "127.0.0.1", 0)
    await site.start()
    port = site.port
    assert port != 0
    assert site._server is not None
    with pytest.raises(OSError, match="in use"):
        bind(port)  # held while the site runs
    await site.stop()
    bind(port)  # free again


def self_signed(where: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, made by openssl."""
    cert, key = where / "site.crt", where / "site.key"
    made = subprocess.run(
        [
            binary("openssl"),
            *("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"),
            *("-nodes", "-days", "1", "-subj", "/CN=127.0.0.1"),
            *("-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)),
        ],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert made.returncode == 0, made.stderr.decode()
    return cert, key


async def test_a_fast_site_given_an_ssl_context_serves_over_tls_hits_included(
    served: tuple[web.AppRunner, Hits], tmp_path: Path
) -> None:
    cert, key = self_signed(tmp_path)
    server_side = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_side.load_cert_chain(cert, key)
    client_side = ssl.create_default_context(cafile=str(cert))
    runner, hits = served
    site = FastSite(runner, hits, "127.0.0.1", 0, ssl_context=server_side)
    await site.start()
    assert site.name == f"https://127.0.0.1:{site.port}"
    async with aiohttp.ClientSession() as session:
        answers = []
        for _ in range(2):  # a miss through aiohttp, then an L1 hit through the hit path
            url = f"https://127.0.0.1:{site.port}/users/1"
            async with session.get(url, ssl=client_side) as response:
                answers.append(
                    (response.status, response.headers["X-Cache"], await response.read())
                )
    assert answers == [(200, "MISS", b'{"name": "ada"}'), (200, "HIT-L1", b'{"name": "ada"}')]


async def test_a_taken_port_is_a_listen_error_naming_the_address(
    served: tuple[web.AppRunner, Hits],
) -> None:
    runner, _ = served
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = Address("127.0.0.1", taken.getsockname()[1])
        with pytest.raises(ListenError, match=rf"^cannot listen on 127\.0\.0\.1:{address.port}: "):
            await listen_on(web.TCPSite(runner, address.host, address.port), address)
        with pytest.raises(ListenError, match=rf"^cannot listen on 127\.0\.0\.1:{address.port}: "):
            check_free(address)


def test_a_listen_error_names_the_address_and_the_reason() -> None:
    error = ListenError.at(Address("::1", 8080), OSError(98, "Address already in use"))
    assert str(error) == "cannot listen on [::1]:8080: Address already in use"
    assert isinstance(error, ProxyError)
