"""L2: the shared tier in Redis.

A logical key is one Redis hash, ``{key_prefix}{key}``, with one field per variant holding the
entry envelope. Dropping a key is one ``DEL`` (all variants, one slot on a cluster); the hash
lives as long as the variant written last says. A variant's own freshness is in its envelope,
so a variant kept alive by a newer sibling is still never served past its TTL.

Every call is bounded by ``timeout`` and any failure (refused, reset, slow, an error reply) is
raised as ``TierUnavailable``: the tiered cache counts it and carries on as if it had missed.
A key that holds something else (another Redis type, bytes that are not an envelope) is a
``CorruptEntry``: Redis is healthy, the key is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from redis.asyncio import Redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from cache.entry import Entry, decode, encode
from cache.errors import CorruptEntry, TierUnavailable
from cache.tier import Stored

MEMORY_URL = "memory://"


def client_from_url(url: str, *, timeout: float) -> Redis:
    """A client for ``url`` set up for a bounded tier: no retries, connect and read timeouts.

    ``memory://`` is an in-process Redis (fakeredis): one per call, shared by nobody.
    """
    if url.startswith(MEMORY_URL):
        import fakeredis

        # A server of its own: two apps in one process (tests) must not share a "memory" L2.
        client: Redis = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
        return client
    from redis.asyncio.retry import Retry

    # The tier bounds each call itself; redis-py retrying underneath would only spend the budget
    # reconnecting to a server that is down.
    return Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=30,
    )


class RedisTier:
    """L2 over ``redis.asyncio``; the client must return bytes (``decode_responses=False``)."""

    name = "l2"

    def __init__(self, client: Redis, *, key_prefix: str, timeout: float) -> None:
        if client.get_encoder().decode_responses:  # type: ignore[no-untyped-call]
            raise ValueError("the L2 client must be built with decode_responses=False")
        if timeout <= 0:
            raise ValueError("the L2 timeout must be positive")
        self._client = client
        self._prefix = key_prefix
        self._timeout = timeout

    async def get(self, key: str, variant: str = "") -> Stored | None:
        name = self._prefix + key
        async with self._bounded("get"):
            pipe = self._client.pipeline(transaction=False)
            pipe.hget(name, variant)
            pipe.pttl(name)
            raw, pttl = await pipe.execute()
        if raw is None:
            return None
        entry = decode(raw)
        # -1: no expiry on the key (written by something else); the envelope still bounds it.
        ttl_left = pttl / 1000 if pttl >= 0 else entry.ttl
        return Stored(entry, ttl_left)

    async def set(self, key: str, variant: str, entry: Entry, ttl: float) -> None:
        if ttl <= 0:
            return
        name = self._prefix + key
        data = encode(entry)
        async with self._bounded("set"):
            pipe = self._client.pipeline(transaction=True)
            pipe.hset(name, variant, data)
            pipe.pexpire(name, max(1, round(ttl * 1000)))
            await pipe.execute()

    async def delete(self, key: str) -> bool:
        async with self._bounded("delete"):
            removed: int = await self._client.delete(self._prefix + key)
        return removed > 0

    async def ping(self) -> None:
        """Raises ``TierUnavailable`` unless Redis answers within the timeout."""
        async with self._bounded("ping"):
            await self._client.ping()

    async def aclose(self) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self._client.aclose()

    @contextlib.asynccontextmanager
    async def _bounded(self, op: str) -> AsyncIterator[None]:
        try:
            async with asyncio.timeout(self._timeout):
                yield
        except TimeoutError as exc:
            raise TierUnavailable(op, f"no answer within {self._timeout * 1000:g}ms") from exc
        except ResponseError as exc:
            if "WRONGTYPE" in str(exc):
                # Redis is fine; the key holds something that is not a cachecar hash.
                raise CorruptEntry(f"{op}: the key holds another Redis type") from exc
            raise TierUnavailable(op, _describe(exc)) from exc
        except (RedisError, OSError) as exc:
            raise TierUnavailable(op, _describe(exc)) from exc


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
