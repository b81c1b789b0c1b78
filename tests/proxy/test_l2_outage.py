"""L2 as a breakable dependency, through the proxy: one circuit breaker for every L2 call of the
process (reads, the write-behind queue, leases, purges, /readyz), what is served while it is
open, the half-open probe, and recovery.

Redis is the real one, behind a ``Plug`` the test pulls out (connections cut, new ones closed
at once) or lets hang (accepted, never answered). How many L2 calls the proxy made is what its
observer counted as failed L2 calls while the plug is out (each one fails), and the plug also
counts the connections it was asked for: a breaker that spares Redis shows as neither growing.
Time for the breaker is the test's ``FakeClock``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient
from redis.asyncio import Redis
from yarl import URL

from proxy.admin import build_admin_app
from proxy.app import RUNTIME, build_proxy_app
from tests.fakes import FakeClock, RecordingObserver, until
from tests.proxy.conftest import Origin, settings_for

pytestmark = pytest.mark.redis

Client = TestClient[web.Request, web.Application]

FAILURES = 3
RESET_AFTER = 10.0
TOKEN = "t0ken"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ROUTES = """
routes:
  - path: /users/{id}
    key: "users:{id}"
    tags: ["users"]
  - path: /notes/{id}
    key: "notes:{id}"
    mode: write-behind
  - path: /teams/{id}
    key: "teams:{id}"
    coalesce: cluster
"""


class Plug:
    """A TCP hop in front of the real Redis: ``pull`` closes every connection and each new one
    at once (Redis gone, as a killed process's connections go: closed, not reset), ``hang``
    accepts new ones and never answers (Redis hung), ``plug_in`` forwards again. ``tried``
    counts the connections asked for while not plugged in.
    """

    def __init__(self, url: str) -> None:
        target = URL(url)
        self._host, self._port = target.host or "127.0.0.1", target.port or 6379
        self.state = "in"
        self.tried = 0
        self._links: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._held: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return f"redis://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/0"

    def pull(self) -> None:
        self.state = "out"
        self._cut()

    def hang(self) -> None:
        self.state = "hung"
        self._cut()

    def plug_in(self) -> None:
        self.state = "in"
        for writer in self._held:
            writer.close()
        self._held.clear()

    def _cut(self) -> None:
        for link in list(self._links):
            for writer in link:
                writer.close()

    async def aclose(self) -> None:
        self.pull()
        self.plug_in()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.state != "in":
            self.tried += 1
            if self.state == "hung":
                self._held.append(writer)
            else:
                writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(self._host, self._port)
        except OSError:
            writer.close()
            return
        if self.state != "in":  # pulled while this connection was being made
            self.tried += 1
            for end in (writer, up_writer):
                end.close()
            return
        link = (writer, up_writer)
        self._links.add(link)
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            self._links.discard(link)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


@pytest.fixture
async def plug(redis_url: str, redis_client: Redis) -> AsyncIterator[Plug]:
    """The plug in front of the real Redis (``redis_client`` drops this test's keys after)."""
    found = Plug(redis_url)
    yield found
    await found.aclose()


@pytest.fixture
async def proxy(
    aiohttp_client: AiohttpClient,
    origin: Origin,
    plug: Plug,
    key_prefix: str,
    clock: FakeClock,
    observer: RecordingObserver,
) -> Client:
    """A proxy whose L2 is behind ``plug``. Its flusher does not run on its own (the test
    flushes): no background L2 call may race the test's count."""
    url = await plug.start()
    # Coherence off: one replica, so L1 serves through the outage (with it on, L1 waits for
    # the subscription; that is coherence's rule, tested with coherence).
    settings = settings_for(
        origin,
        extra=f"""
        l2:
          url: {url}
          key_prefix: "{key_prefix}"
          timeout: 200ms
          breaker: {{failures: {FAILURES}, reset_after: {RESET_AFTER:g}s}}
        coherence: {{enabled: false}}
        admin: {{token: {TOKEN}}}
        write_behind: {{flush_interval: 1h, timeout: 1s}}
        """,
        routes=ROUTES,
        l2="",
    )
    app = build_proxy_app(settings, clock=clock, observer=observer, flushes=False)
    return await aiohttp_client(app)


@pytest.fixture
async def admin(proxy: Client, aiohttp_client: AiohttpClient) -> Client:
    return await aiohttp_client(build_admin_app(proxy.app))


def gauge(proxy: Client) -> float | None:
    return proxy.app[RUNTIME].metrics.registry.get_sample_value("cachecar_l2_breaker_open")


def l2_calls(observer: RecordingObserver, plug: Plug) -> tuple[int, int]:
    """The L2 calls made while the plug is out (each one failed and was counted), and the
    connections the plug was asked for."""
    return sum(observer.errors.values()), plug.tried


async def open_breaker(admin: Client, plug: Plug, observer: RecordingObserver) -> None:
    """Redis gone, and the breaker open after ``FAILURES`` failed pings."""
    plug.pull()
    for _ in range(FAILURES):
        assert (await admin.get("/readyz")).status == 503
    assert observer.breaker == [("l2", True)]


class L2Look:
    """The test's own look at L2 (not through the proxy's clients: their connections are the
    proxy's business, and how many of them there are must not depend on the test's looks)."""

    def __init__(self, client: Redis, key_prefix: str) -> None:
        self.client = client
        self.prefix = key_prefix

    async def holds(self, key: str) -> bool:
        return bool(await self.client.hexists(self.prefix + key, ""))

    async def filled(self, key: str) -> None:
        """Wait for ``key``'s background fill to land in L2."""
        for _ in range(500):
            if await self.holds(key):
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"{key} never reached L2")


@pytest.fixture
def l2(redis_client: Redis, key_prefix: str) -> L2Look:
    return L2Look(redis_client, key_prefix)


async def purge(admin: Client, **body: str) -> tuple[int, dict[str, object]]:
    response = await admin.post("/admin/purge", data=json.dumps(body), headers=AUTH)
    return response.status, await response.json()


async def test_failures_of_any_l2_caller_open_the_one_breaker(
    proxy: Client, admin: Client, plug: Plug, observer: RecordingObserver
) -> None:
    assert gauge(proxy) == 0
    plug.pull()
    # Three callers that are not the tiered cache, one failure each, in a row.
    assert (await admin.get("/readyz")).status == 503  # ping
    assert (await admin.get("/admin/write-behind")).status == 503  # the queue's figures
    assert observer.breaker == []
    assert (await purge(admin, tag="users"))[0] == 503  # a purge's SSCAN
    assert observer.errors == {("l2", "ping"): 1, ("l2", "queue stats"): 1, ("l2", "purge"): 1}
    assert observer.breaker == [("l2", True)]
    assert gauge(proxy) == 1
    assert (await (await admin.get("/admin/stats")).json())["l2"]["breaker"] == "open"

    # Readiness still pings (it is no traffic), but tells the breaker nothing.
    errors = sum(observer.errors.values())
    ready = await admin.get("/readyz")
    assert ready.status == 503
    problem = (await ready.json())["l2"]
    assert problem.startswith("ping: ")
    assert problem.endswith("(circuit breaker open)")
    assert sum(observer.errors.values()) == errors
    assert observer.breaker == [("l2", True)]


async def test_the_tiered_cache_s_failures_and_the_others_count_in_one_run(
    proxy: Client, admin: Client, plug: Plug, observer: RecordingObserver
) -> None:
    plug.pull()
    assert (await admin.get("/readyz")).status == 503  # 1: the ping
    # A miss on a ``coalesce: cluster`` route: its L2 read fails (2: the tiered cache's own
    # call), its lease fails (3: the lease's, through the guard) and opens the breaker, so the
    # fill after the origin's answer is not even tried.
    response = await proxy.get("/teams/1")
    assert (response.status, response.headers["X-Cache"]) == (200, "MISS")
    await asyncio.sleep(0.05)  # room for the background fill, were it tried
    assert observer.errors == {("l2", "ping"): 1, ("l2", "get"): 1, ("l2", "lease"): 1}
    assert observer.breaker == [("l2", True)]


async def test_while_open_reads_make_no_l2_call_and_come_from_l1_and_the_origin(
    proxy: Client, admin: Client, plug: Plug, observer: RecordingObserver, origin: Origin
) -> None:
    await open_breaker(admin, plug, observer)
    before = l2_calls(observer, plug)
    l2_lookups = observer.lookups["l2", True] + observer.lookups["l2", False]
    for path in ("/users/1", "/notes/1", "/teams/1"):  # cache-aside, write-behind, leases
        first, second = await proxy.get(path), await proxy.get(path)
        assert (first.status, first.headers["X-Cache"]) == (200, "MISS")
        assert (second.status, second.headers["X-Cache"]) == (200, "HIT-L1")
        assert origin.count(path) == 1
    await asyncio.sleep(0.05)  # room for background fills, were any started
    assert l2_calls(observer, plug) == before
    assert observer.lookups["l2", True] + observer.lookups["l2", False] == l2_lookups


async def test_while_open_write_behind_writes_are_refused_at_once_and_never_acknowledged(
    proxy: Client,
    admin: Client,
    plug: Plug,
    observer: RecordingObserver,
    origin: Origin,
    clock: FakeClock,
) -> None:
    runtime = proxy.app[RUNTIME]
    await open_breaker(admin, plug, observer)
    before = l2_calls(observer, plug)
    cached = await proxy.get("/notes/1")  # the queue is not asked for a pending write either
    assert cached.headers["X-Cache"] == "MISS"
    old = await cached.read()
    for method in ("PUT", "DELETE"):
        refused = await proxy.request(method, "/notes/1", data=b'{"new": true}')
        assert (refused.status, refused.headers["Retry-After"]) == (503, "1"), method
        body = await refused.json()
        assert body == {
            "error": "write-behind queue unavailable",
            "detail": "not accepted: queue enqueue: circuit breaker open",
        }
    # A PATCH must know whether a write is queued: it cannot, and says so.
    patched = await proxy.patch("/notes/1", data=b"{}")
    assert patched.status == 503
    assert "queue pending: circuit breaker open" in (await patched.json())["detail"]
    assert l2_calls(observer, plug) == before  # Redis was not asked: no queue timeout waited
    again = await proxy.get("/notes/1")  # a refused write changed nothing
    assert (again.headers["X-Cache"], await again.read()) == ("HIT-L1", old)

    # Nothing was queued: once Redis is back, a flush sends nothing to the origin.
    plug.plug_in()
    assert runtime.write_behind is not None
    clock.advance(max(RESET_AFTER, runtime.settings.write_behind.flush_interval))
    assert await runtime.write_behind.flusher.flush_once() == 0  # the probe: it closes
    assert observer.breaker == [("l2", True), ("l2", False)]
    assert (await runtime.write_behind.queue.stats()).depth == 0
    assert [r.method for r in origin.received if r.path == "/notes/1"] == ["GET"]


async def test_while_open_a_purge_answers_a_clear_503_and_is_finished_once_redis_is_back(
    proxy: Client,
    admin: Client,
    plug: Plug,
    observer: RecordingObserver,
    clock: FakeClock,
    l2: L2Look,
) -> None:
    assert (await proxy.get("/users/1")).headers["X-Cache"] == "MISS"
    runtime = proxy.app[RUNTIME]
    await l2.filled("users:1")
    await open_breaker(admin, plug, observer)
    before = l2_calls(observer, plug)
    for by, value, detail in [
        ("key", "users:1", "not dropped from L2 yet"),
        ("prefix", "users:", "purge: circuit breaker open"),
        ("tag", "users", "purge: circuit breaker open"),
    ]:
        status, body = await purge(admin, **{by: value})
        assert status == 503, by
        assert body["error"] == "purge incomplete"
        assert detail in str(body["detail"])
    assert l2_calls(observer, plug) == before
    assert (await proxy.get("/users/1")).headers["X-Cache"] == "MISS"  # L1 dropped it

    plug.plug_in()
    clock.advance(RESET_AFTER)
    assert (await admin.get("/readyz")).status == 200  # the probe closes the breaker
    # The tiered cache retries the drop it remembered once its own next L2 call is answered.
    assert (await proxy.get("/users/2")).headers["X-Cache"] == "MISS"
    await until(lambda: runtime.cache.pending_deletes == 0, what="the remembered L2 drop")
    assert not await l2.holds("users:1")
    await l2.filled("users:2")
    assert (await purge(admin, tag="users"))[0] == 200
    assert not await l2.holds("users:2")


async def test_in_half_open_exactly_one_call_is_the_probe(
    proxy: Client,
    admin: Client,
    plug: Plug,
    observer: RecordingObserver,
    origin: Origin,
    clock: FakeClock,
) -> None:
    await open_breaker(admin, plug, observer)
    plug.hang()  # the probe, whichever call it is, waits out its timeout
    clock.advance(RESET_AFTER)
    errors, tried = sum(observer.errors.values()), plug.tried
    answers = await asyncio.gather(
        *(proxy.get(f"/users/{n}") for n in range(5)),
        *(proxy.get(f"/teams/{n}") for n in range(3)),
        proxy.put("/notes/1", data=b"1"),
        proxy.put("/notes/2", data=b"2"),
    )
    statuses = [answer.status for answer in answers]
    assert statuses == [200] * 8 + [503, 503]
    assert sum(observer.errors.values()) == errors + 1  # one call went to Redis, and failed
    assert plug.tried - tried <= 1
    assert observer.breaker == [("l2", True)]  # still open: the failed probe re-opened it
    assert gauge(proxy) == 1

    # Refused again until another ``reset_after``, though Redis is back (which /readyz, a
    # plain ping meanwhile, already says); then a read may be the probe.
    plug.plug_in()
    errors = sum(observer.errors.values())
    assert (await proxy.get("/users/9")).headers["X-Cache"] == "MISS"
    assert await (await admin.get("/readyz")).json() == {
        "status": "ready",
        "origin": "up",
        "l2": "up",
        "coherence": "off",
    }
    assert observer.breaker == [("l2", True)]
    assert gauge(proxy) == 1
    assert (await proxy.get("/users/9")).headers["X-Cache"] == "HIT-L1"
    assert sum(observer.errors.values()) == errors
    clock.advance(RESET_AFTER)
    assert (await proxy.get("/users/10")).headers["X-Cache"] == "MISS"  # the probe: L2 read
    assert observer.breaker == [("l2", True), ("l2", False)]
    assert gauge(proxy) == 0


async def test_a_write_may_be_the_probe_and_closing_restores_everything(
    proxy: Client,
    admin: Client,
    plug: Plug,
    observer: RecordingObserver,
    origin: Origin,
    clock: FakeClock,
    l2: L2Look,
) -> None:
    await open_breaker(admin, plug, observer)
    plug.plug_in()
    clock.advance(RESET_AFTER)
    written = await proxy.put("/notes/1", data=b'{"n": 1}')  # the probe
    assert (written.status, written.headers["X-Cache-Write"]) == (202, "queued")
    assert observer.breaker == [("l2", True), ("l2", False)]
    assert gauge(proxy) == 0
    assert await (await admin.get("/readyz")).json() == {
        "status": "ready",
        "origin": "up",
        "l2": "up",
        "coherence": "off",
    }

    # Reads use L2 again: a fill lands there, and L1 without the key finds it in L2.
    runtime = proxy.app[RUNTIME]
    assert (await proxy.get("/users/1")).headers["X-Cache"] == "MISS"
    await l2.filled("users:1")
    await runtime.cache.l1.delete("users:1")
    assert (await proxy.get("/users/1")).headers["X-Cache"] == "HIT-L2"
    assert await purge(admin, tag="users") == (200, {"purged": 1})

    # And the write the probe queued reaches the origin.
    assert runtime.write_behind is not None
    clock.advance(runtime.settings.write_behind.flush_interval)
    assert await runtime.write_behind.flusher.flush_once() == 1
    assert [(r.method, r.body) for r in origin.received if r.path == "/notes/1"] == [
        ("PUT", b'{"n": 1}')
    ]
