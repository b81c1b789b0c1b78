"""``cachecar serve`` started while its Redis is not there: it serves from L1 and the origin,
says it is not ready because of L2, refuses write-behind writes it cannot make durable, and
uses Redis as soon as a redis-server comes up on that port.

The processes are real (cachecar, the demo origin, a redis-server of the test's own); every
wait polls with a deadline. One replica with coherence off: with coherence on, L1 serves in
degraded mode until the subscription is up (``test_serve`` and ``tests/faults/test_degraded``).
"""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp

from tests.e2e.conftest import (
    Config,
    Proxy,
    Spawn,
    start_origin,
    start_proxy,
    start_redis,
    until,
    write_config,
)
from tests.ports import free_port

# A short L1 TTL, so a key filled once Redis is back is soon answered from L2.
EXTRA = "l1: {ttl: 1s}\ncoherence: {enabled: false}\n"
# write_config's breaker: failures 3, reset_after 1s; l2.timeout 100ms.


async def get(session: aiohttp.ClientSession, url: str) -> tuple[int, str, bytes]:
    """Status, X-Cache and body of a GET."""
    async with session.get(url) as response:
        return response.status, response.headers.get("X-Cache", ""), await response.read()


async def readiness(session: aiohttp.ClientSession, proxy: Proxy) -> tuple[int, dict[str, str]]:
    async with session.get(proxy.admin + "/readyz") as response:
        return response.status, await response.json()


async def breaker_gauge(session: aiohttp.ClientSession, proxy: Proxy) -> float:
    async with session.get(proxy.admin + "/metrics") as response:
        text = await response.text()
    for line in text.splitlines():
        if line.startswith("cachecar_l2_breaker_open "):
            return float(line.split()[1])
    raise AssertionError(f"no cachecar_l2_breaker_open in /metrics:\n{text}")


async def breaker_opens(session: aiohttp.ClientSession, proxy: Proxy) -> None:
    """Until /readyz says L2 is skipped (each failing ping counts towards opening it)."""

    async def skipped() -> bool:
        status, body = await readiness(session, proxy)
        assert status == 503, body
        return body["l2"].endswith("(circuit breaker open)")

    await until(skipped, "the L2 breaker open", within=10)


async def ready_again(session: aiohttp.ClientSession, proxy: Proxy) -> None:
    """Until /readyz is 200 and the breaker closed: once ``reset_after`` has passed, a ping
    of /readyz (or any other call) is the probe that closes it."""

    async def ready() -> bool:
        if (await readiness(session, proxy))[0] != 200:
            return False
        return await breaker_gauge(session, proxy) == 0

    await until(ready, "/readyz 200 and the breaker closed", within=20, every=0.2)


def config_without_redis(tmp_path: Path, origin: str, **kwargs: str) -> tuple[Config, int]:
    """A config whose L2 is a port nothing listens on (yet)."""
    port = free_port()
    extra = EXTRA + kwargs.pop("extra", "")
    config = write_config(
        tmp_path / "c.yaml", origin, l2=f"redis://127.0.0.1:{port}/0", extra=extra, **kwargs
    )
    return config, port


async def test_starts_without_redis_serves_from_l1_and_the_origin_and_uses_redis_once_it_is_up(
    spawn: Spawn, tmp_path: Path
) -> None:
    origin = await start_origin(spawn)
    for n in range(10):
        await origin.put(f"/users/{n}", {"n": n})
    config, redis_port = config_without_redis(tmp_path, origin.url)
    proxy = await start_proxy(spawn, config)  # it waits for /healthz: the start did not fail
    statuses: list[int] = []
    async with aiohttp.ClientSession() as session:
        async with session.get(proxy.admin + "/healthz") as alive:
            assert alive.status == 200

        assert await get(session, proxy.url + "/users/1") == (200, "MISS", b'{"n": 1}')
        assert await get(session, proxy.url + "/users/1") == (200, "HIT-L1", b'{"n": 1}')
        status, body = await readiness(session, proxy)
        assert status == 503
        assert body["origin"] == "up"
        assert body["reason"].startswith("l2: ")
        await breaker_opens(session, proxy)
        assert await breaker_gauge(session, proxy) == 1
        for n in range(2, 6):  # reads go on, from the origin then L1: nothing waits for Redis
            for expected in ("MISS", "HIT-L1"):
                status, outcome, _ = await get(session, f"{proxy.url}/users/{n}")
                statuses.append(status)
                assert outcome == expected

        start_redis(spawn, redis_port)
        await ready_again(session, proxy)

        # A key filled now lands in L2: once L1's second is over, L2 answers it.
        status, outcome, _ = await get(session, proxy.url + "/users/7")
        assert (status, outcome) == (200, "MISS")
        outcomes: list[str] = []

        async def from_l2() -> bool:
            status, outcome, body = await get(session, proxy.url + "/users/7")
            statuses.append(status)
            outcomes.append(outcome)
            assert body == b'{"n": 7}'
            return outcome == "HIT-L2"

        await until(from_l2, "users/7 answered from L2", within=15, every=0.2)
        assert set(outcomes) <= {"HIT-L1", "HIT-L2"}
        assert await origin.count("/users/7") == 1
    assert set(statuses) == {200}
    assert "Traceback" not in proxy.process.output()
    assert proxy.process.stop() == 0


async def origin_writes(session: aiohttp.ClientSession, origin: str, path: str) -> list[str]:
    """The bodies of the writes of ``path`` the origin applied, in order."""
    async with session.get(origin + "/_writes", params={"path": path}) as response:
        found = await response.json()
    return [write["body"] for write in found["writes"]]


async def test_a_write_behind_put_without_redis_is_refused_and_once_redis_is_up_is_queued(
    spawn: Spawn, tmp_path: Path
) -> None:
    origin = await start_origin(spawn)
    await origin.put("/users/1", {"v": 0})
    # A long queue timeout: a refusal that came from it would take 5s, not the breaker's none.
    config, redis_port = config_without_redis(
        tmp_path,
        origin.url,
        mode="write-behind",
        extra="write_behind: {flush_interval: 200ms, timeout: 5s}\n",
    )
    proxy = await start_proxy(spawn, config)
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession() as session:
        assert (await get(session, proxy.url + "/users/1"))[:2] == (200, "MISS")
        await breaker_opens(session, proxy)
        details = []
        for n in (1, 2):  # one of two may be a probe (refused by Redis); never both
            body = json.dumps({"v": n}).encode()
            async with session.put(proxy.url + "/users/1", data=body, headers=headers) as put:
                assert put.status == 503, await put.text()
                assert put.headers["Retry-After"] == "1"
                assert "X-Cache-Write" not in put.headers
                answer = await put.json()
            assert answer["error"] == "write-behind queue unavailable"
            details.append(answer["detail"])
        assert any(d.endswith("queue enqueue: circuit breaker open") for d in details), details
        # Never acknowledged, so never read back, and nothing reaches the origin.
        assert await get(session, proxy.url + "/users/1") == (200, "HIT-L1", b'{"v": 0}')
        assert await origin_writes(session, origin.url, "/users/1") == ['{"v": 0}']

        start_redis(spawn, redis_port)
        await ready_again(session, proxy)
        async with session.put(proxy.url + "/users/1", data=b'{"v": 3}', headers=headers) as put:
            assert (put.status, put.headers.get("X-Cache-Write")) == (202, "queued")
        assert (await get(session, proxy.url + "/users/1"))[2] == b'{"v": 3}'

        async def flushed() -> bool:
            return (await origin_writes(session, origin.url, "/users/1"))[-1] == '{"v": 3}'

        await until(flushed, "the queued write at the origin", within=10)
        # The refused writes never got there, before or after.
        assert await origin_writes(session, origin.url, "/users/1") == ['{"v": 0}', '{"v": 3}']
    assert proxy.process.stop() == 0
