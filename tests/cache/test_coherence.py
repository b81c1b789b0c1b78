"""Coherence over the real Redis, a Redis Cluster and a master behind Sentinel: replicas' L1s
follow each other's writes and purges.

On a cluster the replicas subscribe on a seed node and publish through the cluster client, so a
message crosses the cluster bus to reach them (it is published on whatever node the client
picks)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import fakeredis
import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError

from cache.breaker import Breaker, Guard
from cache.clock import SystemClock
from cache.entry import Entry
from cache.lookup import Loaded, Source
from cache.memory import MemoryTier
from cache.redis.coherence import Coherence, listener_client
from cache.redis.tier import RedisClient, RedisTier, client_from_url
from cache.tiered import TieredCache
from tests.fakes import FakeClock, RecordingObserver, until
from tests.ports import free_port
from tests.redis_servers import Deployment

pytestmark = pytest.mark.redis

CLOCK = SystemClock()


@dataclass
class Replica:
    name: str
    cache: TieredCache
    coherence: Coherence
    observer: RecordingObserver

    async def read(self, key: str, body: bytes = b"origin") -> tuple[Source, bytes]:
        async def load() -> Loaded:
            return Loaded(Entry(200, (), body, CLOCK.time(), 60), l1_ttl=60, l2_ttl=60)

        lookup = await self.cache.get(key, "", l1_ttl=60, loader=load)
        return lookup.source, lookup.entry.body

    async def write(self, key: str, body: bytes) -> None:
        entry = Entry(200, (), body, CLOCK.time(), 60)
        await self.cache.put(key, "", entry, l1_ttl=60, l2_ttl=60)


Start = Callable[..., Awaitable[Replica]]


@pytest.fixture
async def start(
    deployment: Deployment, key_prefix: str, deployed_client: RedisClient
) -> AsyncIterator[Start]:
    """``await start(name)``: a replica on ``deployment``, subscribed on this test's channel."""
    channel = f"{key_prefix}invalidate"
    replicas: list[Replica] = []

    async def make(name: str, url: str = deployment.url, degraded_ttl: float = 0.0) -> Replica:
        observer = RecordingObserver()
        l1 = MemoryTier(max_entries=100, max_bytes=1 << 20, clock=CLOCK, observer=observer)
        l2 = RedisTier(client_from_url(url, timeout=1.0), key_prefix=key_prefix, timeout=1.0)
        cache = TieredCache(
            l1, l2, clock=CLOCK, observer=observer, trust_l1=False, degraded_ttl=degraded_ttl
        )
        coherence = Coherence(
            client_from_url(url, timeout=1.0),
            listener_client(url, name=f"cachecar-coherence-{name}-{uuid.uuid4().hex}", timeout=1.0),
            channel,
            local=cache,
            clock=CLOCK,
            timeout=1.0,
            replica=name,
            observer=observer,
        )
        cache.announce = coherence.publish
        coherence.start()
        replica = Replica(name, cache, coherence, observer)
        replicas.append(replica)
        return replica

    yield make
    for replica in replicas:
        await replica.coherence.aclose()
        await replica.cache.aclose()


async def subscribed(*replicas: Replica) -> None:
    async with asyncio.timeout(5):
        for replica in replicas:
            await replica.coherence.wait_subscribed()


async def test_a_write_on_one_replica_drops_the_key_from_the_others_l1(start: Start) -> None:
    a, b = await start("a"), await start("b")
    await subscribed(a, b)
    assert await b.read("users:1") == (Source.LOADER, b"origin")
    assert await b.read("users:1") == (Source.L1, b"origin")

    await a.write("users:1", b"new")
    await until(lambda: b.observer.lags != [])
    assert await b.read("users:1") == (Source.L2, b"new")
    assert 0 <= b.observer.lags[0] < 1.0
    assert a.observer.lags == []  # its own message is ignored


async def test_fills_are_never_announced(start: Start) -> None:
    a, b = await start("a"), await start("b")
    await subscribed(a, b)
    await b.read("users:1")
    await a.read("users:1")  # a fill (an L2 hit) on another replica
    await a.read("users:2")  # a fill from the origin
    await asyncio.sleep(0.1)
    assert b.observer.lags == []
    assert await b.read("users:1") == (Source.L1, b"origin")


DEAD = {
    "redis": "redis://127.0.0.1:{port}",
    "cluster": "redis+cluster://127.0.0.1:{port}",
    "sentinel": "redis+sentinel://127.0.0.1:{port}/mymaster",
}


async def test_an_l1_is_unused_until_subscribed_and_emptied_when_it_is(
    start: Start, deployment: Deployment
) -> None:
    dead = DEAD[deployment.name].format(port=free_port())
    a = await start("a", url=dead)  # never subscribes
    assert not a.cache.l1_trusted
    assert (await a.read("users:1"))[0] is Source.LOADER
    assert (await a.read("users:1"))[0] is Source.LOADER
    assert a.observer.lookups["l1", True] + a.observer.lookups["l1", False] == 0


async def test_a_lost_subscription_clears_l1_and_a_value_overwritten_meanwhile_is_never_served(
    start: Start, deployment: Deployment
) -> None:
    a, b = await start("a"), await start("b")
    await subscribed(a, b)
    await b.read("users:1")
    assert await b.read("users:1") == (Source.L1, b"origin")

    # Held deaf until the read below: its new subscriptions go to a port nobody listens on (a
    # quick resubscription would otherwise make the "deaf" read a subscribed one).
    listener = b.coherence._listener
    b.coherence._listener = listener_client(
        f"redis://127.0.0.1:{free_port()}", name="cachecar-coherence-b-deaf", timeout=1.0
    )
    # The subscriptions are on the node_url's node: the cluster's seed, Sentinel's master.
    async with Redis.from_url(deployment.node_url) as node:
        killed = await kill_subscription(node, "cachecar-coherence-b-")
    assert killed == 1
    await until(lambda: not b.coherence.subscribed)
    await a.write("users:1", b"new")  # b cannot hear this
    source, body = await b.read("users:1")
    assert (source, body) != (Source.L1, b"origin")
    assert body == b"new"
    b.coherence._listener = listener
    await until(lambda: b.coherence.subscribed)  # it subscribes again by itself
    assert b.observer.subscribed == [True, False, True]
    assert await b.read("users:1") == (Source.L2, b"new")  # L1 was emptied on the way back
    assert await b.read("users:1") == (Source.L1, b"new")


async def test_in_degraded_mode_a_value_overwritten_meanwhile_is_served_degraded_ttl_at_most(
    start: Start, deployment: Deployment
) -> None:
    a, b = await start("a"), await start("b", degraded_ttl=0.3)
    await subscribed(a, b)
    await b.read("users:1")
    assert await b.read("users:1") == (Source.L1, b"origin")

    listener = b.coherence._listener  # held deaf, as in the test above
    b.coherence._listener = listener_client(
        f"redis://127.0.0.1:{free_port()}", name="cachecar-coherence-b-deaf", timeout=1.0
    )
    async with Redis.from_url(deployment.node_url) as node:
        assert await kill_subscription(node, "cachecar-coherence-b-") == 1
    await until(lambda: not b.coherence.subscribed)
    assert b.cache.degraded
    assert await b.read("users:1") == (Source.L2, b"origin")  # emptied at the loss
    assert await b.read("users:1") == (Source.L1, b"origin")  # then served, degraded
    await a.write("users:1", b"new")  # b cannot hear this
    assert await b.read("users:1") == (Source.L1, b"origin")  # within degraded_ttl
    await asyncio.sleep(0.35)
    assert await b.read("users:1") == (Source.L2, b"new")
    assert b.observer.degraded_reads == 2

    b.coherence._listener = listener
    await until(lambda: b.coherence.subscribed)
    assert [b.cache.degraded] == [False]  # (a list: mypy keeps the narrowing above)
    assert await b.read("users:1") == (Source.L2, b"new")  # emptied once more
    await asyncio.sleep(0.35)
    assert await b.read("users:1") == (Source.L1, b"new")  # full TTL again


async def test_a_prefix_change_drops_every_matching_key(start: Start) -> None:
    a, b = await start("a"), await start("b")
    await subscribed(a, b)
    for key in ("users:1", "users:2", "items:1"):
        await b.read(key)
    await a.coherence.publish_prefix("users:")
    await until(lambda: b.observer.lags != [])
    assert (await b.read("users:1"))[0] is not Source.L1
    assert (await b.read("users:2"))[0] is not Source.L1
    assert (await b.read("items:1"))[0] is Source.L1


async def test_messages_that_are_not_cachecar_s_are_ignored(
    start: Start, deployed_client: RedisClient, key_prefix: str
) -> None:
    b = await start("b")
    await subscribed(b)
    await b.read("users:1")
    for junk in (b"hello", b"[1, 2]", b'{"r": "x"}', b'{"r": "x", "t": "soon", "k": 1}'):
        await deployed_client.publish(f"{key_prefix}invalidate", junk)
    await asyncio.sleep(0.1)
    assert b.coherence.subscribed
    assert await b.read("users:1") == (Source.L1, b"origin")


async def kill_subscription(client: Redis, name_prefix: str) -> int:
    """``CLIENT KILL`` the connections whose name starts with ``name_prefix``."""
    clients = await client.client_list()
    ids = [c["id"] for c in clients if c.get("name", "").startswith(name_prefix)]
    for client_id in ids:
        await client.client_kill_filter(_id=client_id)
    return len(ids)


async def test_a_lookup_under_way_when_the_change_arrives_stores_nothing(start: Start) -> None:
    a, b = await start("a"), await start("b")
    await subscribed(a, b)
    gate = asyncio.Event()

    async def slow_old_value() -> Loaded:
        await gate.wait()  # fetched before the write, answered after it
        return Loaded(Entry(200, (), b"old", CLOCK.time(), 60), l1_ttl=60, l2_ttl=60)

    reading = asyncio.create_task(b.cache.get("users:1", "", l1_ttl=60, loader=slow_old_value))
    await asyncio.sleep(0.05)
    await a.write("users:1", b"new")
    await until(lambda: b.observer.lags != [])
    gate.set()
    assert (await reading).entry.body == b"old"  # its caller asked before the write
    assert await b.read("users:1") == (Source.L2, b"new")


@pytest.mark.parametrize("deployment", ["cluster"], indirect=True)
async def test_on_a_cluster_a_change_published_on_any_node_reaches_every_replica(
    start: Start, deployed_client: RedisClient, key_prefix: str
) -> None:
    b = await start("b")
    await subscribed(b)
    assert isinstance(deployed_client, RedisCluster)
    await deployed_client.initialize()
    primaries = deployed_client.get_primaries()
    for node in primaries:  # b listens on the seed; two of these cross the cluster bus
        change = {"r": "a", "t": CLOCK.time(), "k": [f"users:{node.port}"]}
        await deployed_client.publish(
            f"{key_prefix}invalidate", json.dumps(change), target_nodes=node
        )
    await until(lambda: len(b.observer.lags) == len(primaries) == 3)


async def test_no_message_anyone_publishes_stops_the_listening(
    start: Start, deployed_client: RedisClient, key_prefix: str
) -> None:
    a, b = await start("a"), await start("b")
    await subscribed(a, b)
    channel = f"{key_prefix}invalidate"
    hostile = (b"[" * 100_000, b'{"r": "x", "t": 1' + b"0" * 400 + b', "k": []}', b"\xff\xfe")
    for message in hostile:
        await deployed_client.publish(channel, message)
    await b.read("users:1")
    await a.write("users:1", b"new")  # still heard after all that
    await until(lambda: b.observer.lags != [])
    assert b.coherence.subscribed
    assert await b.read("users:1") == (Source.L2, b"new")


class FailingOnce:
    """A publishing client whose first PUBLISH fails (a Redis stall past the timeout)."""

    def __init__(self, client: RedisClient) -> None:
        self.client = client
        self.failed = False

    async def publish(self, channel: str, message: str) -> int:
        if not self.failed:
            self.failed = True
            raise RedisConnectionError("stalled")
        return await self.client.publish(channel, message)

    async def aclose(self) -> None:
        await self.client.aclose()


async def test_a_change_that_could_not_be_announced_is_announced_again(
    start: Start, deployment: Deployment
) -> None:
    a, b = await start("a"), await start("b")
    await subscribed(a, b)
    await b.read("users:1")
    assert (await b.read("users:1"))[0] is Source.L1
    a.coherence._client = FailingOnce(client_from_url(deployment.url, timeout=1.0))  # type: ignore[assignment]
    await a.write("users:1", b"new")  # its announcement fails, then is sent again
    await until(lambda: b.observer.lags != [])
    assert await b.read("users:1") == (Source.L2, b"new")
    assert a.coherence.unsent == 0
    assert a.observer.errors["l2", "publish"] == 1


# -- behind the process's L2 breaker -------------------------------------------------------------


async def test_announcements_wait_while_the_breaker_is_open_and_the_subscription_does_not(
    redis_url: str, key_prefix: str, redis_client: Redis, clock: FakeClock
) -> None:
    channel = f"{key_prefix}invalidate"
    changes: list[bool] = []
    breaker = Breaker(failures=1, reset_after=10, clock=clock, on_change=changes.append)
    breaker.failure()  # open from the start: Redis failed for some other caller of the process
    observer = RecordingObserver()
    published: list[str] = []

    class Counting:
        """The publishing client, counting what reaches it."""

        def __init__(self, client: RedisClient) -> None:
            self.client = client

        async def publish(self, channel: str, message: str) -> int:
            published.append(message)
            return await self.client.publish(channel, message)

        async def aclose(self) -> None:
            await self.client.aclose()

    def coherence(name: str, cache: TieredCache, guard: Guard | None) -> Coherence:
        made = Coherence(
            client_from_url(redis_url, timeout=1.0),
            listener_client(redis_url, name=f"cachecar-coherence-{name}", timeout=1.0),
            channel,
            local=cache,
            clock=CLOCK,
            timeout=1.0,
            replica=name,
            observer=observer,
            guard=guard,
        )
        made.start()
        return made

    def replica_cache() -> TieredCache:
        l1 = MemoryTier(max_entries=100, max_bytes=1 << 20, clock=CLOCK)
        return TieredCache(l1, None, clock=CLOCK, trust_l1=False)

    a_cache, b_cache = replica_cache(), replica_cache()
    a = coherence("a", a_cache, Guard(breaker, observer=observer))
    a._client = Counting(a._client)  # type: ignore[assignment]
    b = coherence("b", b_cache, None)
    try:
        async with asyncio.timeout(5):
            await a.wait_subscribed()  # the subscription does not wait for the breaker
            await b.wait_subscribed()
        entry = Entry(200, (), b"old", CLOCK.time(), 60)
        await b_cache.l1.set("users:1", "", entry, 60)

        await a.publish(["users:1"])
        await asyncio.sleep(0.3)  # several resends, each refused by the breaker
        assert published == []
        assert a.unsent == 1
        assert observer.errors == {}  # refusals are no L2 errors
        assert await b_cache.l1.get("users:1", "") is not None

        clock.advance(10)  # half-open: the next resend is the probe
        await until(lambda: changes == [True, False], what="the resend probing and closing it")
        assert (a.unsent, len(published)) == (0, 1)
        await until(lambda: observer.lags != [], what="b hearing the announcement")
        assert await b_cache.l1.get("users:1", "") is None
    finally:
        for made in (a, b):
            await made.aclose()


def test_a_client_that_decodes_responses_is_refused() -> None:
    local = TieredCache(MemoryTier(max_entries=1, max_bytes=1 << 10, clock=CLOCK), clock=CLOCK)
    with pytest.raises(ValueError, match="announcements' client must be built with decode"):
        Coherence(
            fakeredis.FakeAsyncRedis(decode_responses=True),
            lambda: Redis(),
            "channel",
            local=local,
            clock=CLOCK,
            timeout=1.0,
        )
