"""``cachecar serve`` on a real Redis Cluster (``l2.url: redis+cluster://``), as a user runs it.

One route, write-behind, on the session's three-master cluster: a miss is filled into the
cluster, a restarted proxy finds it there (HIT-L2), a queued write reaches the origin, and a
purge by prefix finds the keys of every node.
"""

from __future__ import annotations

from pathlib import Path

import aiohttp
from redis.asyncio.cluster import RedisCluster

from cache.redis.tier import client_from_url
from tests.e2e.conftest import Spawn, start_origin, start_proxy, until, write_config
from tests.redis_keys import drop_prefix
from tests.redis_servers import Deployment

TOKEN = "cluster-token"


async def test_serve_on_a_cluster_reads_writes_behind_and_purges(
    spawn: Spawn, tmp_path: Path, redis_cluster: Deployment, key_prefix: str
) -> None:
    cluster = client_from_url(redis_cluster.url, timeout=2.0)
    assert isinstance(cluster, RedisCluster)
    origin = await start_origin(spawn)
    await origin.put("/users/1", {"name": "ada"})
    config = write_config(
        tmp_path / "c.yaml",
        origin.url,
        l2=redis_cluster.url,
        key_prefix=key_prefix,
        mode="write-behind",
        admin_token=TOKEN,
        extra=(
            f'coherence: {{channel: "{key_prefix}invalidate"}}\n'
            "write_behind: {flush_interval: 100ms}\n"
        ),
    )
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
            # The queue's keys exist (its sequence number at least), all in one slot.
            queue_keys = [key async for key in cluster.scan_iter(match=f"{key_prefix}{{wb}}:*")]
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
