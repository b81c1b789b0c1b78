"""Two doors, one answer: every request the hit path (``proxy.fastpath``) sees is answered as
the full handler alone answers it, whichever door it takes.

One app, one cache, two ports: the proxy port as ``cachecar serve`` serves it (the hit path in
front of aiohttp), and a plain aiohttp site on the same runner (the full handler only). Each
request goes to both; the answers must agree but for Date.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from proxy.app import build_proxy_app
from proxy.headers import CREDENTIALS, FULL_PATH, HANDED_OVER, RANGE
from proxy.listen import proxy_site
from tests.fakes import FakeClock
from tests.ports import free_port
from tests.proxy.conftest import Origin, settings_for
from tests.proxy.test_fastpath import ROUTES, exchange, get

# A value for each header that takes a read past the hit path without handing the connection
# over; a name added to proxy.headers without one here fails the test that lists them.
VALUES = {
    "authorization": "Bearer token-a",
    "cookie": "session=a",
    RANGE: "bytes=0-3",
}
CONDITIONALS = ('If-None-Match: "v1"', "If-Modified-Since: Tue, 01 Jan 2030 00:00:00 GMT")


@pytest.fixture
async def doors(origin: Origin, clock: FakeClock) -> AsyncIterator[tuple[int, int]]:
    """(the proxy port with its hit path, a port of the full handler alone) on one app."""
    origin.reply("/users/1", b'{"name": "ada"}', headers={"ETag": '"v1"'})
    origin.reply("/shared/1", b'{"shared": true}', headers={"ETag": '"s1"'})
    origin.reply("/private/1", b'{"private": true}')
    origin.reply("/users/2", b'{"lang": "any"}', headers={"Vary": "X-Lang"})
    fast, full = free_port(), free_port()
    settings = settings_for(
        origin, routes=ROUTES, extra=f"server: {{idle_timeout: 5s, listen: '127.0.0.1:{fast}'}}"
    )
    app = build_proxy_app(settings, clock=clock)
    runner = web.AppRunner(app, access_log=None, keepalive_timeout=5.0)
    await runner.setup()
    await proxy_site(app, runner, settings, reuse_port=False).start()
    await web.TCPSite(runner, "127.0.0.1", full).start()
    try:
        yield fast, full
    finally:
        await runner.cleanup()


def test_every_header_that_takes_a_read_past_the_hit_path_is_sent_below() -> None:
    # The names proxy.headers lists, but those that hand the connection over (a body, an
    # upgrade: aiohttp's for good, on either door).
    assert set(VALUES) == FULL_PATH - HANDED_OVER
    assert CREDENTIALS <= FULL_PATH


def requests() -> list[tuple[str, bytes]]:
    found = [
        ("an L1 hit", get("/users/1")),
        ("HEAD", get("/users/1").replace(b"GET", b"HEAD", 1)),
        ("an L2 hit (no L1 on the route)", get("/shared/1")),
        ("a non-canonical path", get("//users/1")),
        ("a dot segment", get("/users/./1")),
        ("a query", get("/users/1?b=2&a=1")),
        ("Vary on Authorization", get("/private/1", "Authorization: Bearer token-b")),
        ("a Vary the route learned from the origin", get("/users/2", "X-Lang: en")),
    ]
    found += [(f"{name}", get("/users/1", f"{name}: {value}")) for name, value in VALUES.items()]
    found += [(line, get("/users/1", line)) for line in CONDITIONALS]
    return found


@pytest.mark.parametrize(("what", "request_bytes"), requests(), ids=[w for w, _ in requests()])
async def test_both_doors_give_the_same_answer(
    doors: tuple[int, int], what: str, request_bytes: bytes
) -> None:
    fast, full = doors
    # The fills: both doors find cached what the request may be answered from (the request
    # twice: the first answer that varies on a header the route did not key on is not kept).
    for fill in (get("/users/1"), get("/shared/1"), request_bytes, request_bytes):
        await exchange(full, fill, 1)
    answers = []
    for port in (fast, full):
        [(status, headers, body)] = await exchange(port, request_bytes, 1)
        headers.pop("date", None)
        answers.append((status, headers, body))
    assert answers[0] == answers[1], what
