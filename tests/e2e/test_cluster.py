"""``cachecar serve`` on a real Redis Cluster (``l2.url: redis+cluster://``), as a user runs it.

One route, write-behind, on the session's three-master cluster: a miss is filled into the
cluster, a restarted proxy finds it there (HIT-L2), a queued write reaches the origin, and a
purge by prefix finds the keys of every node. A queue an older cachecar left in one slot is
drained into the shards at start.
"""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
from redis.asyncio.cluster import RedisCluster

from cache.clock import SystemClock
from cache.redis.tier import client_from_url
from cache.write_behind.shards import DEFAULT_SHARDS, shard_of
from tests.cache.test_migration import OldQueue
from tests.e2e.conftest import Config, Spawn, start_origin, start_proxy, until, write_config
from tests.redis_keys import drop_prefix
from tests.redis_servers import Deployment

TOKEN = "cluster-token"


def cluster_config(
    tmp_path: Path, origin: str, cluster: Deployment, key_prefix: str, write_behind: str = ""
) -> Config:
    """One write-behind route on the cluster, under this test's key prefix and channel;
    ``write_behind``: more of its keys (``reshard: true``)."""
    return write_config(
        tmp_path / "c.yaml",
        origin,
        l2=cluster.url,
        key_prefix=key_prefix,
        mode="write-behind",
        admin_token=TOKEN,
        extra=(
            f'coherence: {{channel: "{key_prefix}invalidate"}}\n'
            f"write_behind: {{flush_interval: 100ms{write_behind}}}\n"
        ),
    )


async def test_serve_on_a_cluster_reads_writes_behind_and_purges(
    spawn: Spawn, tmp_path: Path, redis_cluster: Deployment, key_prefix: str
) -> None:
    cluster = client_from_url(redis_cluster.url, timeout=2.0)
    assert isinstance(cluster, RedisCluster)
    origin = await start_origin(spawn)
    await origin.put("/users/1", {"name": "ada"})
    config = cluster_config(tmp_path, origin.url, redis_cluster, key_prefix)
    try:
        async with aiohttp.ClientSession() as session:

            async def get(proxy_url: str, path: str) -> tuple[int, str, object]:
                async with session.get(proxy_url + path) as response:
                    return response.status, response.headers["X-Cache"], await response.json()

            first = await start_proxy(spawn, config, "first")
            assert await get(first.url, "/users/1") == (200, "MISS", {"name": "ada"})
            assert first.process.stop() == 0  # a clean stop waits for the fill of L2
            assert await cluster.exists(f"{key_prefix}users:1") == 1

            proxy = await start_proxy(spawn, config, "restarted")
            async with session.get(proxy.admin + "/readyz") as ready:
                assert ready.status == 200, await ready.text()
            assert await get(proxy.url, "/users/1") == (200, "HIT-L2", {"name": "ada"})
            assert await origin.count("/users/1") == 1

            async with session.put(proxy.url + "/users/2", json={"name": "bob"}) as written:
                assert written.status == 202
                assert written.headers["X-Cache-Write"] == "queued"
            assert await get(proxy.url, "/users/2") == (200, "HIT-L1", {"name": "bob"})

            async def flushed() -> bool:
                async with session.get(origin.url + "/users/2") as answer:
                    return answer.status == 200 and await answer.json() == {"name": "bob"}

            await until(flushed, "the queued write of /users/2 reached the origin")
            # The write's shard exists (its sequence number at least), its keys in one slot.
            shard = shard_of("users:2", DEFAULT_SHARDS)
            queue_keys = [
                key async for key in cluster.scan_iter(match=f"{key_prefix}{{wb:{shard}}}:*")
            ]
            assert queue_keys
            assert len({cluster.keyslot(key) for key in queue_keys}) == 1

            async with session.post(
                proxy.admin + "/admin/purge",
                json={"prefix": "users:"},
                headers={"Authorization": f"Bearer {TOKEN}"},
            ) as purged:
                assert (purged.status, await purged.json()) == (200, {"purged": 2})
            assert await get(proxy.url, "/users/1") == (200, "MISS", {"name": "ada"})
            assert await get(proxy.url, "/users/2") == (200, "MISS", {"name": "bob"})
            assert await origin.count("/users/1") == 2
            assert proxy.process.stop() == 0
    finally:
        await drop_prefix(cluster, key_prefix)
        await cluster.aclose()


async def test_a_queue_left_by_an_older_cachecar_reaches_the_origin_from_the_shards(
    spawn: Spawn, tmp_path: Path, redis_cluster: Deployment, key_prefix: str
) -> None:
    """The older queue's one slot and the shards' slots are on different masters: each write is
    copied, then dropped from the old slot, by the start of a proxy with write_behind.reshard;
    all reach the origin."""
    cluster = client_from_url(redis_cluster.url, timeout=2.0)
    old = OldQueue(cluster, key_prefix, SystemClock())
    written = {f"/users/{n}": json.dumps({"n": n}).encode() for n in range(40)}
    for path, body in written.items():
        await old.enqueue(path.strip("/").replace("/", ":"), body)
    origin = await start_origin(spawn)
    # The only replica (an upgrade with every older one stopped): it moves the queue.
    config = cluster_config(
        tmp_path, origin.url, redis_cluster, key_prefix, write_behind=", reshard: true"
    )
    try:
        proxy = await start_proxy(spawn, config)
        async with aiohttp.ClientSession() as session:

            async def arrived() -> bool:
                for path, body in written.items():
                    async with session.get(origin.url + path) as answer:
                        if answer.status != 200 or await answer.read() != body:
                            return False
                return True

            async def drained() -> bool:
                async with session.get(proxy.admin + "/admin/write-behind") as answer:
                    state = await answer.json()
                return (state["queue_depth"], state["dead_letter_count"]) == (0, 0)

            await until(arrived, "every write of the older queue reached the origin")
            await until(drained, "the queue drained, nothing dead-lettered")
        left = [key async for key in cluster.scan_iter(match=f"{key_prefix}{{wb}}*")]
        # The floor of the shards' seqs, and the shard count the queue is laid out in.
        assert sorted(left) == [old.layout["seq"].encode(), f"{key_prefix}{{wb}}:shards".encode()]
        assert proxy.process.stop() == 0
    finally:
        await drop_prefix(cluster, key_prefix)
        await cluster.aclose()
