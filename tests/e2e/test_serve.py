"""``cachecar serve`` as a user runs it: a real process, a real config file, HTTP."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

import aiohttp
import pytest
from redis.asyncio import Redis

from tests.e2e.conftest import (
    CACHECAR,
    Config,
    Spawn,
    start_origin,
    start_proxy,
    start_redis,
    until,
    wait_http,
    write_config,
)
from tests.ports import free_port


async def get(url: str) -> tuple[int, str, bytes]:
    """Status, X-Cache and body of a GET."""
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, response.headers.get("X-Cache", ""), await response.read()


async def test_miss_then_hit_l1_then_a_clean_stop(spawn: Spawn, tmp_path: Path) -> None:
    origin = await start_origin(spawn)
    await origin.put("/users/1", {"name": "ada"})
    proxy = await start_proxy(spawn, write_config(tmp_path / "c.yaml", origin.url))
    assert await get(proxy.url + "/users/1") == (200, "MISS", b'{"name": "ada"}')
    assert await get(proxy.url + "/users/1") == (200, "HIT-L1", b'{"name": "ada"}')
    assert await origin.count("/users/1") == 1
    assert proxy.process.stop() == 0
    assert "stopped" in proxy.process.output()


@pytest.mark.redis
async def test_a_restarted_proxy_answers_from_l2(
    spawn: Spawn, tmp_path: Path, redis_url: str, key_prefix: str, redis_client: Redis
) -> None:
    origin = await start_origin(spawn)
    await origin.put("/users/1", {"name": "ada"})
    config = write_config(tmp_path / "c.yaml", origin.url, l2=redis_url, key_prefix=key_prefix)
    first = await start_proxy(spawn, config, "first")
    assert (await get(first.url + "/users/1"))[1] == "MISS"
    assert first.process.stop() == 0  # a clean stop waits for the L2 fill
    assert await redis_client.exists(f"{key_prefix}users:1")
    restarted = await start_proxy(spawn, config, "restarted")
    assert await get(restarted.url + "/users/1") == (200, "HIT-L2", b'{"name": "ada"}')
    assert (await get(restarted.url + "/users/1"))[1] == "HIT-L1"
    assert await origin.count("/users/1") == 1


@pytest.mark.redis
async def test_two_proxies_on_one_redis_share_l2(
    spawn: Spawn, tmp_path: Path, redis_url: str, key_prefix: str, redis_client: Redis
) -> None:
    origin = await start_origin(spawn)
    await origin.put("/users/1", {"name": "ada"})
    configs = [
        write_config(tmp_path / f"{name}.yaml", origin.url, l2=redis_url, key_prefix=key_prefix)
        for name in ("a", "b")
    ]
    a = await start_proxy(spawn, configs[0], "a")
    b = await start_proxy(spawn, configs[1], "b")
    assert (await get(a.url + "/users/1"))[1] == "MISS"
    for _ in range(100):  # the fill reaches L2 just after A answers
        if await redis_client.exists(f"{key_prefix}users:1"):
            break
        await asyncio.sleep(0.01)
    assert await get(b.url + "/users/1") == (200, "HIT-L2", b'{"name": "ada"}')
    assert await origin.count("/users/1") == 1


async def test_500_concurrent_gets_on_a_cold_key_make_one_origin_request(
    spawn: Spawn, tmp_path: Path
) -> None:
    origin = await start_origin(spawn, latency="300ms")
    await origin.put("/users/42", {"hot": True})
    proxy = await start_proxy(spawn, write_config(tmp_path / "c.yaml", origin.url))
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one() -> tuple[int, str]:
            async with session.get(proxy.url + "/users/42") as response:
                await response.read()
                return response.status, response.headers["X-Cache"]

        results = await asyncio.gather(*(one() for _ in range(500)))
    assert {status for status, _ in results} == {200}
    assert await origin.count("/users/42") == 1


async def test_reads_keep_answering_while_redis_is_killed_and_use_it_again_when_back(
    spawn: Spawn, tmp_path: Path
) -> None:
    port = free_port()
    redis_process = start_redis(spawn, port)
    origin = await start_origin(spawn)
    for n in range(20):
        await origin.put(f"/users/{n}", {"n": n})
    config = write_config(
        tmp_path / "c.yaml",
        origin.url,
        l2=f"redis://127.0.0.1:{port}/0",
        extra="l1: {ttl: 1s}\n",
    )
    proxy = await start_proxy(spawn, config)
    statuses: list[int] = []
    outcomes: list[str] = []

    async def read_for(seconds: float) -> None:
        for round_ in range(int(seconds / 0.05)):
            status, outcome, _ = await get(f"{proxy.url}/users/{round_ % 20}")
            statuses.append(status)
            outcomes.append(outcome)
            await asyncio.sleep(0.05)

    await read_for(1.0)
    assert "MISS" in outcomes
    redis_process.stop(signal.SIGKILL)
    await read_for(2.5)  # past the breaker opening, and past L1's TTL
    assert set(statuses) == {200}, f"{statuses.count(200)} of {len(statuses)} were 200"

    start_redis(spawn, port, "redis-again")
    outcomes.clear()
    for _ in range(100):  # the breaker probes every second; fills then hits reach L2 again
        await read_for(0.5)
        if "HIT-L2" in outcomes:
            break
    assert "HIT-L2" in outcomes
    assert set(statuses) == {200}
    assert proxy.process.stop() == 0


async def test_sigterm_finishes_requests_in_flight(spawn: Spawn, tmp_path: Path) -> None:
    origin = await start_origin(spawn, latency="1s")
    await origin.put("/users/1", {"slow": True})
    proxy = await start_proxy(spawn, write_config(tmp_path / "c.yaml", origin.url))
    in_flight = asyncio.create_task(get(proxy.url + "/users/1"))
    await asyncio.sleep(0.3)
    proxy.process.popen.send_signal(signal.SIGTERM)
    proxy.process.popen.send_signal(signal.SIGTERM)  # impatience must not cut the stop short
    assert await in_flight == (200, "MISS", b'{"slow": true}')
    assert await asyncio.to_thread(proxy.process.wait) == 0


async def test_cachecar_starts_without_redis_and_uses_it_once_it_answers(
    spawn: Spawn, tmp_path: Path
) -> None:
    origin = await start_origin(spawn)
    await origin.put("/users/1", {})
    redis_port = free_port()
    config = write_config(tmp_path / "c.yaml", origin.url, l2=f"redis://127.0.0.1:{redis_port}")
    proxy = await start_proxy(spawn, config)
    # Without Redis it cannot hear other replicas' writes: L1 answers in degraded mode, each
    # entry for coherence.degraded_ttl (1s) at most.
    assert (await get(proxy.url + "/users/1"))[:2] == (200, "MISS")
    assert (await get(proxy.url + "/users/1"))[:2] == (200, "HIT-L1")
    status, _, body = await get(proxy.admin + "/readyz")
    assert status == 503
    assert json.loads(body)["l2"].startswith("ping: ")
    assert json.loads(body)["coherence"] == "degraded"

    start_redis(spawn, redis_port)

    async def ready() -> bool:
        status, _, body = await get(proxy.admin + "/readyz")
        return status == 200 and json.loads(body)["coherence"] == "subscribed"

    await until(ready, "ready and subscribed once Redis is there", within=15)
    # L1 was emptied on subscribing (it may hold what an unheard write replaced).
    assert (await get(proxy.url + "/users/1"))[1] in {"MISS", "HIT-L2"}
    assert (await get(proxy.url + "/users/1"))[1] == "HIT-L1"


async def with_access_log(spawn: Spawn, tmp_path: Path) -> Config:
    """A config with server.access_log on, in front of an origin holding /users/1."""
    origin = await start_origin(spawn)
    await origin.put("/users/1", {"name": "ada"})
    config = write_config(tmp_path / "c.yaml", origin.url)
    text = config.path.read_text().replace(
        "shutdown_grace: 5s}", "shutdown_grace: 5s, access_log: true}"
    )
    config.path.write_text(text)
    return config


async def test_the_access_log_is_json_lines_on_stdout_apart_from_the_diagnostics(
    spawn: Spawn, tmp_path: Path
) -> None:
    config = await with_access_log(spawn, tmp_path)
    out = tmp_path / "stdout"
    proxy = spawn("proxy", [CACHECAR, "serve", "-c", str(config.path)], stdout=out)
    await wait_http(config.admin + "/healthz", proxy)
    assert (await get(config.url + "/users/1"))[1] == "MISS"
    assert (await get(config.url + "/users/1?x=1"))[1] == "MISS"
    assert (await get(config.url + "/users/1"))[1] == "HIT-L1"
    assert proxy.stop() == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(line["path"], line["outcome"], line["status"]) for line in lines] == [
        ("/users/1", "miss", 200),
        ("/users/1", "miss", 200),
        ("/users/1", "hit_l1", 200),
    ]
    assert {line["route"] for line in lines} == {"/users/{id}"}
    diagnostics = proxy.output()  # stderr
    assert "stopped" in diagnostics
    assert '"outcome"' not in diagnostics


async def test_an_access_log_nobody_reads_never_stalls_the_proxy(
    spawn: Spawn, tmp_path: Path
) -> None:
    config = await with_access_log(spawn, tmp_path)
    unread, stdout = os.pipe()  # a pipe holds 64 KiB: a few hundred lines, then it is full
    try:
        proxy = spawn(
            "proxy", [CACHECAR, "serve", "-c", str(config.path)], stdout=Path(f"/dev/fd/{stdout}")
        )
        await wait_http(config.admin + "/healthz", proxy)
        timeout = aiohttp.ClientTimeout(total=5)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            for _ in range(2000):  # about 400 KiB of log lines
                async with session.get(config.url + "/users/1") as response:
                    assert response.status == 200
            async with session.get(config.admin + "/healthz") as response:
                assert response.status == 200
        assert proxy.stop() == 0
        assert "access log: " in proxy.output()  # the lines it had to drop, counted
    finally:
        os.close(unread)
        os.close(stdout)
