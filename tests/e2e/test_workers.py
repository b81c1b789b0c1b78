"""``server.workers: 3``: three processes on one port, one cachecar to the outside.

The kernel spreads connections over the workers (SO_REUSEPORT); each is a replica with its own
L1, kept coherent over Redis like replicas on separate hosts. The supervisor answers the admin
listener with every worker's figures added up, restarts a worker that dies, and counters never
go backwards across that.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from tests.e2e.conftest import (
    CACHECAR,
    Config,
    Proxy,
    Spawn,
    start_origin,
    start_proxy,
    until,
    write_config,
)
from tests.ports import free_port

pytestmark = pytest.mark.redis

TOKEN = "workers-token"
WORKERS = 3


async def get(session: aiohttp.ClientSession, url: str) -> tuple[str, object]:
    # A connection of its own each time, so the kernel may hand it to any worker.
    async with session.get(url, headers={"Connection": "close"}) as response:
        assert response.status == 200, await response.text()
        return response.headers["X-Cache"], json.loads(await response.read())


async def metric(session: aiohttp.ClientSession, admin: str, name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels``."""
    async with session.get(admin + "/metrics") as response:
        text = await response.text()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


async def worker_pids(session: aiohttp.ClientSession, admin: str) -> list[int]:
    async with session.get(admin + "/admin/stats") as response:
        stats = await response.json()
    return [w["pid"] for w in stats["workers"] if w["up"]]


async def start_workers(
    spawn: Spawn, tmp_path: Path, redis_url: str, key_prefix: str
) -> tuple[Config, Proxy]:
    origin = await start_origin(spawn)
    for n in range(20):
        await origin.put(f"/users/{n}", {"v": "initial"})
    config = write_config(
        tmp_path / "c.yaml",
        origin.url,
        l2=redis_url,
        key_prefix=key_prefix,
        admin_token=TOKEN,
        extra=f'coherence: {{channel: "{key_prefix}invalidate"}}\n',
    )
    text = config.path.read_text().replace(
        "shutdown_grace: 5s}", f"shutdown_grace: 5s, workers: {WORKERS}}}"
    )
    config.path.write_text(text)
    proxy = await start_proxy(spawn, config)
    return config, proxy


async def test_workers_share_the_port_stay_coherent_and_add_up_their_figures(
    spawn: Spawn, tmp_path: Path, redis_url: str, key_prefix: str, redis_client: Redis
) -> None:
    config, proxy = await start_workers(spawn, tmp_path, redis_url, key_prefix)
    async with aiohttp.ClientSession() as session:
        pids = await worker_pids(session, config.admin)
        assert len(set(pids)) == WORKERS
        sent = 0
        for _ in range(60):  # every worker fills its own L1 with /users/1
            await get(session, config.url + "/users/1")
            sent += 1
        hits = await metric(session, config.admin, "cachecar_requests_total")
        assert hits == sent  # every worker's requests, added up
        # The key sits in the L1 of more than one worker: the connections were spread.
        assert await metric(session, config.admin, "cachecar_l1_entries") >= 2

        async with session.put(config.url + "/users/1", json={"v": "new"}) as response:
            assert response.status == 200
        sent += 1
        for _ in range(30):  # whichever worker answers, never the old value
            assert (await get(session, config.url + "/users/1"))[1] == {"v": "new"}
            sent += 1
        assert await metric(session, config.admin, "cachecar_requests_total") == sent
        async with session.get(config.admin + "/admin/stats") as response:
            stats = await response.json()
        assert stats["requests_total"]["total"] == sent
        coherence = stats["coherence"]
        assert (coherence["enabled"], coherence["subscribed"]) == (True, True)
        assert (coherence["state"], coherence["degraded_ttl_seconds"]) == ("subscribed", 1.0)
    assert proxy.process.stop() == 0  # SIGTERM: the workers stop with the supervisor
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


async def test_a_worker_killed_is_restarted_and_counters_never_go_backwards(
    spawn: Spawn, tmp_path: Path, redis_url: str, key_prefix: str, redis_client: Redis
) -> None:
    config, proxy = await start_workers(spawn, tmp_path, redis_url, key_prefix)
    async with aiohttp.ClientSession() as session:
        for n in range(30):
            await get(session, config.url + f"/users/{n % 20}")
        before = await metric(session, config.admin, "cachecar_requests_total")
        assert before == 30
        pids = await worker_pids(session, config.admin)
        os.kill(pids[0], signal.SIGKILL)

        async def replaced() -> bool:
            now = await worker_pids(session, config.admin)
            return len(now) == WORKERS and pids[0] not in now

        await until(replaced, "the killed worker replaced", within=15)
        assert await metric(session, config.admin, "cachecar_requests_total") >= before
        for n in range(30):  # the port keeps answering all along
            await get(session, config.url + f"/users/{n % 20}")
        assert await metric(session, config.admin, "cachecar_requests_total") >= before + 30
        async with session.get(config.admin + "/admin/stats") as response:
            stats = await response.json()
        assert [w["restarts"] for w in stats["workers"]].count(1) == 1
        # The dead worker's requests still count, as last read from it.
        assert stats["requests_total"]["total"] == 60
        assert await metric(session, config.admin, "cachecar_requests_total") == 60

        # A purge through the supervisor reaches every worker's L1.
        assert await metric(session, config.admin, "cachecar_l1_entries") > 0
        async with session.post(
            config.admin + "/admin/purge",
            json={"prefix": "users:"},
            headers={"Authorization": f"Bearer {TOKEN}"},
        ) as response:
            assert response.status == 200
            assert (await response.json())["purged"] == 20

        async def emptied() -> bool:
            return await metric(session, config.admin, "cachecar_l1_entries") == 0

        await until(emptied, "every worker's L1 purged")
    assert "exited (killed by SIGKILL)" in proxy.process.output()


async def test_workers_stop_by_themselves_when_the_supervisor_is_killed(
    spawn: Spawn, tmp_path: Path, redis_url: str, key_prefix: str, redis_client: Redis
) -> None:
    config, proxy = await start_workers(spawn, tmp_path, redis_url, key_prefix)
    async with aiohttp.ClientSession() as session:
        pids = await worker_pids(session, config.admin)
    proxy.process.popen.send_signal(signal.SIGKILL)  # no time to stop anyone

    async def all_gone() -> bool:
        for pid in pids:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                continue
            return False
        return True

    await until(all_gone, "the orphaned workers stopped", within=15)


async def test_a_second_cachecar_cannot_share_the_port_and_readyz_counts_the_workers(
    spawn: Spawn, tmp_path: Path, redis_url: str, key_prefix: str, redis_client: Redis
) -> None:
    config, _ = await start_workers(spawn, tmp_path, redis_url, key_prefix)
    async with aiohttp.ClientSession() as session, session.get(config.admin + "/readyz") as r:
        assert r.status == 200
        ready = await r.json()
        assert ready["workers"] == f"{WORKERS} of {WORKERS} up"
        assert ready["coherence"] == "subscribed"  # every worker's
    # The same proxy port, another admin port: SO_REUSEPORT must not let it join in.
    other = tmp_path / "other.yaml"
    admin = config.admin.removeprefix("http://")
    free = f"127.0.0.1:{free_port()}"
    other.write_text(config.path.read_text().replace(f'"{admin}"', f'"{free}"'))
    second = spawn("second", [CACHECAR, "serve", "-c", str(other)])
    assert second.wait(within=20) == 1
    assert "cannot listen on" in second.output()
