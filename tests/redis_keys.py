"""Cleaning up after a test that wrote to the real Redis."""

from __future__ import annotations

from redis.asyncio import Redis


async def drop_prefix(client: Redis, prefix: str) -> int:
    """Delete every key under ``prefix`` (SCAN, never KEYS); returns how many."""
    keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=500)]
    if keys:
        await client.delete(*keys)
    return len(keys)
