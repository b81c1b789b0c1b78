"""Cleaning up after a test that wrote to the real Redis."""

from __future__ import annotations

from cache.redis.tier import RedisClient
from cache.write_behind.shards import DEFAULT_SHARDS, shard_layouts


async def drop_prefix(client: RedisClient, prefix: str) -> int:
    """Delete every key under ``prefix`` (SCAN, never KEYS; on a cluster, of every node);
    returns how many."""
    keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=500)]
    if keys:
        await client.delete(*keys)
    return len(keys)


async def queued(client: RedisClient, prefix: str, name: str = "values") -> int:
    """How many keys the write-behind queue's ``name`` hash or sorted set holds, over every
    shard of the default layout."""
    total = 0
    for shard in shard_layouts(prefix, DEFAULT_SHARDS):
        if name == "values":
            total += await client.hlen(shard[name])
        else:
            total += await client.zcard(shard[name])
    return total
