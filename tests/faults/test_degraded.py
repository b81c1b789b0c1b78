"""Redis killed for 10 s under a Zipf read load over three replicas: degraded mode
(``coherence.degraded_ttl``) keeps L1 answering, so the origin sees about one request per key
per ``degraded_ttl`` per replica instead of every read, and a write made through one replica
meanwhile is served by the others for at most ``degraded_ttl``. Run beside ``degraded_ttl: 0``
(L1 unused while a replica cannot hear the others: every read the origin's).

Three ``cachecar serve`` processes, the demo origin and a redis-server of the test's own run as
processes; the origin's own request counts (``/_stats``) are read four times a second.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from tests.e2e.conftest import Proxy, Spawn, start_origin, start_proxy, until
from tests.faults.conftest import Figures
from tests.faults.harness import KillableRedis, Load, proxy_config, server_errors, unanswered

pytestmark = pytest.mark.e2e

REPLICAS = 3
KEYS = 50
ZIPF = 0.99
BEFORE, OUTAGE, AFTER = 3.0, 10.0, 4.0  # seconds of load in each phase
SETTLE = 1.0  # after every replica is subscribed again: L1 refilled, with full TTLs
WRITTEN = (0, 1, 2, 3)  # the keys written during the outage: the most read ones
SLACK = 0.25  # a fetch under way when the write landed may store the old value a little later


@dataclass
class Outage:
    """What one run measured."""

    degraded_ttl: float
    reads: dict[str, float] = field(default_factory=dict)  # read req/s by phase
    origin: dict[str, float] = field(default_factory=dict)  # origin GET req/s by phase
    touched: float = 0.0  # keys read per replica per second during the outage, summed
    answers: int = 0
    failed: int = 0
    degraded_reads: float = 0.0
    write_statuses: list[int] = field(default_factory=list)
    refill: int = 0  # origin GETs from Redis' restart to the end
    stale_for: float = 0.0  # the last old value read after the write, seconds after it
    reads_after_write: int = 0
    late_stale: list[float] = field(default_factory=list)  # old values past the bound


def zipf_keys(count: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    weights = [1 / (rank + 1) ** ZIPF for rank in range(KEYS)]
    cumulative = list(itertools.accumulate(weights))
    return rng.choices(range(KEYS), cum_weights=cumulative, k=count)


async def origin_gets(session: aiohttp.ClientSession, origin_url: str) -> int:
    async with session.get(origin_url + "/_stats") as answer:
        stats = await answer.json()
    return int(stats["by_method"].get("GET", 0))


async def coherence_states(session: aiohttp.ClientSession, proxies: list[Proxy]) -> list[str]:
    states = []
    for proxy in proxies:
        async with session.get(proxy.admin + "/admin/stats") as answer:
            states.append((await answer.json())["coherence"]["state"])
    return states


def rate(points: list[tuple[float, int]], start: float, end: float) -> float:
    """Origin GETs per second between ``start`` and ``end`` from the counts sampled."""
    inside = [(at, n) for at, n in points if start <= at <= end]
    if len(inside) < 2:
        return 0.0
    (t0, n0), (t1, n1) = inside[0], inside[-1]
    return (n1 - n0) / (t1 - t0)


async def run_outage(spawn: Spawn, where: Path, degraded_ttl: float) -> Outage:
    redis = KillableRedis(spawn, where / "redis")
    await redis.start()
    origin = await start_origin(spawn, latency="2ms", name=f"origin-{degraded_ttl:g}")
    for key in range(KEYS):
        await origin.put(f"/users/{key}", {"n": key, "v": 0})
    proxies = []
    for replica in range(REPLICAS):
        config = proxy_config(
            where / f"r{replica}.yaml",
            f"""\
            upstream: {{url: "{origin.url}", timeout: 2s}}
            l1: {{ttl: 60s}}
            l2: {{url: "{redis.url}", ttl: 60s, timeout: 50ms,
                  breaker: {{failures: 5, reset_after: 1s}}}}
            coherence: {{degraded_ttl: {degraded_ttl:g}s}}
            routes:
              - path: /users/{{id}}
                key: "users:{{id}}"
            """,
        )
        proxies.append(await start_proxy(spawn, config, name=f"r{replica}-{degraded_ttl:g}"))
    measured = Outage(degraded_ttl)
    plan = zipf_keys(200_000, seed=18)
    sent: list[tuple[float, int, int]] = []  # (when, replica, key) of every read of the load
    points: list[tuple[float, int]] = []

    async with aiohttp.ClientSession() as session:

        async def subscribed() -> bool:
            return await coherence_states(session, proxies) == ["subscribed"] * REPLICAS

        await until(subscribed, "every replica subscribed")

        def url_for(n: int) -> str:
            replica, key = n % REPLICAS, plan[n % len(plan)]
            sent.append((load.now(), replica, key))
            return f"{proxies[replica].url}/users/{key}"

        load = Load(session, url_for, concurrency=6, pause=0.002)

        async def sample_origin() -> None:
            while True:
                points.append((load.now(), await origin_gets(session, origin.url)))
                await asyncio.sleep(0.25)

        async with load:
            sampler = asyncio.create_task(sample_origin())
            await asyncio.sleep(BEFORE)
            killed_at = load.now()
            redis.kill()
            await until(
                lambda: _all_lost(session, proxies), "every replica noticed the loss", within=5
            )
            await asyncio.sleep(OUTAGE / 2)
            stale = await write_and_watch(session, proxies, degraded_ttl, measured)
            await asyncio.sleep(max(0.0, killed_at + OUTAGE - load.now()))
            restarted_at = load.now()
            await redis.start()  # same port, empty
            await until(subscribed, "every replica subscribed again", within=10)
            back_at = load.now()
            await asyncio.sleep(AFTER)
            ended_at = load.now()
            sampler.cancel()
            await asyncio.gather(sampler, return_exceptions=True)
        measured.degraded_reads = sum([await _degraded_reads(session, proxy) for proxy in proxies])
    every = load.samples
    measured.answers = len(every)
    measured.failed = len(server_errors(every)) + len(unanswered(every))
    measured.late_stale = stale
    phases = {
        "before": (1.0, killed_at),
        "during": (killed_at, restarted_at),
        "after": (back_at + SETTLE, ended_at),
    }
    measured.refill = next(n for at, n in reversed(points)) - next(
        n for at, n in points if at >= restarted_at
    )
    for phase, (start, end) in phases.items():
        measured.reads[phase] = len(load.between(start, end)) / (end - start)
        measured.origin[phase] = rate(points, start, end)
    # Keys each replica read in each whole second of the outage, summed over the replicas.
    windows: Counter[int] = Counter()
    seen = {(int(at - killed_at), replica, key) for at, replica, key in sent}
    for second, _, _ in seen:
        windows[second] += 1
    whole = [windows[s] for s in range(int(OUTAGE))]
    measured.touched = sum(whole) / len(whole)
    return measured


async def _all_lost(session: aiohttp.ClientSession, proxies: list[Proxy]) -> bool:
    return "subscribed" not in await coherence_states(session, proxies)


async def _degraded_reads(session: aiohttp.ClientSession, proxy: Proxy) -> float:
    async with session.get(proxy.admin + "/admin/stats") as answer:
        return float((await answer.json())["coherence"]["degraded_reads_total"])


async def write_and_watch(
    session: aiohttp.ClientSession, proxies: list[Proxy], degraded_ttl: float, measured: Outage
) -> list[float]:
    """Write the hottest keys through the first replica (to the origin: Redis is down), a
    quarter of a second apart, so the writes fall at different ages of the others' L1 copies;
    read each from the two other replicas until ``degraded_ttl`` + 1.5 s after its write.
    Returns how long after its write an old value was read past ``degraded_ttl`` + SLACK (none
    expected)."""
    written: dict[int, float] = {}

    async def write(key: int, delay: float) -> None:
        await asyncio.sleep(delay)
        async with session.put(f"{proxies[0].url}/users/{key}", json={"n": key, "v": 1}) as put:
            measured.write_statuses.append(put.status)
            await put.read()
        written[key] = time.monotonic()

    writes = [asyncio.create_task(write(key, n * 0.25)) for n, key in enumerate(WRITTEN)]
    late: list[float] = []
    deadline = time.monotonic() + 0.25 * len(WRITTEN) + degraded_ttl + 1.5
    while time.monotonic() < deadline:
        for key, at in list(written.items()):
            for proxy in proxies[1:]:
                sent = time.monotonic()
                async with session.get(f"{proxy.url}/users/{key}") as answer:
                    value = json.loads(await answer.read())["v"]
                measured.reads_after_write += 1
                if value == 0:
                    measured.stale_for = max(measured.stale_for, sent - at)
                    if sent - at > degraded_ttl + SLACK:
                        late.append(sent - at)
        await asyncio.sleep(0.01)
    await asyncio.gather(*writes)
    return late


def _rates(phase: str) -> Callable[[Outage], str]:
    return lambda run: f"{run.origin[phase]:.0f} of {run.reads[phase]:.0f}"


async def test_a_redis_outage_under_zipf_load_over_three_replicas_keeps_l1_in_degraded_mode(
    spawn: Spawn, tmp_path: Path, figures: Figures
) -> None:
    degraded = await run_outage(spawn, tmp_path / "degraded", 1.0)
    off = await run_outage(spawn, tmp_path / "off", 0.0)

    for run in (degraded, off):
        assert run.failed == 0, f"degraded_ttl {run.degraded_ttl}: {run.failed} non-2xx answers"
        assert run.write_statuses == [200] * len(WRITTEN), "a write failed during the outage"
        assert run.late_stale == [], (
            f"degraded_ttl {run.degraded_ttl}: an overwritten value read "
            f"{run.late_stale[0]:.2f}s after the write"
        )
        assert run.reads["during"] > 0
        # Subscribed again: L1 trusted, its entries live their full TTL (60 s) again.
        assert run.origin["after"] <= 5, f"degraded_ttl {run.degraded_ttl}: {run.origin}"
    # Degraded mode: about one origin request per key touched per degraded_ttl per replica,
    # far below the read rate; without it, every read the origin's.
    assert degraded.degraded_reads > 0
    assert degraded.origin["during"] <= 1.5 * degraded.touched / degraded.degraded_ttl + 10
    assert degraded.origin["during"] < 0.5 * degraded.reads["during"]
    assert off.degraded_reads == 0
    assert off.origin["during"] > 0.8 * off.reads["during"]

    table = figures(
        "Redis killed for 10 s under Zipf read load, 3 replicas (degraded mode)",
        columns=("measure", "degraded_ttl: 1s (the default) · degraded_ttl: 0 (L1 unused)"),
    )

    def row(measure: str, show: Callable[[Outage], str]) -> None:
        table.add(measure, " · ".join(show(run) for run in (degraded, off)))

    row("reads answered", lambda r: f"{r.answers:,}")
    row("non-2xx or unanswered", lambda r: str(r.failed))
    for phase, label in (
        ("before", "before the kill"),
        ("during", "while Redis is down (10 s)"),
        ("after", "from 1 s after every replica subscribed again (3 s)"),
    ):
        row(f"origin GET/s {label}, of reads/s", _rates(phase))
    row("keys read per second per replica while down, summed", lambda r: f"{r.touched:.0f}")
    row("reads L1 answered in degraded mode", lambda r: f"{r.degraded_reads:,.0f}")
    row(
        f"writes through replica 1 while down ({len(WRITTEN)} hot keys), answered",
        lambda r: ", ".join(str(status) for status in r.write_statuses),
    )
    row(
        "replicas 2 and 3 served a written key's old value until (s after its write)",
        lambda r: f"{r.stale_for:.2f}",
    )
    row("reads of the written keys after their writes", lambda r: f"{r.reads_after_write:,}")
    row("origin GETs from Redis' restart to the end (refill)", lambda r: f"{r.refill:,}")
