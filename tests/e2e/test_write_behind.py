"""Write-behind as a user runs it: real ``cachecar serve`` and ``cachecar origin`` processes, the
real Redis, kill -9, an origin that goes away, dead letters, two replicas, a graceful stop.

Every wait polls with a deadline; the origin's ``/_writes`` says which writes it applied, in order.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis

from tests.e2e.conftest import Config, Proxy, Spawn, start_origin, start_proxy, until, write_config
from tests.ports import free_port
from tests.redis_keys import queued

FAST = "write_behind: {flush_interval: 200ms}\n"
SLOW = "write_behind: {flush_interval: 30s}\n"  # nothing is flushed until the stop or a restart
# Each key waits out one flush_interval (its coalescing window) from its first write, also after
# a restart: long enough to write everything before the kill, short enough to wait out after.
WINDOW = "write_behind: {flush_interval: 4s}\n"
RETRYING = (
    "write_behind: {flush_interval: 200ms, backoff: {initial: 100ms, max: 500ms}, "
    "max_attempts: 1000}\n"
)
TOKEN = "e2e-admin-token"


def wb_config(
    path: Path,
    origin: str,
    redis_url: str,
    key_prefix: str,
    extra: str = FAST,
    admin_token: str | None = None,
) -> Config:
    """A config whose /users/{id} route is write-behind, its queue under ``key_prefix``."""
    return write_config(
        path,
        origin,
        l2=redis_url,
        key_prefix=key_prefix,
        mode="write-behind",
        extra=extra,
        admin_token=admin_token,
    )


def user(i: int | str, **fields: object) -> bytes:
    return json.dumps({"id": str(i), **fields}).encode()


async def put(session: aiohttp.ClientSession, url: str, body: bytes) -> None:
    """A write through the proxy, which must be acknowledged as queued."""
    async with session.put(url, data=body, headers={"Content-Type": "application/json"}) as r:
        text = await r.text()
        assert (r.status, r.headers.get("X-Cache-Write")) == (202, "queued"), (r.status, text)


async def fetch(session: aiohttp.ClientSession, url: str) -> tuple[int, bytes]:
    async with session.get(url) as response:
        return response.status, await response.read()


async def queue_state(session: aiohttp.ClientSession, proxy: Proxy) -> dict[str, Any]:
    async with session.get(proxy.admin + "/admin/write-behind") as response:
        assert response.status == 200, await response.text()
        state: dict[str, Any] = await response.json()
    return state


async def applied(session: aiohttp.ClientSession, origin: str) -> dict[str, list[dict[str, Any]]]:
    """Every write the origin applied, by path, in arrival order."""
    async with session.get(origin + "/_writes") as response:
        found = await response.json()
    by_path: dict[str, list[dict[str, Any]]] = {}
    for write in found["writes"]:
        by_path.setdefault(write["path"], []).append(write)
    return by_path


def lagging(by_path: dict[str, list[dict[str, Any]]], acked: dict[str, bytes]) -> list[str]:
    """The paths whose last applied write is not the acknowledged body."""
    return [
        path
        for path, body in acked.items()
        if not by_path.get(path) or by_path[path][-1]["body"].encode() != body
    ]


async def reaches_origin(
    session: aiohttp.ClientSession, origin: str, acked: dict[str, bytes], within: float = 10.0
) -> dict[str, list[dict[str, Any]]]:
    """Wait until, for every path, the last write the origin applied is the acknowledged one."""
    seen: dict[str, list[dict[str, Any]]] = {}
    missing: list[str] = list(acked)

    async def arrived() -> bool:
        nonlocal seen, missing
        seen = await applied(session, origin)
        missing = lagging(seen, acked)
        return not missing

    try:
        await until(arrived, "every acknowledged write at the origin", within)
    except AssertionError as exc:
        path = missing[0]
        last = seen[path][-1]["body"] if seen.get(path) else None
        raise AssertionError(
            f"{exc}; {len(missing)} paths lag, e.g. {missing[:5]}; {path}: acknowledged "
            f"{acked[path]!r}, the origin's last write {last!r}"
        ) from None
    return seen


async def queue_empties(session: aiohttp.ClientSession, proxy: Proxy) -> dict[str, Any]:
    state: dict[str, Any] = {}

    async def empty() -> bool:
        nonlocal state
        state = await queue_state(session, proxy)
        return bool(state["queue_depth"] == 0)

    await until(empty, "an empty write-behind queue")
    return state


# The processes are listed after ``redis_client`` so that they are stopped before the fixture
# deletes this test's keys: a live flusher must not write into Redis after the cleanup.


@pytest.mark.redis
async def test_acknowledged_writes_survive_kill_9_and_are_flushed_by_the_next_process(
    redis_client: Redis, spawn: Spawn, tmp_path: Path, redis_url: str, key_prefix: str
) -> None:
    n = 200
    origin = await start_origin(spawn)
    slow = wb_config(tmp_path / "first.yaml", origin.url, redis_url, key_prefix, WINDOW)
    first = await start_proxy(spawn, slow, "first")
    acked = {f"/users/{i}": user(i, name=f"user {i}", written="before the crash") for i in range(n)}
    async with aiohttp.ClientSession() as session:
        for path, body in acked.items():
            await put(session, first.url + path, body)
        assert (await queue_state(session, first))["queue_depth"] == n
        assert await applied(session, origin.url) == {}  # all still queued: nothing flushed yet

        assert first.process.stop(signal.SIGKILL) == -signal.SIGKILL

        # Same Redis prefix and origin, and a short flush interval so the test stays quick.
        fast = wb_config(tmp_path / "restarted.yaml", origin.url, redis_url, key_prefix)
        restarted = await start_proxy(spawn, fast, "restarted")
        seen = await reaches_origin(session, origin.url, acked, within=20)
        assert {w["status"] for writes in seen.values() for w in writes} == {201}
        assert set(seen) == set(acked)
        await queue_empties(session, restarted)
        for path, body in acked.items():
            assert await fetch(session, restarted.url + path) == (200, body), path
    assert restarted.process.stop() == 0


@pytest.mark.redis
async def test_writes_while_the_origin_is_down_are_read_back_and_reach_it_when_it_returns(
    redis_client: Redis, spawn: Spawn, tmp_path: Path, redis_url: str, key_prefix: str
) -> None:
    port, db = free_port(), tmp_path / "origin.sqlite"
    origin = await start_origin(spawn, port=port, db=db)
    keys = [f"/users/{i}" for i in range(10)]
    for path in keys:
        await origin.put(path, {"v": 0})
    config = wb_config(tmp_path / "c.yaml", origin.url, redis_url, key_prefix, RETRYING)
    proxy = await start_proxy(spawn, config)
    origin.process.stop(signal.SIGKILL)

    acked: dict[str, bytes] = {}
    async with aiohttp.ClientSession() as session:
        for v in (1, 2, 3):  # rewrites of a key still queued coalesce into one
            for path in keys:
                acked[path] = json.dumps({"v": v, "path": path}).encode()
                await put(session, proxy.url + path, acked[path])
        for path, body in acked.items():  # read-your-writes, with no origin to ask
            assert await fetch(session, proxy.url + path) == (200, body), path
        state = await queue_state(session, proxy)
        assert state["queue_depth"] == len(keys)

        async def retrying() -> bool:
            return "attempt 2 of 1000" in proxy.process.output()

        await until(retrying, "the flusher retrying the writes the dead origin did not take")
        assert (await queue_state(session, proxy))["dead_letters"] == []

        again = await start_origin(spawn, port=port, db=db, name="origin-again")
        assert again.url == origin.url

        async def at_origin() -> bool:
            for path, body in acked.items():
                status, stored = await fetch(session, again.url + path)
                if (status, stored) != (200, body):
                    return False
            return True

        await until(at_origin, "every key's acknowledged value in the restarted origin's db")
        state = await queue_empties(session, proxy)
        assert state["dead_letters"] == []
        seen = await applied(session, again.url)
        # Three writes per key, coalesced while the origin was away: one origin write each.
        assert {path: [w["body"].encode() for w in seen[path]] for path in keys} == {
            path: [body] for path, body in acked.items()
        }
        for path, body in acked.items():
            assert await fetch(session, proxy.url + path) == (200, body), path
    assert proxy.process.stop() == 0


@pytest.mark.redis
async def test_a_write_the_origin_refuses_is_dead_lettered_while_the_others_flow(
    redis_client: Redis, spawn: Spawn, tmp_path: Path, redis_url: str, key_prefix: str
) -> None:
    origin = await start_origin(spawn)
    config = wb_config(tmp_path / "c.yaml", origin.url, redis_url, key_prefix, admin_token=TOKEN)
    proxy = await start_proxy(spawn, config)
    refused = b"this is not JSON"  # the demo origin answers 400 to it: permanent
    acked = {f"/users/{i}": user(i, name=f"user {i}") for i in range(20)}
    async with aiohttp.ClientSession() as session:
        await put(session, proxy.url + "/users/bad", refused)
        for path, body in acked.items():
            await put(session, proxy.url + path, body)

        state: dict[str, Any] = {}

        async def one_dead_letter() -> bool:
            nonlocal state
            state = await queue_state(session, proxy)
            return len(state["dead_letters"]) == 1

        await until(one_dead_letter, "one dead letter")
        seen = await reaches_origin(session, origin.url, acked)
        assert "/users/bad" not in seen
        state = await queue_empties(session, proxy)
        assert state["dead_letter_count"] == 1
        [letter] = state["dead_letters"]
        assert {k: letter[k] for k in ("key", "method", "path", "attempts")} == {
            "key": "users:bad",
            "method": "PUT",
            "path": "/users/bad",
            "attempts": 1,
        }
        assert "400" in letter["last_error"], letter
        assert isinstance(letter["failed_at"], float)

        # The key is dropped from the caches once dead-lettered (just after the letter is
        # written, hence the short poll): reads fall through to what the origin holds, a 404.
        answer: tuple[int, bytes] = (0, b"")

        async def origin_answers() -> bool:
            nonlocal answer
            answer = await fetch(session, proxy.url + "/users/bad")
            return answer[0] == 404

        await until(origin_answers, "a read of the dead key answered by the origin", within=2)
        assert answer[1] != refused
        assert json.loads(answer[1]) == {"error": "users/bad not found"}

        replay = proxy.admin + "/admin/write-behind/replay"
        async with session.post(replay) as response:
            assert response.status == 401
            assert (await response.json())["error"] == "unauthorized"
        async with session.post(replay, headers={"Authorization": "Bearer wrong"}) as response:
            assert response.status == 403
            assert (await response.json())["error"] == "forbidden"
        async with session.post(replay, headers={"Authorization": f"Bearer {TOKEN}"}) as response:
            assert response.status == 200
            assert await response.json() == {"replayed": 1}

        # Replayed with its attempts reset: sent once more, refused once more.
        async def refused_twice() -> bool:
            async with session.get(origin.url + "/_stats") as response:
                stats = await response.json()
            state = await queue_state(session, proxy)
            return bool(
                stats["by_request"].get("PUT /users/bad") == 2
                and [letter["attempts"] for letter in state["dead_letters"]] == [1]
                and state["queue_depth"] == 0
            )

        await until(refused_twice, "the replayed write refused again and dead-lettered")
    assert proxy.process.stop() == 0


@pytest.mark.redis
async def test_two_replicas_flushing_one_queue_keep_each_keys_writes_in_order(
    redis_client: Redis, spawn: Spawn, tmp_path: Path, redis_url: str, key_prefix: str
) -> None:
    # A slow origin keeps each key's send in flight for a good part of every flush cycle, so
    # writes keep landing on keys being sent: the case where order and newer values are at risk.
    origin = await start_origin(spawn, latency="200ms")
    replicas = [
        await start_proxy(
            spawn, wb_config(tmp_path / f"{name}.yaml", origin.url, redis_url, key_prefix), name
        )
        for name in ("a", "b")
    ]
    keys = [f"/users/{i}" for i in range(10)]
    acked: dict[str, list[int]] = {path: [] for path in keys}
    async with aiohttp.ClientSession() as session:
        deadline = time.monotonic() + 1.5
        n = 0
        while n < 600 and time.monotonic() < deadline:
            n += 1
            # Each key is written by both replicas in turn: n, n+1 share a key, not a replica.
            path, replica = keys[(n // 2) % len(keys)], replicas[n % 2]
            await put(session, replica.url + path, json.dumps({"v": n}).encode())
            acked[path].append(n)

        last = {path: json.dumps({"v": values[-1]}).encode() for path, values in acked.items()}
        seen = await reaches_origin(session, origin.url, last)
        for replica in replicas:
            state = await queue_empties(session, replica)
            assert state["dead_letters"] == []

    flushed = 0
    for path in keys:
        values = [json.loads(write["body"])["v"] for write in seen[path]]
        flushed += len(values)
        assert set(values) <= set(acked[path]), f"{path}: values never written: {values}"
        # Coalescing leaves gaps, which are fine. Going backwards is never fine. A repeat of a
        # value is tolerated only right after itself (an at-least-once resend after a lost ack
        # or an expired lease): since every adjacent pair is compared, any other repeat would
        # be a step backwards somewhere and fail here.
        backwards = [(a, b) for a, b in itertools.pairwise(values) if b < a]
        assert not backwards, f"{path}: origin received {values}"
    print(
        f"two replicas: {n} acknowledged writes, {flushed} origin writes "
        f"({n - flushed} coalesced away)"
    )
    for replica in replicas:
        assert replica.process.stop() == 0


@pytest.mark.redis
async def test_sigterm_flushes_the_queue_before_exiting(
    redis_client: Redis, spawn: Spawn, tmp_path: Path, redis_url: str, key_prefix: str
) -> None:
    origin = await start_origin(spawn)
    await origin.put("/users/gone", {"doomed": True})
    config = wb_config(tmp_path / "c.yaml", origin.url, redis_url, key_prefix, SLOW)
    proxy = await start_proxy(spawn, config)
    acked = {f"/users/{i}": user(i, name=f"user {i}") for i in range(5)}
    async with aiohttp.ClientSession() as session:
        for path, body in acked.items():
            await put(session, proxy.url + path, body)
        async with session.delete(proxy.url + "/users/gone") as response:
            assert (response.status, response.headers.get("X-Cache-Write")) == (202, "queued")
        assert (await queue_state(session, proxy))["queue_depth"] == len(acked) + 1
        before = await applied(session, origin.url)
        assert [(path, len(writes)) for path, writes in before.items()] == [("/users/gone", 1)]

        grace = 5.0  # write_config's server.shutdown_grace
        started = time.monotonic()
        code = await asyncio.to_thread(proxy.process.stop, signal.SIGTERM, grace + 5)
        took = time.monotonic() - started
        assert code == 0, proxy.process.output()
        assert took < grace, f"the stop took {took:.1f}s"

        seen = await applied(session, origin.url)
        assert lagging(seen, acked) == []
        assert [w["method"] for w in seen["/users/gone"]] == ["PUT", "DELETE"]
        assert (await fetch(session, origin.url + "/users/gone"))[0] == 404
    assert "flushed 6 writes on the way out" in proxy.process.output()
    assert "still queued" not in proxy.process.output()
    assert await queued(redis_client, key_prefix, "ready") == 0  # the queue is empty


@pytest.mark.redis
async def test_sigterm_during_a_flush_finishes_it_and_flushes_the_rest(
    redis_client: Redis, spawn: Spawn, tmp_path: Path, redis_url: str, key_prefix: str
) -> None:
    """A send already on its way is completed, not cancelled (which would strand its key)."""
    origin = await start_origin(spawn, latency="1s")
    config = wb_config(tmp_path / "c.yaml", origin.url, redis_url, key_prefix)
    proxy = await start_proxy(spawn, config)
    async with aiohttp.ClientSession() as session:
        await put(session, proxy.url + "/users/1", user(1, v=1))

        async def on_its_way() -> bool:
            async with session.get(origin.url + "/_stats") as response:
                return bool((await response.json())["by_request"].get("PUT /users/1"))

        await until(on_its_way, "the flush of /users/1 under way")
        await put(session, proxy.url + "/users/2", user(2, v=2))
        assert await asyncio.to_thread(proxy.process.stop, signal.SIGTERM) == 0
        seen = await applied(session, origin.url)
    assert [w["body"].encode() for w in seen["/users/1"]] == [user(1, v=1)]
    assert [w["body"].encode() for w in seen["/users/2"]] == [user(2, v=2)]
    assert await queued(redis_client, key_prefix) == 0


@pytest.mark.redis
@pytest.mark.parametrize("replicas", [1, 2])
async def test_concurrent_writes_of_one_key_leave_the_cache_with_what_the_origin_gets(
    redis_client: Redis,
    spawn: Spawn,
    tmp_path: Path,
    redis_url: str,
    key_prefix: str,
    replicas: int,
) -> None:
    """Two writes of a key at once, on one replica or two: once flushed, the shared tier and
    the origin agree (the queue's sequence number orders L2 across replicas)."""
    origin = await start_origin(spawn)
    writers = [
        await start_proxy(
            spawn, wb_config(tmp_path / f"{n}.yaml", origin.url, redis_url, key_prefix), f"w{n}"
        )
        for n in range(replicas)
    ]
    keys = 100
    async with aiohttp.ClientSession() as session:
        for k in range(keys):
            path = f"/users/{k}"
            await asyncio.gather(
                put(session, writers[0].url + path, user(k, by="first")),
                put(session, writers[-1].url + path, user(k, by="second")),
            )
        await queue_empties(session, writers[0])
        # A replica that wrote nothing reads through L2, the shared view.
        reader = await start_proxy(
            spawn, wb_config(tmp_path / "r.yaml", origin.url, redis_url, key_prefix), "reader"
        )
        diverged = []
        for k in range(keys):
            path = f"/users/{k}"
            at_origin = await fetch(session, origin.url + path)
            via_l2 = await fetch(session, reader.url + path)
            if at_origin != via_l2:
                diverged.append((path, at_origin, via_l2))
            if replicas == 1:  # one replica: its own L1 agrees too
                assert await fetch(session, writers[0].url + path) == at_origin, path
    assert diverged == [], f"{len(diverged)} of {keys} keys differ, e.g. {diverged[:3]}"


async def test_a_memory_queue_works_and_says_at_start_that_it_is_not_crash_safe(
    spawn: Spawn, tmp_path: Path
) -> None:
    origin = await start_origin(spawn)
    config = write_config(tmp_path / "c.yaml", origin.url, mode="write-behind", extra=FAST)
    proxy = await start_proxy(spawn, config)
    assert "LOST if the process dies" in proxy.process.output()
    async with aiohttp.ClientSession() as session:
        await put(session, proxy.url + "/users/1", user(1))
        assert await fetch(session, proxy.url + "/users/1") == (200, user(1))
        await reaches_origin(session, origin.url, {"/users/1": user(1)})
    assert proxy.process.stop() == 0
