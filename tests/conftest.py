"""Fixtures shared by every test: the real Redis (on its own key prefix), the Redis deployments
a session starts (Cluster, Sentinel, TLS), clocks, observers."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import redis
from redis.asyncio import Redis

from cache.redis.tier import RedisClient, client_from_url
from tests import redis_servers
from tests.fakes import FakeClock, RecordingObserver
from tests.redis_keys import drop_prefix
from tests.redis_servers import Deployment

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379")
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def _redis_problem(url: str) -> str | None:
    try:
        with redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2) as client:
            client.ping()
    except (redis.RedisError, OSError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The real Redis. Outside CI a missing Redis skips; in CI (CI=true) it fails the test."""
    problem = _redis_problem(REDIS_URL)
    if problem is not None:
        message = f"Redis at REDIS_URL={REDIS_URL} does not answer ({problem})"
        if IN_CI:
            pytest.fail(f"{message}; CI needs it")
        pytest.skip(f"{message}; not in CI, so skipped here and failed in CI")
    return REDIS_URL


@pytest.fixture
def key_prefix() -> str:
    """A Redis key prefix of this test's own."""
    return f"cachecar-test:{uuid.uuid4().hex[:12]}:"


@pytest.fixture
async def redis_client(redis_url: str, key_prefix: str) -> AsyncIterator[Redis]:
    """A client on the real Redis; every key under ``key_prefix`` is deleted afterwards."""
    client = Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await drop_prefix(client, key_prefix)
        await client.aclose()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """A real Redis Cluster of three masters, for the whole session."""
    with redis_servers.cluster(tmp_path_factory.mktemp("cluster")) as deployment:
        yield deployment


@pytest.fixture(scope="session")
def redis_sentinel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """A real Redis master behind a real Sentinel, for the whole session."""
    with redis_servers.sentinel(tmp_path_factory.mktemp("sentinel")) as deployment:
        yield deployment


@pytest.fixture(scope="session")
def redis_tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """A real Redis that speaks TLS only, for the whole session."""
    with redis_servers.tls(tmp_path_factory.mktemp("tls")) as deployment:
        yield deployment


def deployment_of(request: pytest.FixtureRequest, name: str) -> Deployment:
    """The deployment called ``name``: "redis" (REDIS_URL), "cluster", "sentinel" or "tls"."""
    if name == "redis":
        url = request.getfixturevalue("redis_url")
        return Deployment("redis", url, url)
    value: Deployment = request.getfixturevalue(f"redis_{name}")
    return value


@pytest.fixture(params=["redis", "cluster", "sentinel"])
def deployment(request: pytest.FixtureRequest) -> Deployment:
    """Each real deployment in turn: one Redis, a Cluster, a master behind Sentinel."""
    return deployment_of(request, request.param)


@pytest.fixture
async def deployed_client(deployment: Deployment, key_prefix: str) -> AsyncIterator[RedisClient]:
    """A client of ``deployment`` as cachecar builds it; keys under ``key_prefix`` are deleted
    afterwards."""
    client = client_from_url(deployment.url, timeout=2.0)
    try:
        yield client
    finally:
        await drop_prefix(client, key_prefix)
        await client.aclose()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def observer() -> RecordingObserver:
    return RecordingObserver()
