"""Leases on the real Redis: replicas that miss one key at once make one origin fetch."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import fakeredis
import pytest
from redis.asyncio import Redis

from cache.breaker import Breaker, Guard
from cache.clock import SystemClock
from cache.entry import Entry
from cache.lookup import Loaded, Lookup, Source
from cache.memory import MemoryTier
from cache.redis.lease import Leases
from cache.redis.tier import RedisClient, RedisTier, client_from_url
from cache.tiered import TieredCache
from tests.conftest import deployment_of
from tests.fakes import FakeClock, RecordingObserver
from tests.ports import free_port
from tests.redis_servers import Deployment

pytestmark = pytest.mark.redis

CLOCK = SystemClock()
HOLD = 1.0


class Origin:
    def __init__(self, latency: float = 0.05) -> None:
        self.calls = 0
        self.latency = latency
        self.fail = False

    async def load(self) -> Loaded:
        self.calls += 1
        await asyncio.sleep(self.latency)
        if self.fail:
            raise RuntimeError("origin down")
        return Loaded(Entry(200, (), b"v", CLOCK.time(), 60), l1_ttl=60, l2_ttl=60)


MakeReplica = Callable[[], TieredCache]


@pytest.fixture(params=["redis", "cluster"])
def deployment(request: pytest.FixtureRequest) -> Deployment:
    """One Redis, then a real 3-master Redis Cluster."""
    return deployment_of(request, request.param)


@pytest.fixture
async def replicas(
    deployment: Deployment, key_prefix: str, deployed_client: RedisClient
) -> AsyncIterator[MakeReplica]:
    made: list[TieredCache] = []

    def make() -> TieredCache:
        l1 = MemoryTier(max_entries=100, max_bytes=1 << 20, clock=CLOCK)
        tier = RedisTier(
            client_from_url(deployment.url, timeout=1.0), key_prefix=key_prefix, timeout=1.0
        )
        leases = Leases(
            client_from_url(deployment.url, timeout=1.0),
            key_prefix=key_prefix,
            timeout=1.0,
            hold=HOLD,
        )
        cache = TieredCache(l1, tier, clock=CLOCK, leases=leases)
        made.append(cache)
        return cache

    yield make
    for cache in made:
        await cache.aclose()


async def read_everywhere(caches: list[TieredCache], origin: Origin, each: int) -> list[Lookup]:
    return await asyncio.gather(
        *(
            cache.get("users:1", "", l1_ttl=60, loader=origin.load, lease=True)
            for cache in caches
            for _ in range(each)
        )
    )


async def test_replicas_missing_one_key_at_once_make_one_origin_fetch(
    replicas: MakeReplica,
) -> None:
    caches = [replicas() for _ in range(3)]
    origin = Origin()
    lookups = await read_everywhere(caches, origin, 50)
    assert origin.calls == 1
    assert {lookup.entry.body for lookup in lookups} == {b"v"}
    sources = [lookup.source for lookup in lookups]
    assert sources.count(Source.LOADER) == 50  # the winner's process
    assert sources.count(Source.L2) == 100  # the two others, from the winner's fill


async def test_without_a_lease_each_replica_fetches(replicas: MakeReplica) -> None:
    caches = [replicas() for _ in range(3)]
    for cache in caches:
        # Connected first (a cluster client discovers the slots on its first call): a replica
        # slow to connect would otherwise find the others' fill in L2 and never fetch.
        assert cache.l2 is not None
        await cache.l2.get("warm-up")
    origin = Origin(latency=0.2)
    await asyncio.gather(
        *(cache.get("users:1", "", l1_ttl=60, loader=origin.load) for cache in caches)
    )
    assert origin.calls == 3


async def test_when_the_winner_fails_the_others_fetch_themselves_at_once(
    replicas: MakeReplica,
) -> None:
    winner, other = replicas(), replicas()
    failing, working = Origin(latency=0.1), Origin(latency=0.0)
    failing.fail = True
    first = asyncio.create_task(
        winner.get("users:1", "", l1_ttl=60, loader=failing.load, lease=True)
    )
    await asyncio.sleep(0.02)  # the winner holds the lease
    started = asyncio.get_running_loop().time()
    lookup = await other.get("users:1", "", l1_ttl=60, loader=working.load, lease=True)
    waited = asyncio.get_running_loop().time() - started
    with pytest.raises(RuntimeError):
        await first
    assert lookup.source is Source.LOADER
    assert working.calls == 1
    assert waited < HOLD / 2  # the released lease ended the wait, not the hold


async def test_a_winner_that_dies_holding_the_lease_costs_the_others_one_hold(
    replicas: MakeReplica, deployment: Deployment, key_prefix: str
) -> None:
    cache = replicas()
    dead = Leases(
        client_from_url(deployment.url, timeout=1.0), key_prefix=key_prefix, timeout=1.0, hold=HOLD
    )
    assert await dead.acquire("users:1", "")  # and never releases it
    origin = Origin(latency=0.0)
    started = asyncio.get_running_loop().time()
    lookup = await cache.get("users:1", "", l1_ttl=60, loader=origin.load, lease=True)
    waited = asyncio.get_running_loop().time() - started
    await dead.aclose()
    assert lookup.source is Source.LOADER
    assert origin.calls == 1
    assert HOLD * 0.9 <= waited < HOLD * 2


# -- behind the process's L2 breaker -------------------------------------------------------------


async def test_failing_lease_calls_open_the_breaker_and_then_no_lease_is_asked_for(
    clock: FakeClock, observer: RecordingObserver
) -> None:
    changes: list[bool] = []
    breaker = Breaker(failures=3, reset_after=10, clock=clock, on_change=changes.append)
    leases = Leases(
        client_from_url(f"redis://127.0.0.1:{free_port()}", timeout=0.2),
        key_prefix="x:",
        timeout=0.2,
        hold=HOLD,
        guard=Guard(breaker, observer=observer),
    )
    for _ in range(5):
        assert await leases.acquire("users:1", "") == ""  # no lease: fetch, as without leases
    assert changes == [True]
    assert observer.errors == {("l2", "lease"): 3}  # the last two were never sent
    await leases.aclose()


async def test_a_waiter_stops_waiting_for_the_fill_once_the_breaker_opens(
    redis_url: str, key_prefix: str, redis_client: Redis, clock: FakeClock
) -> None:
    winner = Leases(
        client_from_url(redis_url, timeout=1.0), key_prefix=key_prefix, timeout=1.0, hold=HOLD
    )
    breaker = Breaker(failures=1, reset_after=10, clock=clock)
    waiter = Leases(
        client_from_url(redis_url, timeout=1.0),
        key_prefix=key_prefix,
        timeout=1.0,
        hold=HOLD,
        guard=Guard(breaker),
    )
    assert await winner.acquire("users:1", "")  # held, never released
    assert await waiter.acquire("users:1", "") is None
    looks = 0

    async def look() -> None:
        nonlocal looks
        looks += 1
        if looks == 2:  # another L2 caller of this process fails meanwhile
            asyncio.get_running_loop().call_soon(breaker.failure)

    assert await waiter.wait_for_fill("users:1", "", look) is None
    assert looks == 2  # the next look was refused: no waiting out the hold, Redis not asked
    assert breaker.is_open
    for leases in (winner, waiter):
        await leases.aclose()


def test_a_client_that_decodes_responses_is_refused() -> None:
    with pytest.raises(ValueError, match="leases' client must be built with decode_responses"):
        Leases(fakeredis.FakeAsyncRedis(decode_responses=True), key_prefix="", timeout=1, hold=1)
