"""Write-behind against a model: random interleavings of writes, reads, flushes, origin outages
and refusals, stalls past a lease, crashes, restarts and replays, on two replicas.

The model is three facts. Every read returns the last acknowledged value of its key (or what the
origin held before any write), unless the origin refused that write and it sits in the dead
letters. No key's values reach the origin out of order. Once the origin is back and accepts
everything, the dead letters are replayed and the queue drained, the origin holds the last
acknowledged value of every key.

The system under test is the engine as replicas run it: each its own L1 (tiny, so evictions
happen), L2 and the queue on one shared Redis (fakeredis: one server that outlives every
"process"), the flusher, ``WriteBehind``. Besides whole flush rounds, a send is split into
three steps: claimed, arrived at the origin (within the send timeout, else it timed out and
was not applied), settled (ack or retry). Between them a replica can stall past its lease while
the other takes the key over and a newer write is sent. A restart drops a process (L1, its
sends in flight) and builds a new one on the same Redis; a crash mid-write kills it between the
queue and the tiers, the write queued and never acknowledged: until it has reached the origin,
reads of its key may see it or what it replaced, and from then on they must see it.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial

import fakeredis
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from cache.entry import Entry
from cache.lookup import Loaded
from cache.memory import MemoryTier
from cache.redis.tier import RedisTier
from cache.tiered import TieredCache
from cache.write_behind.flusher import Backoff, Flusher, Outcome, Sent
from cache.write_behind.queue import WriteQueue
from cache.write_behind.records import Claim, QueuedWrite
from cache.write_behind.writer import WriteBehind
from tests.fakes import FakeClock

KEYS = ["a", "b"]
REPLICAS = 2
TTL = 60.0
SEND_TIMEOUT = 5.0  # longer than the coalescing window (1s), as with the defaults
PREFIX = "model:"


@dataclass
class Origin:
    """The data store: a dict, which can be down or refuse keys; it logs what it applied."""

    data: dict[str, bytes] = field(default_factory=dict)
    down: bool = False
    refused: set[str] = field(default_factory=set)
    applied: dict[str, list[int]] = field(default_factory=dict)
    # Run once inside the next send, after the origin applied it: a write racing a flush.
    during_send: Callable[[], Awaitable[None]] | None = None

    async def send(self, write: QueuedWrite) -> Sent:
        if self.down:
            return Sent(Outcome.RETRY, "origin down")
        if write.key in self.refused:
            return Sent(Outcome.PERMANENT, "the origin answered 422")
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


def _write(key: str, n: int, value: bytes | None) -> QueuedWrite:
    now = 1_700_000_000.0
    if value is None:
        return QueuedWrite(key, "DELETE", f"/{key}?n={n}", Entry(404, (), b"", now, TTL))
    return QueuedWrite(key, "PUT", f"/{key}?n={n}", Entry(200, (), value, now, TTL))


class Replica:
    """One process: its own L1 and clients, sharing the Redis server and the clock."""

    def __init__(self, server: fakeredis.FakeServer, origin: Origin, clock: FakeClock) -> None:
        l1 = MemoryTier(max_entries=2, max_bytes=1 << 20, clock=clock)
        l2 = RedisTier(
            fakeredis.FakeAsyncRedis(server=server), key_prefix=PREFIX, timeout=5.0, clock=clock
        )
        self.cache = TieredCache(l1, l2, clock=clock)
        self.queue = WriteQueue(
            fakeredis.FakeAsyncRedis(server=server),
            key_prefix=PREFIX,
            timeout=5.0,
            clock=clock,
            coalesce_for=1.0,  # writes of a key within 1s become one send; ticks move past it
        )
        self.flusher = Flusher(
            self.queue,
            origin,
            clock=clock,
            interval=1.0,
            batch_size=2,
            concurrency=2,
            max_attempts=10_000,  # an outage always ends; refusals dead-letter at once
            backoff=Backoff(0.5, 4.0, random.Random(0)),
            send_timeout=SEND_TIMEOUT,
            on_dead=self.cache.invalidate,
        )
        self.write_behind = WriteBehind(self.cache, self.queue, self.flusher)
        self.origin = origin
        self.clock = clock
        self.in_flight: list[tuple[Claim, float]] = []  # claimed and sent, when the send began
        self.unsettled: list[tuple[Claim, Sent]] = []  # arrived (or timed out), not settled

    async def write(self, key: str, n: int, value: bytes | None) -> None:
        await self.write_behind.write(_write(key, n, value), "", l1_ttl=TTL, l2_ttl=TTL)

    async def crash_mid_write(self, key: str, n: int, value: bytes) -> None:
        """Die once the queue has the write, before the tiers are given it."""
        await self.queue.enqueue(_write(key, n, value))

    async def read(self, key: str) -> bytes | None:
        async def from_origin() -> Loaded:
            return await self.origin.load(key)

        loader = self.write_behind.loader(key, from_origin, l1_ttl=TTL, l2_ttl=TTL)
        lookup = await self.cache.get(key, "", l1_ttl=TTL, loader=loader)
        return None if lookup.entry.status == 404 else lookup.entry.body

    async def start_sends(self) -> None:
        """Claim a batch and start sending what the lease leaves time for (as ``_flush``)."""
        now = self.clock.time()
        for claim in await self.queue.claim(2, self.flusher.lease):
            if now + SEND_TIMEOUT <= claim.lease / 1000:
                self.in_flight.append((claim, now))

    async def arrive(self) -> None:
        """The sends in flight reach the origin, unless they took longer than the timeout."""
        in_flight, self.in_flight = self.in_flight, []
        for claim, began in in_flight:
            if self.clock.time() - began > SEND_TIMEOUT:
                sent = Sent(Outcome.RETRY, "no answer within the send timeout")
            else:
                sent = await self.origin.send(claim.write)
            self.unsettled.append((claim, sent))

    async def settle(self) -> None:
        """The replica records what the origin said (it may have stalled past its lease)."""
        unsettled, self.unsettled = self.unsettled, []
        for claim, sent in unsettled:
            await self.flusher._settle(claim, sent)

    async def crash_mid_flush(self) -> None:
        """Claim and send a batch, then die before recording it: the sends happened, no acks."""
        for claim in await self.queue.claim(2, self.flusher.lease):
            await self.origin.send(claim.write)

    async def close(self) -> None:
        await self.cache.aclose()
        await self.queue.aclose()


@dataclass
class World:
    server: fakeredis.FakeServer
    clock: FakeClock
    origin: Origin
    replicas: list[Replica]
    acknowledged: dict[str, bytes | None]
    written_by: dict[str, int] = field(default_factory=dict)  # which replica wrote a key last
    # Keys whose last write was queued by a replica that died before the tiers had it.
    uncertain: set[str] = field(default_factory=set)
    n: int = 0

    async def write(self, r: int, key: str, put: bool) -> None:
        self.n += 1
        value = f"{key}={self.n}".encode() if put else None
        await self.replicas[r].write(key, self.n, value)
        self.acknowledged[key] = value
        self.written_by[key] = r
        self.uncertain.discard(key)

    async def crash_mid_write(self, r: int, key: str) -> None:
        self.n += 1
        value = f"{key}={self.n}".encode()
        await self.replicas[r].crash_mid_write(key, self.n, value)
        await self.replicas[r].close()
        self.replicas[r] = Replica(self.server, self.origin, self.clock)
        self.acknowledged[key] = value  # queued: it reaches the origin (unless refused)
        self.written_by[key] = -1  # whoever flushes it drops it from the tiers
        self.uncertain.add(key)

    async def certain(self, key: str) -> bool:
        """Whether reads of ``key`` must see its last write: one not cut short by a crash, or
        one that has reached the origin since."""
        if key in self.uncertain and await self.replicas[0].queue.pending(key) is None:
            self.uncertain.discard(key)
        return key not in self.uncertain

    async def read(self, r: int, key: str) -> bytes | None:
        replica = self.replicas[r]
        if self.written_by.get(key, r) != r:
            # Another replica wrote it: this one's L1 may be stale until coherence (issue 5)
            # lands; what is checked here is everything shared (L2, the queue, the origin).
            await replica.cache.l1.delete(key)
        return await replica.read(key)

    async def dead(self, key: str) -> bool:
        return any(letter.key == key for letter in await self.replicas[0].queue.dead_letters())


key = st.sampled_from(KEYS)
replica = st.integers(0, REPLICAS - 1)
put = st.tuples(st.just("put"), replica, key)
flush = st.tuples(st.just("flush"), replica, st.none())
tick = st.tuples(st.just("tick"), st.just(0), st.sampled_from([0.3, 1.0, 2.0, 2.0, 15.0, 90.0]))
# Common steps appear more than once: the interesting sequences are chains of them.
operations = st.lists(
    st.one_of(
        put,
        put,
        put,
        flush,
        flush,
        tick,
        tick,
        st.tuples(st.just("delete"), replica, key),
        st.tuples(st.just("read"), replica, key),
        st.tuples(st.just("read"), replica, key),
        st.tuples(st.just("put_during_flush"), replica, key),
        st.tuples(st.just("start_sends"), replica, st.none()),
        st.tuples(st.just("arrive"), replica, st.none()),
        st.tuples(st.just("settle"), replica, st.none()),
        st.tuples(st.just("origin_down"), st.just(0), st.booleans()),
        st.tuples(st.just("refuse"), st.just(0), key),
        st.tuples(st.just("accept"), st.just(0), key),
        st.tuples(st.just("lose_l2"), st.just(0), st.none()),
        st.tuples(st.just("restart"), replica, st.none()),
        st.tuples(st.just("crash_mid_flush"), replica, st.none()),
        st.tuples(st.just("crash_mid_write"), replica, key),
    ),
    min_size=10,
    max_size=80,
)


async def play(steps: list[tuple[str, int, object]], initial: dict[str, bytes]) -> None:
    server = fakeredis.FakeServer()
    clock = FakeClock()
    origin = Origin(data=dict(initial))
    world = World(
        server,
        clock,
        origin,
        [Replica(server, origin, clock) for _ in range(REPLICAS)],
        dict(initial),
    )
    for op, r, arg in steps:
        replica = world.replicas[r]
        if op in {"put", "delete"}:
            assert isinstance(arg, str)
            await world.write(r, arg, op == "put")
        elif op == "put_during_flush":
            assert isinstance(arg, str)
            origin.during_send = partial(world.write, r, arg, True)
            await replica.flusher.flush_once()
            racing, origin.during_send = origin.during_send, None
            if racing is not None:  # nothing was sent: the write just happens
                await racing()
        elif op == "read":
            assert isinstance(arg, str)
            found = await world.read(r, arg)
            if not await world.dead(arg) and await world.certain(arg):
                assert found == world.acknowledged.get(arg), f"read of {arg} on replica {r}"
        elif op == "flush":
            await replica.flusher.flush_once()
        elif op == "start_sends":
            await replica.start_sends()
        elif op == "arrive":
            await replica.arrive()
        elif op == "settle":
            await replica.settle()
        elif op == "origin_down":
            origin.down = bool(arg)
        elif op == "refuse":
            assert isinstance(arg, str)
            origin.refused.add(arg)
        elif op == "accept":
            assert isinstance(arg, str)
            origin.refused.discard(arg)
        elif op == "tick":
            assert isinstance(arg, float)
            clock.advance(arg)
        elif op == "lose_l2":  # Redis evicted the cached entries (never the queue)
            client = fakeredis.FakeAsyncRedis(server=server)
            for name in KEYS:
                await client.delete(PREFIX + name)
        elif op == "crash_mid_write":
            assert isinstance(arg, str)
            await world.crash_mid_write(r, arg)
        elif op in {"restart", "crash_mid_flush"}:
            if op == "crash_mid_flush":
                await replica.crash_mid_flush()
            await replica.close()
            world.replicas[r] = Replica(server, origin, clock)

    # The end: every stalled replica wakes, the origin is back and takes everything, the dead
    # letters are replayed, and the queue drains.
    origin.down = False
    origin.refused.clear()
    for replica in world.replicas:
        await replica.arrive()
        await replica.settle()
    survivor = world.replicas[0]
    await survivor.write_behind.replay()
    for _ in range(1000):
        clock.advance(survivor.flusher.lease + 5.0)  # past every backoff and every dead lease
        await survivor.flusher.drain(10.0)
        if (await survivor.queue.stats()).depth == 0:
            break
    assert (await survivor.queue.stats()).depth == 0
    for name in KEYS:
        assert origin.data.get(name) == world.acknowledged.get(name), f"origin's {name}"
        assert await world.read(0, name) == world.acknowledged.get(name), f"final read of {name}"
        applied = origin.applied.get(name, [])
        # In order; a write sent twice (a crash between send and ack) repeats only in place.
        assert applied == sorted(applied), f"{name} reached the origin out of order: {applied}"
    for replica in world.replicas:
        await replica.close()


# Interleavings that broke earlier cuts, always played; random ones are explored beside them.
READ_AFTER_BOTH_TIERS_DROPPED = [
    ("put", 0, "a"),
    ("lose_l2", 0, None),
    ("restart", 0, None),
    ("read", 0, "a"),
]
WRITE_DURING_A_SEND = [("put", 0, "a"), ("tick", 0, 2.0), ("put_during_flush", 0, "a")]
REPLAY_AFTER_A_NEWER_WRITE = [
    ("put", 0, "a"),
    ("refuse", 0, "a"),
    ("tick", 0, 2.0),
    ("flush", 0, None),  # refused: a dead letter
    ("accept", 0, "a"),
    ("put", 0, "a"),
    ("tick", 0, 2.0),
    ("flush", 0, None),  # the newer write reaches the origin; the end replays dead letters
]
# The old value is in L2 when the crash leaves the new one queued and unsettled.
CRASH_BETWEEN_THE_QUEUE_AND_THE_TIERS = [
    ("put", 0, "a"),
    ("crash_mid_write", 0, "a"),
    ("read", 1, "a"),  # either value: the write was never acknowledged
    ("tick", 0, 2.0),
    ("flush", 1, None),
    ("read", 1, "a"),  # the origin has it: so must every read
    ("read", 0, "a"),
]
SETTLE_AFTER_THE_LEASE_WAS_TAKEN_OVER = [
    ("put", 0, "a"),
    ("tick", 0, 2.0),
    ("start_sends", 0, None),
    ("arrive", 0, None),  # replica 0's send landed; it stalls before recording it
    ("tick", 0, 15.0),  # past its lease
    ("start_sends", 1, None),  # replica 1 takes the key over and sends the same value
    ("put", 0, "a"),
    ("settle", 0, None),  # replica 0 wakes up and records its send
    ("tick", 0, 2.0),
    ("flush", 0, None),  # the newer write must not go while replica 1's send is in flight
    ("arrive", 1, None),
]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example(steps=READ_AFTER_BOTH_TIERS_DROPPED, initial={})
@example(steps=WRITE_DURING_A_SEND, initial={})
@example(steps=REPLAY_AFTER_A_NEWER_WRITE, initial={})
@example(steps=CRASH_BETWEEN_THE_QUEUE_AND_THE_TIERS, initial={})
@example(steps=SETTLE_AFTER_THE_LEASE_WAS_TAKEN_OVER, initial={})
@given(
    steps=operations,
    initial=st.dictionaries(key, st.binary(min_size=1, max_size=4), max_size=3),
)
def test_write_behind_matches_the_model(
    steps: list[tuple[str, int, object]], initial: dict[str, bytes]
) -> None:
    asyncio.run(play(steps, initial))
