"""Redis URLs: what each form builds, and that every client is bounded and never retries."""

from __future__ import annotations

import asyncio
import time

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import SSLConnection
from redis.exceptions import ConnectionError as RedisConnectionError

from cache.entry import Entry
from cache.errors import TierUnavailable
from cache.redis.client import Kind, SentinelClient, parse_redis_url, subscriber_factory
from cache.redis.tier import RedisTier, client_from_url
from tests.ports import free_port, silent_port
from tests.redis_servers import Deployment

ENTRY = Entry(200, (("Content-Type", "text/plain"),), b"hello", 1_700_000_000.0, 60.0)


def test_the_forms_parse_into_their_parts() -> None:
    cluster = parse_redis_url("rediss+cluster://u:p%40ss@a:7000,[::1]:7001,b?ssl_cert_reqs=none")
    assert (cluster.kind, cluster.tls, cluster.userinfo) == (Kind.CLUSTER, True, "u:p%40ss@")
    assert cluster.seeds == (("a", 7000), ("::1", 7001), ("b", 6379))
    assert cluster.node_url("::1", 7001) == "rediss://u:p%40ss@[::1]:7001/0?ssl_cert_reqs=none"
    sentinel = parse_redis_url("redis+sentinel://s1,s2:26380/mymaster/3")
    assert (sentinel.kind, sentinel.service, sentinel.db) == (Kind.SENTINEL, "mymaster", 3)
    assert sentinel.seeds == (("s1", 26379), ("s2", 26380))
    assert parse_redis_url("rediss://h:6380/1").kind is Kind.SINGLE
    assert parse_redis_url("memory://").kind is Kind.MEMORY


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis+cluster://", "'' is not host:port"),
        ("redis+cluster://h:7000/1", "database 0 only"),
        ("redis+sentinel://h", "name the master's service"),
        ("redis+sentinel://h/m/1/2", "'/1/2' is not a database number"),
        ("redis://h/0?socket_timeout=soon", "Invalid value for 'socket_timeout'"),
        ("redis+cluster://h?socket_timeout=soon", "Invalid value for 'socket_timeout'"),
        ("h:6379", "is not a Redis URL"),
    ],
)
def test_a_bad_url_says_what_is_wrong(url: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_redis_url(url)


async def test_a_cluster_client_knows_every_seed_and_only_reconnects_once() -> None:
    client = client_from_url("rediss+cluster://a:7000,b:7001", timeout=0.25)
    assert isinstance(client, RedisCluster)
    seeds = {(node.host, node.port) for node in client.nodes_manager.startup_nodes.values()}
    assert seeds == {("a", 7000), ("b", 7001)}
    # One more try on a new connection after a broken one; never after a timeout.
    assert client.retry.get_retries() == 1
    assert client.retry._supported_errors == (RedisConnectionError,)
    assert client.connection_kwargs["connection_class"] is SSLConnection
    assert client.connection_kwargs["socket_timeout"] == 0.25
    await client.aclose()


async def test_the_subscription_of_a_cluster_takes_the_next_seed_each_time() -> None:
    make = subscriber_factory("redis+cluster://a:7000,b:7001", name="n", timeout=1.0)
    addresses = []
    for _ in range(3):
        client = make()
        kwargs = client.connection_pool.connection_kwargs
        addresses.append((kwargs["host"], kwargs["port"], kwargs["client_name"]))
        await client.aclose()
    assert addresses == [("a", 7000, "n"), ("b", 7001, "n"), ("a", 7000, "n")]


@pytest.mark.parametrize(
    "url",
    [
        "redis+cluster://127.0.0.1:{port}",
        "redis+cluster://127.0.0.1:{port},127.0.0.1:{port}",
        "redis+sentinel://127.0.0.1:{port}/mymaster",
    ],
)
async def test_a_dead_deployment_is_unavailable_at_once(url: str) -> None:
    client = client_from_url(url.format(port=free_port()), timeout=0.5)
    tier = RedisTier(client, key_prefix="t:", timeout=0.5)
    started = time.monotonic()
    for call in (tier.get("k"), tier.set("k", "", ENTRY, 5), tier.delete("k"), tier.ping()):
        with pytest.raises(TierUnavailable):
            await call
    with pytest.raises(TierUnavailable):
        async for _ in tier.keys_with_prefix("k"):
            pass
    assert time.monotonic() - started < 1.0  # refused, not waited out: no retries, no backoff
    await tier.aclose()


@pytest.mark.parametrize(
    "url", ["redis+cluster://127.0.0.1:{port}", "redis+sentinel://127.0.0.1:{port}/mymaster"]
)
async def test_a_deployment_that_never_answers_is_cut_off_at_the_timeout(url: str) -> None:
    async with silent_port() as port:
        client = client_from_url(url.format(port=port), timeout=0.05)
        tier = RedisTier(client, key_prefix="t:", timeout=0.05)
        started = time.monotonic()
        with pytest.raises(TierUnavailable):
            await tier.get("k")
        assert time.monotonic() - started < 0.5
        await tier.aclose()


async def test_a_cluster_is_found_from_any_seed_that_answers(redis_cluster: Deployment) -> None:
    live = redis_cluster.url.removeprefix("redis+cluster://")
    client = client_from_url(f"redis+cluster://127.0.0.1:{free_port()},{live}", timeout=1.0)
    tier = RedisTier(client, key_prefix=f"t:{free_port()}:", timeout=1.0)
    try:
        await tier.ping()  # the dead seed refuses; the live one is asked next
        await tier.set("k", "", ENTRY, 5)
        assert await tier.get("k") is not None
        await tier.delete("k")
    finally:
        await tier.aclose()


async def test_sentinel_finds_the_master_and_closing_closes_the_sentinels_too(
    redis_sentinel: Deployment,
) -> None:
    client = client_from_url(redis_sentinel.url, timeout=1.0)
    assert isinstance(client, SentinelClient)
    await client.set("cachecar-test:sentinel", b"1", px=5_000)
    async with Redis.from_url(redis_sentinel.node_url) as master:
        assert await master.get("cachecar-test:sentinel") == b"1"
        await master.delete("cachecar-test:sentinel")
    assert client.sentinels_asked is not None
    [asked] = client.sentinels_asked.sentinels
    await client.aclose()
    assert asked.connection_pool._in_use_connections == set()
    assert all(not c.is_connected for c in asked.connection_pool._available_connections)


@pytest.mark.redis
async def test_new_connections_do_not_look_up_package_metadata(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # redis-py reads its version from the package metadata for each connection it opens unless
    # told it: about a millisecond of the event loop per connection, paid all at once when a
    # burst grows the pool. cachecar tells it once.
    client = client_from_url(redis_url, timeout=1.0)

    def looked_up() -> str:
        raise AssertionError("package metadata read for a new connection")

    monkeypatch.setattr("redis.utils.get_lib_version", looked_up)
    monkeypatch.setattr("redis.driver_info.get_lib_version", looked_up, raising=False)
    try:
        # At once: one connection each.
        assert await asyncio.gather(*(client.ping() for _ in range(20))) == [True] * 20
    finally:
        await client.aclose()
