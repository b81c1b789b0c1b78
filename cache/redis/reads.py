"""L2 reads, auto-pipelined: the reads asked for in one round of the event loop go to Redis in
one round trip.

    get_soon(name, variant) -> a future; the first read of a round schedules the send
    end of the round        -> the reads, each (name, variant) once however many asked, in
                               round trips of up to MAX_BATCH: one Lua script (HGET + PTTL per
                               key) on one Redis, a pipeline on a Cluster (a script may touch
                               one slot only; redis-py splits the pipeline by node)
    the answers             -> each waiting future: the entry and its time left, None, or
                               CorruptEntry (a key of another type, bytes that are no
                               entry: that key alone); a failed round trip fails every read
                               it carried with one TierUnavailable, one failure for the breaker

A read costs the event loop far less this way than a call of its own (redis-py spends about a
hundred microseconds of Python on each call, whatever it carries).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError

from cache.entry import decode
from cache.errors import CorruptEntry, TierError
from cache.redis.client import RedisClient
from cache.tier import Stored

# KEYS: the keys   ARGV: their variants   -> per key: the envelope (or nil), the key's PTTL
# A key of another Redis type answers -2 in place of its envelope: one foreign key must not fail
# the reads of the others.
_GET_MANY = """
local out = {}
for i = 1, #KEYS do
  local value = redis.pcall('HGET', KEYS[i], ARGV[i])
  if type(value) == 'table' and value.err then
    value = -2
  end
  out[2 * i - 1] = value
  out[2 * i] = redis.call('PTTL', KEYS[i])
end
return out
"""
_WRONG_TYPE = -2
# Reads sent in one round trip at most; more wait for the next one, sent at the same time.
MAX_BATCH = 128
# One read to send: (Redis name, variant), and every future waiting for it.
_Read = tuple[tuple[str, str], list["asyncio.Future[Stored | None]"]]


def _answer(
    waiting: list[asyncio.Future[Stored | None]], outcome: Stored | Exception | None
) -> None:
    for future in waiting:
        if future.done():
            continue
        if isinstance(outcome, Exception):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)


class PipelinedReads:
    """The reads of one client; ``bounded()`` bounds and translates each round trip."""

    def __init__(
        self,
        client: RedisClient,
        bounded: Callable[[], contextlib.AbstractAsyncContextManager[None]],
    ) -> None:
        self._client = client
        self._bounded = bounded
        self._get_many = client.register_script(_GET_MANY)
        self._cluster = isinstance(client, RedisCluster)
        # Asked for in this round of the event loop, by (Redis name, variant).
        self._reads: dict[tuple[str, str], list[asyncio.Future[Stored | None]]] = {}
        self._reading: set[asyncio.Task[None]] = set()

    def get_soon(self, name: str, variant: str) -> asyncio.Future[Stored | None]:
        """What the hash ``name`` holds for ``variant``, with the time it has left, as a future
        answered once the round trip this read goes in is back."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Stored | None] = loop.create_future()
        if not self._reads:
            loop.call_soon(self._send_reads)
        self._reads.setdefault((name, variant), []).append(future)
        return future

    def _send_reads(self) -> None:
        reads, self._reads = list(self._reads.items()), {}
        for start in range(0, len(reads), MAX_BATCH):
            task = asyncio.create_task(self._read(reads[start : start + MAX_BATCH]))
            self._reading.add(task)
            task.add_done_callback(self._reading.discard)

    async def _read(self, reads: list[_Read]) -> None:
        # A caller may have left meanwhile: a read nobody waits for is not sent.
        reads = [(at, waiting) for at, waiting in reads if not all(f.done() for f in waiting)]
        if not reads:
            return
        try:
            async with self._bounded():
                if self._cluster:
                    # Keys of a batch live in many slots, and a script may touch one only: a
                    # pipeline, which redis-py splits by node.
                    pipe = self._client.pipeline(transaction=False)
                    for (name, variant), _ in reads:
                        pipe.hget(name, variant)
                        pipe.pttl(name)
                    replies = await pipe.execute(raise_on_error=False)
                else:
                    replies = await self._get_many(
                        keys=[name for (name, _), _ in reads],
                        args=[variant for (_, variant), _ in reads],
                    )
        except TierError as exc:
            for _, waiting in reads:
                _answer(waiting, exc)
            return
        for i, (_, waiting) in enumerate(reads):
            raw, pttl = replies[2 * i], replies[2 * i + 1]
            if raw is None:
                _answer(waiting, None)
            elif raw == _WRONG_TYPE or isinstance(raw, ResponseError):
                _answer(waiting, CorruptEntry("get: the key holds another Redis type"))
            else:
                try:
                    entry = decode(raw)
                except CorruptEntry as exc:
                    _answer(waiting, exc)
                    continue
                # -1: no expiry on the key (written by something else); the envelope still
                # bounds it.
                _answer(waiting, Stored(entry, pttl / 1000 if pttl >= 0 else entry.ttl))

    async def settle(self) -> None:
        """Wait for the round trips under way (each is bounded)."""
        if self._reading:
            await asyncio.wait(self._reading)
