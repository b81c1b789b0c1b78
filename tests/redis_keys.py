"""Cleaning up after a test that wrote to the real Redis."""

from __future__ import annotations

from cache.redis.tier import RedisClient


async def drop_prefix(client: RedisClient, prefix: str) -> int:
    """Delete every key under ``prefix`` (SCAN, never KEYS; on a cluster, of every node);
    returns how many."""
    keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=500)]
    if keys:
        await client.delete(*keys)
    return len(keys)
