"""Write-behind against a model: random interleavings of writes, reads, flushes, origin outages,
crashes and restarts.

The model is two facts. Every read returns the last acknowledged value of its key (or what the
origin held before any write). Once the origin is back and the queue drained, the origin holds the
last acknowledged value of every key, and no key's values ever reached it out of order.

The system under test is the engine as a replica runs it: L1 (memory), L2 and the queue on one
Redis (fakeredis: one server that outlives every "process"), the flusher, ``WriteBehind``.
A restart drops the process (L1, in-flight claims) and builds a new one on the same Redis.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial

import fakeredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cache.entry import Entry
from cache.flusher import Backoff, Flusher, Outcome, Sent
from cache.memory import MemoryTier
from cache.queue import QueuedWrite, WriteQueue
from cache.redis_tier import RedisTier
from cache.tiered import Loaded, TieredCache
from cache.write_behind import WriteBehind
from tests.fakes import FakeClock

KEYS = ["a", "b", "c"]
TTL = 60.0
PREFIX = "model:"


@dataclass
class Origin:
    """The data store: a dict, which can be down; it logs each key's applied sequence numbers."""

    data: dict[str, bytes] = field(default_factory=dict)
    down: bool = False
    applied: dict[str, list[int]] = field(default_factory=dict)
    # Run once inside the next send, after the origin applied it: a write racing a flush.
    during_send: Callable[[], Awaitable[None]] | None = None

    async def send(self, write: QueuedWrite) -> Sent:
        if self.down:
            return Sent(Outcome.RETRY, "origin down")
        # The target carries the write's number, so the order of arrival can be checked.
        n = int(write.target.rpartition("n=")[2])
        self.applied.setdefault(write.key, []).append(n)
        if write.method == "PUT":
            self.data[write.key] = write.entry.body
        else:
            self.data.pop(write.key, None)
        racing, self.during_send = self.during_send, None
        if racing is not None:
            await racing()
        return Sent(Outcome.OK)

    async def load(self, key: str) -> Loaded:
        body = self.data.get(key)
        status = 404 if body is None else 200
        return Loaded(Entry(status, (), body or b"", 0.0, TTL), TTL, TTL)


class Replica:
    """One process: its own L1 and clients, sharing the Redis server and the clock."""

    def __init__(self, server: fakeredis.FakeServer, origin: Origin, clock: FakeClock) -> None:
        l1 = MemoryTier(max_entries=2, max_bytes=1 << 20, clock=clock)  # tiny: evictions happen
        l2 = RedisTier(fakeredis.FakeAsyncRedis(server=server), key_prefix=PREFIX, timeout=5.0)
        self.cache = TieredCache(l1, l2, clock=clock)
        queue = WriteQueue(
            fakeredis.FakeAsyncRedis(server=server),
            key_prefix=PREFIX,
            timeout=5.0,
            clock=clock,
            coalesce_for=1.0,  # writes of a key within 1s become one send; ticks move past it
        )
        self.flusher = Flusher(
            queue,
            origin,
            clock=clock,
            interval=1.0,
            batch_size=2,
            concurrency=2,
            max_attempts=10_000,  # the model has no dead letters: an outage always ends
            backoff=Backoff(0.5, 4.0, random.Random(0)),
            send_timeout=1.0,
            on_dead=self.cache.invalidate,
        )
        self.write_behind = WriteBehind(self.cache, queue, self.flusher)
        self.origin = origin

    async def write(self, key: str, n: int, value: bytes | None) -> None:
        now = 1_700_000_000.0
        if value is None:
            entry = Entry(404, (), b"", now, TTL)
            write = QueuedWrite(key, "DELETE", f"/{key}?n={n}", entry)
        else:
            write = QueuedWrite(key, "PUT", f"/{key}?n={n}", Entry(200, (), value, now, TTL))
        await self.write_behind.write(write, "", l1_ttl=TTL, l2_ttl=TTL)

    async def read(self, key: str) -> bytes | None:
        async def from_origin() -> Loaded:
            return await self.origin.load(key)

        loader = self.write_behind.loader(key, from_origin, l1_ttl=TTL, l2_ttl=TTL)
        lookup = await self.cache.get(key, "", l1_ttl=TTL, loader=loader)
        return None if lookup.entry.status == 404 else lookup.entry.body

    async def crash_mid_flush(self) -> None:
        """Claim and send a batch, then die before recording it: the sends happened, no acks."""
        for claim in await self.write_behind.queue.claim(2, self.flusher.lease):
            await self.origin.send(claim.write)

    async def close(self) -> None:
        await self.cache.aclose()
        await self.write_behind.queue.aclose()


key = st.sampled_from(KEYS)
operations = st.lists(
    st.one_of(
        st.tuples(st.just("put"), key),
        st.tuples(st.just("delete"), key),
        st.tuples(st.just("read"), key),
        st.tuples(st.just("put_during_flush"), key),
        st.tuples(st.just("flush"), st.none()),
        st.tuples(st.just("origin_down"), st.booleans()),
        st.tuples(st.just("tick"), st.sampled_from([0.3, 2.0, 15.0, 90.0])),
        st.tuples(st.just("lose_l2"), st.none()),
        st.tuples(st.just("restart"), st.none()),
        st.tuples(st.just("crash_mid_flush"), st.none()),
    ),
    min_size=8,
    max_size=60,
)


async def acknowledge(
    replica: Replica, acknowledged: dict[str, bytes | None], key: str, n: int, value: bytes | None
) -> None:
    """A client's write: once ``write`` returns, the value is acknowledged."""
    await replica.write(key, n, value)
    acknowledged[key] = value


async def play(steps: list[tuple[str, object]], initial: dict[str, bytes]) -> None:
    server = fakeredis.FakeServer()
    clock = FakeClock()
    origin = Origin(data=dict(initial))
    replica = Replica(server, origin, clock)
    acknowledged: dict[str, bytes | None] = dict(initial)
    n = 0
    for op, arg in steps:
        if op in {"put", "delete"}:
            assert isinstance(arg, str)
            n += 1
            value = f"{arg}={n}".encode() if op == "put" else None
            await acknowledge(replica, acknowledged, arg, n, value)
        elif op == "put_during_flush":
            assert isinstance(arg, str)
            n += 1
            racing = partial(acknowledge, replica, acknowledged, arg, n, f"{arg}={n}".encode())
            origin.during_send = racing
            await replica.flusher.flush_once()
            if origin.during_send is not None:  # nothing was sent: the write just happens
                await racing()
                origin.during_send = None
        elif op == "read":
            assert isinstance(arg, str)
            assert await replica.read(arg) == acknowledged.get(arg), f"read of {arg}"
        elif op == "flush":
            await replica.flusher.flush_once()
        elif op == "origin_down":
            origin.down = bool(arg)
        elif op == "tick":
            assert isinstance(arg, float)
            clock.advance(arg)
        elif op == "lose_l2":  # Redis evicted the cached entries (never the queue)
            client = fakeredis.FakeAsyncRedis(server=server)
            for name in KEYS:
                await client.delete(PREFIX + name)
        elif op in {"restart", "crash_mid_flush"}:
            if op == "crash_mid_flush":
                await replica.crash_mid_flush()
            await replica.close()
            replica = Replica(server, origin, clock)

    origin.down = False
    for _ in range(1000):
        clock.advance(replica.flusher.lease + 5.0)  # past every backoff and every dead lease
        await replica.flusher.drain(10.0)
        if (await replica.write_behind.queue.stats()).depth == 0:
            break
    assert (await replica.write_behind.queue.stats()).depth == 0
    for name in KEYS:
        assert origin.data.get(name) == acknowledged.get(name), f"origin's {name}"
        assert await replica.read(name) == acknowledged.get(name), f"final read of {name}"
        applied = origin.applied.get(name, [])
        # In order; a write sent twice (a crash between send and ack) repeats only in place.
        assert applied == sorted(applied), f"{name} reached the origin out of order: {applied}"
    await replica.close()


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    steps=operations,
    initial=st.dictionaries(key, st.binary(min_size=1, max_size=4), max_size=3),
)
def test_write_behind_matches_the_model(
    steps: list[tuple[str, object]], initial: dict[str, bytes]
) -> None:
    asyncio.run(play(steps, initial))
