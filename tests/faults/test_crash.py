"""cachecar killed with kill -9 in the middle of write-behind load, and started again.

The promises under test: a write acknowledged with 202 survives a crash of the proxy and reaches
the origin after the restart (nothing acknowledged is lost, no key goes backwards), and once the
queue has drained, reads through cachecar agree with the origin.

Each client loop owns its keys and writes them one after another, so a key's writes are ordered
by their acknowledgements, and at the kill at most one write per key is in flight: its outcome
is unknown (it may or may not have been queued).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from redis.asyncio.cluster import RedisCluster

from cache.redis.tier import client_from_url
from cache.write_behind.shards import DEFAULT_SHARDS
from tests.e2e.conftest import Config, Spawn, start_origin, start_proxy, until
from tests.faults.conftest import Figures
from tests.faults.harness import DelayProxy, KillableRedis, proxy_config
from tests.redis_keys import drop_prefix
from tests.redis_servers import Deployment

pytestmark = pytest.mark.e2e

WRITERS = 16
KEYS_EACH = 20
LOAD_FOR = 1.5  # seconds of writes before the kill
SLOW_REDIS = 0.1  # seconds a command on a cached entry is held, with slow_redis


@dataclasses.dataclass
class Read:
    status: int
    x_cache: str
    body: bytes


@dataclasses.dataclass
class CrashRun:
    """What one kill -9 under write load left behind, once the restarted proxy drained."""

    acked: dict[str, list[bytes]]  # path -> bodies acknowledged with 202, in order
    unknown: dict[str, bytes]  # path -> the body in flight when the proxy died
    applied: list[dict[str, Any]]  # every write the origin applied, in order
    at_origin: dict[str, bytes | None]  # path written -> what the origin holds (None: nothing)
    via_proxy: dict[str, Read]  # path written -> a read through the restarted proxy
    dead_letters: list[dict[str, Any]]
    depth_at_kill: int
    depth_at_restart: int
    drained_after: float  # seconds from the kill to an empty queue

    def lost(self) -> list[tuple[str, bytes, bytes | None]]:
        """Keys whose origin holds neither the last acknowledged write nor the unacknowledged
        one sent after it: (path, last acknowledged, held)."""
        return [
            (path, bodies[-1], self.at_origin[path])
            for path, bodies in self.acked.items()
            if self.at_origin[path] not in (bodies[-1], self.unknown.get(path))
        ]

    def backwards(self) -> dict[str, list[int]]:
        """Keys whose origin writes went backwards (a resend may repeat the last one)."""
        sent: dict[str, list[int]] = {}
        for write in self.applied:
            sent.setdefault(write["path"], []).append(json.loads(write["body"])["n"])
        return {p: ns for p, ns in sent.items() if any(b < a for a, b in itertools.pairwise(ns))}

    def disagreeing(self) -> dict[str, tuple[Read, bytes | None]]:
        """Keys that read differently through the proxy than at the origin."""
        return {
            path: (read, self.at_origin[path])
            for path, read in self.via_proxy.items()
            if (read.status, read.body) != (200, self.at_origin[path])
        }


async def queue_state(session: aiohttp.ClientSession, admin: str) -> dict[str, Any]:
    async with session.get(admin + "/admin/write-behind") as answer:
        assert answer.status == 200, await answer.text()
        state: dict[str, Any] = await answer.json()
    return state


def wb_config(path: Path, origin: str, redis_url: str, key_prefix: str = "crash:") -> Config:
    # upstream.timeout is short to keep the lease short: keys the killed process had claimed
    # come due again after 2 x (timeout + 1s) + flush_interval = 3.2 s. l2.timeout is long
    # enough for a Redis slowed by SLOW_REDIS.
    return proxy_config(
        path,
        f"""\
        upstream: {{url: "{origin}", timeout: 500ms}}
        l2: {{url: "{redis_url}", key_prefix: "{key_prefix}", timeout: 1s}}
        write_behind: {{flush_interval: 200ms}}
        routes:
          - path: /users/{{id}}
            key: "users:{{id}}"
            mode: write-behind
        """,
    )


async def crash_mid_load(
    spawn: Spawn, tmp_path: Path, *, keys_each: int = KEYS_EACH, slow_redis: bool = False
) -> CrashRun:
    """Write-behind load, kill -9 of the proxy, a fresh proxy on the same config, its queue
    drained; then what the origin and the new proxy answer for every key written.

    ``slow_redis``: the first proxy reaches Redis through a proxy that holds the commands on
    cached entries (keys ``crash:users:*``, not the queue's ``crash:{wb:N}:*``) for SLOW_REDIS
    seconds, and drops them if cachecar dies meanwhile: a write is queued at once and reaches
    L2 only later. The new proxy reaches Redis directly.
    """
    redis = KillableRedis(spawn, tmp_path / "redis")
    await redis.start()
    origin = await start_origin(spawn, db=tmp_path / "origin.sqlite")
    async with contextlib.AsyncExitStack() as stack:
        config = wb_config(tmp_path / "c.yaml", origin.url, redis.url)
        first_config = config
        if slow_redis:
            slow = await stack.enter_async_context(
                DelayProxy(
                    redis.port,
                    SLOW_REDIS,
                    delays=lambda chunk: b"crash:users:" in chunk and b"{wb:" not in chunk,
                    drop_unsent=True,
                )
            )
            slow_url = f"redis://127.0.0.1:{slow.port}/0"
            first_config = wb_config(tmp_path / "first.yaml", origin.url, slow_url)
        return await _crash(spawn, origin.url, first_config, config, keys_each)


async def _crash(
    spawn: Spawn,
    origin: str,
    first_config: Config,
    config: Config,
    keys_each: int,
    after_kill: Callable[[], Awaitable[None]] | None = None,
) -> CrashRun:
    """``after_kill``: looks at what the killed process left, before the restart."""
    first = await start_proxy(spawn, first_config, "first")

    acked: dict[str, list[bytes]] = {}
    unknown: dict[str, bytes] = {}
    refused: list[tuple[str, int, str]] = []
    stopping = False

    async def writer(session: aiohttp.ClientSession, w: int) -> None:
        paths = [f"/users/{w * keys_each + k}" for k in range(keys_each)]
        for n in itertools.count():
            if stopping:
                return
            path = paths[n % keys_each]
            body = json.dumps({"path": path, "writer": w, "n": n}).encode()
            try:
                async with session.put(
                    first.url + path, data=body, headers={"Content-Type": "application/json"}
                ) as answer:
                    text = await answer.text()
                    if answer.status != 202 or answer.headers.get("X-Cache-Write") != "queued":
                        refused.append((path, answer.status, text))
                        return
            except (aiohttp.ClientError, TimeoutError):
                unknown[path] = body  # the proxy died: queued or not, nobody knows
                return
            acked.setdefault(path, []).append(body)

    async with aiohttp.ClientSession() as session:
        writers = [asyncio.create_task(writer(session, w)) for w in range(WRITERS)]
        await asyncio.sleep(LOAD_FOR)
        depth_at_kill = (await queue_state(session, first.admin))["queue_depth"]
        first.process.stop(signal.SIGKILL)
        killed = time.monotonic()
        stopping = True
        await asyncio.wait_for(asyncio.gather(*writers), timeout=10)
        assert refused == [], refused[:3]
        if after_kill is not None:
            await after_kill()

        restarted = await start_proxy(spawn, config, "restarted")
        depth_at_restart = (await queue_state(session, restarted.admin))["queue_depth"]
        state: dict[str, Any] = {}

        async def drained() -> bool:
            nonlocal state
            state = await queue_state(session, restarted.admin)
            return bool(state["queue_depth"] == 0)

        await until(drained, "the restarted proxy's queue drained", within=20)
        drained_after = time.monotonic() - killed

        async with session.get(origin + "/_writes") as answer:
            applied = (await answer.json())["writes"]
        at_origin: dict[str, bytes | None] = {}
        via_proxy: dict[str, Read] = {}
        for path in sorted(set(acked) | set(unknown)):
            async with session.get(origin + path) as answer:
                at_origin[path] = await answer.read() if answer.status == 200 else None
            async with session.get(restarted.url + path) as answer:
                via_proxy[path] = Read(
                    answer.status, answer.headers.get("X-Cache", ""), await answer.read()
                )
    assert restarted.process.stop() == 0
    return CrashRun(
        acked,
        unknown,
        applied,
        at_origin,
        via_proxy,
        state["dead_letters"],
        depth_at_kill,
        depth_at_restart,
        drained_after,
    )


async def test_every_acknowledged_write_reaches_the_origin_after_a_kill_9_mid_load(
    spawn: Spawn, tmp_path: Path, figures: Figures
) -> None:
    run = await crash_mid_load(spawn, tmp_path)
    total = sum(len(bodies) for bodies in run.acked.values())
    lost = run.lost()
    assert total > 0
    assert lost == [], f"{len(lost)} keys lost their acknowledged write, e.g. {lost[:3]}"
    assert run.backwards() == {}, list(run.backwards().items())[:3]
    assert run.dead_letters == []

    holding_acked = [p for p, bodies in run.acked.items() if run.at_origin[p] == bodies[-1]]
    holding_unacked = [p for p, body in run.unknown.items() if run.at_origin[p] == body]
    table = figures("Proxy killed (kill -9) under write-behind load")
    table.add(
        "client loops / keys written (each key by one loop)", f"{WRITERS} / {len(run.at_origin)}"
    )
    table.add(f"writes acknowledged (202) before the kill, in {LOAD_FOR:g} s", total)
    table.add("writes in flight at the kill (outcome unknown)", len(run.unknown))
    table.add("queue depth (keys) just before the kill", run.depth_at_kill)
    table.add("queue depth when the new process started", run.depth_at_restart)
    table.add("kill -> queue drained by the new process", f"{run.drained_after:.1f} s")
    table.add("writes the origin applied (coalesced, resends included)", len(run.applied))
    table.add("keys holding their last acknowledged write", len(holding_acked))
    table.add("keys holding the unacknowledged write in flight at the kill", len(holding_unacked))
    table.add("acknowledged writes lost", len(lost))
    table.add("keys whose origin writes went backwards", len(run.backwards()))
    table.add("dead letters", len(run.dead_letters))
    table.add(
        "keys read through the new proxy differently than the origin holds them",
        len(run.disagreeing()),
    )


async def test_after_a_kill_9_mid_write_reads_agree_with_the_origin_once_drained(
    spawn: Spawn, tmp_path: Path
) -> None:
    """A write in flight at the kill may be queued (and later flushed) without having reached
    L2: the cache must not keep serving the value it replaced once the origin has the new one.

    Redis commands on cached entries are held 100 ms (and dropped if cachecar dies meanwhile),
    the queue's are not, so that at the kill some of the sixteen writers have surely had their
    write queued and not yet put in L2. With Redis at full speed the same happens in most runs, not
    in all (see the figures).
    """
    # Few keys per writer, so the write in flight at the kill replaces one already in L2.
    run = await crash_mid_load(spawn, tmp_path, keys_each=2, slow_redis=True)
    disagreeing = run.disagreeing()
    described = [
        f"{path}: proxy {read.status} {read.x_cache} {read.body!r}, origin {held!r}, "
        f"last acknowledged {run.acked.get(path, [None])[-1]!r}, "
        f"unacknowledged {run.unknown.get(path)!r}"
        for path, (read, held) in list(disagreeing.items())[:3]
    ]
    assert run.lost() == []
    assert disagreeing == {}, (
        f"{len(disagreeing)} of {len(run.via_proxy)} keys read differently through cachecar than "
        "at the origin after the queue drained:\n" + "\n".join(described)
    )


async def test_on_a_cluster_a_kill_9_mid_flush_loses_nothing_and_keeps_each_keys_order(
    spawn: Spawn, tmp_path: Path, redis_cluster: Deployment, key_prefix: str, figures: Figures
) -> None:
    """The queue sharded over the session's three masters. The origin takes 50 ms a write, so
    the flusher always has a batch on its way: the killed process held leases on keys of
    several shards, which the restarted one sends once they run out, each key's writes in order
    (each key lives in one shard, whichever master that is)."""
    origin = await start_origin(spawn, latency="50ms", db=tmp_path / "origin.sqlite")
    config = wb_config(tmp_path / "c.yaml", origin.url, redis_cluster.url, key_prefix)
    cluster = client_from_url(redis_cluster.url, timeout=2.0)
    assert isinstance(cluster, RedisCluster)
    try:
        leased = 0

        async def count_leased() -> None:
            # A key leased to the killed flusher is due a lease (3.2 s) from its claim; one in
            # its coalescing window, at most 200 ms from its write.
            nonlocal leased
            due_after = (time.time() + 1.0) * 1000
            for shard in range(DEFAULT_SHARDS):
                ready = f"{key_prefix}{{wb:{shard}}}:ready"
                leased += await cluster.zcount(ready, due_after, "+inf")

        run = await _crash(spawn, origin.url, config, config, KEYS_EACH, count_leased)
        written = [shard async for shard in _written_shards(cluster, key_prefix)]
        masters = {
            str(cluster.get_node_from_key(f"{key_prefix}{{wb:{shard}}}:seq")) for shard in written
        }
    finally:
        await drop_prefix(cluster, key_prefix)
        await cluster.aclose()
    total = sum(len(bodies) for bodies in run.acked.values())
    table = figures(
        f"Proxy killed (kill -9) mid-flush, the queue in {DEFAULT_SHARDS} shards on 3 masters"
    )
    table.add("client loops / keys written (each key by one loop)", f"{WRITERS} / {len(run.acked)}")
    table.add(f"writes acknowledged (202) before the kill, in {LOAD_FOR:g} s", total)
    table.add("writes in flight at the kill (outcome unknown)", len(run.unknown))
    table.add("queue depth (keys) just before the kill", run.depth_at_kill)
    table.add("keys the killed flusher held leased (being sent)", leased)
    table.add("shards written / masters holding them", f"{len(written)} / {len(masters)}")
    table.add("kill -> queue drained by the new process", f"{run.drained_after:.1f} s")
    table.add("acknowledged writes lost", len(run.lost()))
    table.add("keys whose origin writes went backwards", len(run.backwards()))
    table.add("dead letters", len(run.dead_letters))
    table.add(
        "keys read through the new proxy differently than the origin holds them",
        len(run.disagreeing()),
    )
    assert total > 0
    assert run.depth_at_kill > 0
    assert leased > 0  # killed mid-flush: it held keys it was sending
    assert run.lost() == [], run.lost()[:3]
    assert run.backwards() == {}, list(run.backwards().items())[:3]
    assert run.dead_letters == []
    assert run.disagreeing() == {}
    assert len(masters) == 3  # the writes went to shards on every master


async def _written_shards(cluster: RedisCluster, key_prefix: str) -> AsyncIterator[int]:
    """The shards that were given a write (their seq exists)."""
    for shard in range(DEFAULT_SHARDS):
        if await cluster.exists(f"{key_prefix}{{wb:{shard}}}:seq"):
            yield shard
