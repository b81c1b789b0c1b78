"""L2: the shared tier in Redis.

A logical key is one Redis hash, ``{key_prefix}{key}``, with one field per variant holding the
entry envelope. Dropping a key is one ``DEL`` (all variants, one slot on a cluster); the hash
lives as long as the variant written last says. A variant's own freshness is in its envelope,
so a variant kept alive by a newer sibling is still never served past its TTL.

Fills are fenced against writes made elsewhere. Dropping or replacing a key (a write, a purge)
leaves a mark in its hash, field ``!w`` = when (wall clock), kept at least ``fence`` seconds; a
fill carries the time its origin fetch started and is stored only if no mark is that recent (a
script checks and sets in one step). So a replica that fetched the old value just before another
replica's write cannot put it back into the shared tier after that write.

Written values are ordered too: a write-behind write carries its queue sequence number, kept in
``!v``, and a replace with an older number than the key holds is dropped, so two replicas
writing one key at once leave L2 with the value the queue will send last. ``!w`` and ``!v``
cannot collide with a variant name (those are "" or hex digests).

On Redis Cluster every script touches one key, so one slot; the tag index (one set per tag) is
written by a pipeline that is no transaction, so its sets may live on any nodes. What must be
atomic is a script, never MULTI: redis-py's cluster client runs each command queued in a
transaction through ``asyncio.run`` on a thread of its own, blocking the event loop and leaving
connections bound to a loop that is gone. A listing by prefix SCANs every primary in turn: one
node's SCAN sees that node's keys only.

Every call is bounded by ``timeout`` and any failure (refused, reset, slow, an error reply) is
raised as ``TierUnavailable``: the tiered cache counts it and carries on as if it had missed.
The tier itself knows no breaker: the tiered cache asks the process's L2 breaker before each
call and tells it the outcome (a guard here as well would count every call twice).
A key that holds something else (another Redis type, bytes that are not an envelope) is a
``CorruptEntry``: Redis is healthy, the key is dropped.

Reads and fills are auto-pipelined (``cache.redis.reads``, ``cache.redis.fills``): those of one
round of the event loop share one round trip.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.exceptions import RedisClusterException, RedisError, ResponseError

from cache.breaker import Guard
from cache.clock import Clock, SystemClock
from cache.entry import Entry, encode
from cache.errors import CorruptEntry, TierUnavailable

# Re-exported: the callers of a tier build its client from a URL here.
from cache.redis.client import MEMORY_URL as MEMORY_URL
from cache.redis.client import RedisClient as RedisClient
from cache.redis.client import check_client
from cache.redis.client import client_from_url as client_from_url
from cache.redis.fills import FILL, ROOM, PipelinedFills
from cache.redis.reads import PipelinedReads
from cache.tier import MAX_VARIANTS, Stored

MARK = "!w"
# cachecar's own records beside the entries start with "!" (tag sets ``!tag:``, leases
# ``!lease:``) or "{" (the write-behind queue, ``{wb}:``). A logical key starting with either
# (a path parameter can be anything) is stored with one more "!" in front (``entry_name``), so
# no request can read, drop or purge one of those records.
TAG = "!tag:"
OWN = ("!", "{")
# Clocks of replicas differ a little: a fill that started this soon after a mark is not trusted.
CLOCK_SLACK = 1.0

# KEYS: the key   ARGV: now fence_ms   -> how many variants were dropped (a key of another
# Redis type, which is not ours to read, counts as one). The queue version survives the drop.
_DROP = """
local held = 0
local version = false
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind == 'hash' then
  version = redis.call('HGET', KEYS[1], '!v')
  held = redis.call('HLEN', KEYS[1]) - redis.call('HEXISTS', KEYS[1], '!w')
  if version then
    held = held - 1
  end
elseif kind ~= 'none' then
  held = 1
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], '!w', ARGV[1])
if version then
  redis.call('HSET', KEYS[1], '!v', version)
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return held
"""

# KEYS: the key   ARGV: variant envelope ttl_ms now fence_ms version ("" = none)
# -> 1 when stored; 0 when the key holds a newer written version (left as it is)
_REPLACE = """
local version = ARGV[6]
if redis.call('TYPE', KEYS[1])['ok'] == 'hash' then
  local held = redis.call('HGET', KEYS[1], '!v')
  if version ~= '' and held and tonumber(held) >= tonumber(version) then
    return 0
  end
  if version == '' and held then
    version = held
  end
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2], '!w', ARGV[4])
if version ~= '' then
  redis.call('HSET', KEYS[1], '!v', version)
end
redis.call('PEXPIRE', KEYS[1], math.max(tonumber(ARGV[3]), tonumber(ARGV[5])))
return 1
"""

# KEYS: the key   ARGV: variant envelope ttl_ms max_variants
_STORE = (
    ROOM
    + """
if room(KEYS[1], ARGV[1], ARGV[4]) then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
"""
)


class RedisTier:
    """L2 over ``redis.asyncio``, one Redis or a Cluster; the client must return bytes
    (``decode_responses=False``)."""

    name = "l2"

    def __init__(
        self,
        client: RedisClient,
        *,
        key_prefix: str,
        timeout: float,
        clock: Clock | None = None,
        fence: float = 60.0,
        max_variants: int = MAX_VARIANTS,
    ) -> None:
        """``max_variants``: a key's most variants; a new one past them is not stored until
        the key expires or is written."""
        check_client(client, "L2")
        if max_variants < 1:
            raise ValueError("an L2 needs room for at least one variant of a key")
        self._max_variants = max_variants
        if timeout <= 0:
            raise ValueError("the L2 timeout must be positive")
        self._client = client
        self._prefix = key_prefix
        self._timeout = timeout
        self._clock: Clock = clock or SystemClock()
        self._fence_ms = max(1, round(fence * 1000))
        self._fill = client.register_script(FILL)
        self._drop = client.register_script(_DROP)
        self._replace = client.register_script(_REPLACE)
        self._store = client.register_script(_STORE)
        self._reads = PipelinedReads(client, lambda: self._bounded("get"))
        # On a Cluster a script may touch one slot only: each fill is a call of its own there.
        self._fills = (
            None
            if isinstance(client, RedisCluster)
            else PipelinedFills(
                client,
                lambda: self._bounded("set"),
                slack=CLOCK_SLACK,
                max_variants=max_variants,
            )
        )

    async def get(self, key: str, variant: str = "") -> Stored | None:
        return await self.get_soon(key, variant)

    def get_soon(self, key: str, variant: str = "") -> asyncio.Future[Stored | None]:
        """``get``, as a future, sent with the other reads of this round of the event loop
        (``cache.redis.reads``): ``TierUnavailable`` shared by every read of a failed round
        trip, ``CorruptEntry`` for that key alone."""
        return self._reads.get_soon(self.entry_name(key), variant)

    async def set(
        self,
        key: str,
        variant: str,
        entry: Entry,
        ttl: float,
        *,
        fetched_at: float | None = None,
        tags: Sequence[str] = (),
    ) -> None:
        if ttl <= 0:
            return
        name = self.entry_name(key)
        data = encode(entry)
        ttl_ms = max(1, round(ttl * 1000))
        if tags:
            async with self._bounded("set"):
                await self._index(key, tags, ttl_ms)
        if fetched_at is not None and self._fills is not None:
            await self._fills.fill_soon(name, variant, data, fetched_at, ttl_ms)
            return
        async with self._bounded("set"):
            if fetched_at is not None:
                await self._fill(
                    keys=[name],
                    args=[variant, data, fetched_at, ttl_ms, CLOCK_SLACK, self._max_variants],
                )
                return
            await self._store(keys=[name], args=[variant, data, ttl_ms, self._max_variants])

    async def delete(self, key: str) -> bool:
        """Drop every variant of ``key`` and mark it written now (see the module docstring)."""
        async with self._bounded("delete"):
            removed: int = await self._drop(
                keys=[self.entry_name(key)], args=[self._clock.time(), self._fence_ms]
            )
        return removed > 0

    async def replace(
        self,
        key: str,
        variant: str,
        entry: Entry,
        ttl: float,
        *,
        version: int | None = None,
        tags: Sequence[str] = (),
    ) -> bool:
        """Make ``entry`` the key's only variant, marked written now, in one step.

        ``version`` orders writes made by different replicas (the write-behind queue's sequence
        number): a key already holding a newer version is left as it is (False).
        """
        data = encode(entry)
        async with self._bounded("replace"):
            await self._index(key, tags, max(1, round(ttl * 1000)))
            stored: int = await self._replace(
                keys=[self.entry_name(key)],
                args=[
                    variant,
                    data,
                    max(1, round(ttl * 1000)),
                    self._clock.time(),
                    self._fence_ms,
                    "" if version is None else version,
                ],
            )
        return bool(stored)

    async def _index(self, key: str, tags: Sequence[str], ttl_ms: int) -> None:
        """Add ``key`` to each tag's set, which lives at least as long as the entry.

        Indexed before the entry is stored, so a purge by tag never misses a stored entry (a
        member whose entry is gone costs one needless drop). The set's TTL only grows (NX sets
        it on a new set, GT lengthens it), so it never outlives the entries by more than the
        longest of them, and untagged entries are never indexed.
        """
        if not tags:
            return
        pipe = self._client.pipeline(transaction=False)
        for tag in tags:
            name = self._prefix + TAG + tag
            pipe.sadd(name, key)
            pipe.pexpire(name, ttl_ms, nx=True)
            pipe.pexpire(name, ttl_ms, gt=True)
        await pipe.execute()

    async def tagged(self, tag: str, batch: int = 500) -> AsyncIterator[list[str]]:
        """The keys indexed under ``tag``, a batch at a time (SSCAN: a tag of any size is read
        in bounded calls); the index is left as it is (``drop_tag`` once they are purged)."""
        name = self._prefix + TAG + tag
        cursor = 0
        while True:
            async with self._bounded("purge"):
                cursor, members = await self._client.sscan(name, cursor, count=batch)
            if members:
                yield sorted({_text(member) for member in members})
            if cursor == 0:
                return

    async def drop_tag(self, tag: str) -> None:
        async with self._bounded("purge"):
            await self._client.delete(self._prefix + TAG + tag)

    async def keys_with_prefix(self, prefix: str, batch: int = 500) -> AsyncIterator[list[str]]:
        """The keys starting with ``prefix``, a batch at a time (SCAN, never KEYS); cachecar's
        own records are never among them.

        Keys dropped by a write are kept a while as marks (see the module docstring): they
        are listed too, and a drop of one removes nothing.
        """
        pattern = _glob_escape(self.entry_name(prefix)) + "*"
        async with self._bounded("purge"):
            nodes = await _primaries(self._client)
        for node in nodes:
            cursor = 0
            while True:
                async with self._bounded("purge"):
                    cursor, found = await _scan(self._client, node, cursor, pattern, batch)
                keys = [key for key in map(self._logical, found) if key is not None]
                if keys:
                    yield keys
                if cursor == 0:
                    break

    def entry_name(self, key: str) -> str:
        """The Redis name of ``key``'s entry."""
        return self._prefix + ("!" + key if key.startswith(OWN) else key)

    def _logical(self, name: bytes | str) -> str | None:
        """The key whose entry ``name`` is; None for cachecar's own records."""
        rest = _text(name)[len(self._prefix) :]
        if rest.startswith("!") and rest[1:].startswith(OWN):
            return rest[1:]
        return None if rest.startswith(OWN) else rest

    async def connect(self) -> None:
        """``connect_quietly``: the first reads of a start must not pay for the set-up."""
        await connect_quietly(self._client)

    async def ping(self) -> None:
        """Raises ``TierUnavailable`` unless Redis answers within the timeout."""
        async with self._bounded("ping"):
            await self._client.ping()

    async def aclose(self) -> None:
        await self._reads.settle()
        if self._fills is not None:
            await self._fills.settle()
        await close_quietly(self._client)

    def _bounded(self, op: str) -> contextlib.AbstractAsyncContextManager[None]:
        return bounded(op, self._timeout)


@contextlib.asynccontextmanager
async def bounded(op: str, within: float, guard: Guard | None = None) -> AsyncIterator[None]:
    """One Redis call (or pipeline, or script) within ``within`` seconds, failures translated.

    Slow, refused, reset or an error reply: ``TierUnavailable``. A key of another Redis type
    (Redis is fine; the key holds something that is not ours): ``CorruptEntry``. With a
    ``guard``, the call is first allowed by the process's L2 breaker (else ``CircuitOpen``,
    and Redis is not asked) and its outcome reported to it.
    """
    if guard is None:
        async with _translated(op, within):
            yield
        return
    async with guard.call(op), _translated(op, within):
        yield


@contextlib.asynccontextmanager
async def _translated(op: str, within: float) -> AsyncIterator[None]:
    try:
        async with asyncio.timeout(within):
            yield
    except TimeoutError as exc:
        raise TierUnavailable(op, f"no answer within {within * 1000:g}ms") from exc
    except ResponseError as exc:
        if "WRONGTYPE" in str(exc):
            raise CorruptEntry(f"{op}: the key holds another Redis type") from exc
        raise TierUnavailable(op, _describe(exc)) from exc
    except (RedisError, RedisClusterException, OSError) as exc:
        # RedisClusterException is no RedisError: a cluster no seed of which answers, say.
        raise TierUnavailable(op, _describe(exc)) from exc


async def connect_quietly(client: RedisClient) -> None:
    """Open a connection (on a Cluster: learn its slots and nodes) before traffic needs one;
    a Redis that does not answer is no error here (the calls that need it will say)."""
    with contextlib.suppress(RedisError, RedisClusterException, OSError):
        await client.ping()


async def close_quietly(client: RedisClient) -> None:
    """Close ``client``; a Redis that is already gone is no error at shutdown."""
    with contextlib.suppress(RedisError, RedisClusterException, OSError):
        await client.aclose()


async def _primaries(client: RedisClient) -> list[ClusterNode | None]:
    """Where SCAN must go to see every key: each primary of a cluster (a SCAN sees the keys
    of the node it runs on), or the one Redis (None)."""
    if not isinstance(client, RedisCluster):
        return [None]
    await client.initialize()  # the nodes are known once the client has asked a seed
    return list(client.get_primaries())


async def _scan(
    client: RedisClient, node: ClusterNode | None, cursor: int, pattern: str, count: int
) -> tuple[int, list[bytes | str]]:
    """One SCAN step on ``node`` (None: the one Redis): the next cursor and the names found."""
    if node is None or not isinstance(client, RedisCluster):
        found: Any = await client.scan(cursor, match=pattern, count=count)
        return int(found[0]), list(found[1])
    # A cluster client answers a SCAN sent to one node with that node's cursor by name.
    answer: Any = await client.scan(cursor, match=pattern, count=count, target_nodes=node)
    cursors, names = answer
    return int(cursors[node.name]), list(names)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _glob_escape(text: str) -> str:
    """``text`` matched literally by a Redis glob pattern."""
    return "".join("\\" + char if char in "*?[]\\" else char for char in text)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
