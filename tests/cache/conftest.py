"""Fixtures of the engine's tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import fakeredis
import pytest
from redis.asyncio import Redis

from cache.redis.tier import RedisClient, client_from_url
from tests.conftest import deployment_of
from tests.redis_keys import drop_prefix


@pytest.fixture(params=["fakeredis", "redis", "cluster", "sentinel"])
async def client(request: pytest.FixtureRequest, key_prefix: str) -> AsyncIterator[RedisClient]:
    """A client of fakeredis (a server of its own), of the real Redis, of the session's Cluster
    and of its master behind Sentinel, in turn; every key under ``key_prefix`` is deleted
    afterwards."""
    found: RedisClient
    if request.param == "fakeredis":
        found = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    elif request.param == "redis":
        found = Redis.from_url(request.getfixturevalue("redis_url"))
    else:  # built from its URL, as cachecar builds it
        found = client_from_url(deployment_of(request, request.param).url, timeout=2.0)
    try:
        yield found
    finally:
        await drop_prefix(found, key_prefix)
        await found.aclose()
