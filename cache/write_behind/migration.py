"""How the queue is laid out (``{prefix}{wb}:shards``), and moving it: from the queue of an
older cachecar (one slot, ``{prefix}{wb}:...``), or from another shard count, into the shards.

The old slot and a shard's slot differ on a Cluster, so no one script can move a write: each
is copied into its shard, then dropped from the old slot, and every step may be repeated::

    floor   every shard's seq raised to the old seq at least (L2 keeps the highest version of
            a key it was given, ``!v``: a shard's seq counting from 1 again would have L2
            refuse every new write of a key written before the upgrade)
    for each batch of old writes (HSCAN of the old values):
      peek    (old slot) each write's record, seq, ready and since scores, tries, unsettled
      adopt   (its shard, one script per shard) copied with its old seq, unless the shard's
              ``adopted`` marks say it was copied already, or the shard holds a write of the key
              with a higher seq (a newer one); the mark is set either way
      forget  (old slot) dropped if its seq is still the one copied: a write made to the old
              slot meanwhile (an older replica still running) stays for the next pass
    dead letters likewise (a corpse only where no write of the key waits, as ``FAIL`` keeps it)
    tidy    (old slot) once neither writes nor dead letters are left, what remains of the old
            queue but its seq is deleted

``{prefix}{wb}:shards`` says how the queue is laid out, and every replica follows it, whatever
its own ``write_behind.shards`` (with a warning): two layouts at once would put one key's
writes in two places, numbered by counters that cannot order them. The first replica records
it: its ``write_behind.shards`` for a new queue, or 0 for a queue an older cachecar laid out
(its seq exists), which then stays in its single slot, run by the same scripts as the older
replicas that may still be writing to it (a rolling upgrade is safe). A replica started with
``write_behind.reshard`` (while no other runs) takes its own count instead: the single slot,
or each former shard, is drained as above into the shards its keys belong to now (a key that
stays in its shard is left alone, and a shard that is still one is not tidied away); then the
count is recorded.

An older cachecar started on a queue laid out in shards (a rollback, a straggler) writes to the
single slot: each look moves what it finds, but its writes and the newer replicas' of one key
are not ordered. Stop the older replicas first.

A migrator that dies after an adopt leaves the write in both places: the next pass (this
replica's, or any other's: every replica migrates before its first queue call) adopts it again,
which the mark makes a no-op, and forgets it. The marks also stop a migrator that read an old
write before another replica moved it, and adopts it after the copy was flushed and a newer
write of the key followed, from sending the old one again. They expire a day after the last
adopt. A write is never in neither place, so none is lost; one adopted while an older replica
still held its lease keeps that lease's score, so the two are not sent at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Callable
from typing import Any, cast

from cache.redis.tier import RedisClient
from cache.write_behind.shards import Layout, shard_layouts, shard_of, single_slot

logger = logging.getLogger("cachecar.write_behind")

BATCH = 200  # old writes moved per step
MARKS_FOR_MS = 24 * 3600 * 1000
LEGACY = 0  # {prefix}{wb}:shards for a queue still in the single slot of an older cachecar
PASSES = 3  # an older replica writing meanwhile is caught by the next check, not chased here

Bounded = Callable[[str], contextlib.AbstractAsyncContextManager[None]]

# KEYS: seq   ARGV: floor
FLOOR = """
local held = redis.call('GET', KEYS[1])
if not held or tonumber(held) < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[1])
end
"""

# KEYS: values seqs ready since tries unsettled   ARGV: keys
# Returns key, record, seq, ready, since, tries, unsettled (0/1) of each key still queued.
PEEK = """
local out = {}
for _, key in ipairs(ARGV) do
  local record = redis.call('HGET', KEYS[1], key)
  if record then
    table.insert(out, key)
    table.insert(out, record)
    table.insert(out, redis.call('HGET', KEYS[2], key) or '0')
    table.insert(out, redis.call('ZSCORE', KEYS[3], key) or '0')
    table.insert(out, redis.call('ZSCORE', KEYS[4], key) or '0')
    table.insert(out, redis.call('HGET', KEYS[5], key) or '0')
    table.insert(out, redis.call('HEXISTS', KEYS[6], key))
  end
end
return out
"""

# KEYS: values seqs ready since tries unsettled adopted
# ARGV: marks_for_ms, then key record seq ready since tries unsettled for each write
# A key the shard holds already keeps its ready score (it may be a lease) and its tries.
ADOPT = """
for i = 2, #ARGV, 7 do
  local key = ARGV[i]
  local seq = tonumber(ARGV[i + 2])
  local mark = 'v:' .. key
  if tonumber(redis.call('HGET', KEYS[7], mark) or '-1') < seq then
    redis.call('HSET', KEYS[7], mark, ARGV[i + 2])
    if tonumber(redis.call('HGET', KEYS[2], key) or '-1') < seq then
      redis.call('HSET', KEYS[1], key, ARGV[i + 1])
      redis.call('HSET', KEYS[2], key, ARGV[i + 2])
      redis.call('ZADD', KEYS[3], 'NX', ARGV[i + 3], key)
      local since = redis.call('ZSCORE', KEYS[4], key)
      if not since or tonumber(since) > tonumber(ARGV[i + 4]) then
        redis.call('ZADD', KEYS[4], ARGV[i + 4], key)
      end
      if ARGV[i + 5] ~= '0' then
        redis.call('HSETNX', KEYS[5], key, ARGV[i + 5])
      end
      if ARGV[i + 6] == '1' then
        redis.call('HSET', KEYS[6], key, ARGV[i + 2])
      end
    end
  end
end
redis.call('PEXPIRE', KEYS[7], ARGV[1])
"""

# KEYS: values seqs ready since tries unsettled   ARGV: key seq for each write adopted
FORGET = """
for i = 1, #ARGV, 2 do
  local key = ARGV[i]
  if redis.call('HGET', KEYS[2], key) == ARGV[i + 1] then
    redis.call('HDEL', KEYS[1], key)
    redis.call('HDEL', KEYS[2], key)
    redis.call('HDEL', KEYS[5], key)
    redis.call('HDEL', KEYS[6], key)
    redis.call('ZREM', KEYS[3], key)
    redis.call('ZREM', KEYS[4], key)
  end
end
"""

# KEYS: dead corpses   ARGV: keys   Returns key, letter, corpse ('' when none) of each.
PEEK_DEAD = """
local out = {}
for _, key in ipairs(ARGV) do
  local letter = redis.call('HGET', KEYS[1], key)
  if letter then
    table.insert(out, key)
    table.insert(out, letter)
    table.insert(out, redis.call('HGET', KEYS[2], key) or '')
  end
end
return out
"""

# KEYS: values dead corpses adopted   ARGV: marks_for_ms, then key letter corpse for each
# A dead letter the shard has for the key is newer; a write waiting keeps the corpse out (its
# replay would undo that write).
ADOPT_DEAD = """
for i = 2, #ARGV, 3 do
  local key = ARGV[i]
  local mark = 'd:' .. key
  if redis.call('HGET', KEYS[4], mark) ~= ARGV[i + 1] then
    redis.call('HSET', KEYS[4], mark, ARGV[i + 1])
    if redis.call('HEXISTS', KEYS[2], key) == 0 then
      redis.call('HSET', KEYS[2], key, ARGV[i + 1])
      if ARGV[i + 2] ~= '' and redis.call('HEXISTS', KEYS[1], key) == 0 then
        redis.call('HSET', KEYS[3], key, ARGV[i + 2])
      end
    end
  end
end
redis.call('PEXPIRE', KEYS[4], ARGV[1])
"""

# KEYS: dead corpses   ARGV: key letter for each dead letter adopted
FORGET_DEAD = """
for i = 1, #ARGV, 2 do
  if redis.call('HGET', KEYS[1], ARGV[i]) == ARGV[i + 1] then
    redis.call('HDEL', KEYS[1], ARGV[i])
    redis.call('HDEL', KEYS[2], ARGV[i])
  end
end
"""

# KEYS: values dead ready since tries unsettled corpses   Returns 1 when the old queue is gone.
TIDY = """
if redis.call('EXISTS', KEYS[1], KEYS[2]) > 0 then
  return 0
end
redis.call('DEL', KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7])
return 1
"""


@dataclasses.dataclass(frozen=True)
class _Kind:
    """What is moved: queued writes or dead letters."""

    hash: str  # the source's hash that lists them
    source: tuple[str, ...]  # the source's keys its peek and forget scripts take
    target: tuple[str, ...]  # a shard's keys its adopt script takes
    width: int  # fields per entry the peek returns (the key first)
    token: int  # which of them the forget compares
    scripts: tuple[str, str, str]  # peek, adopt, forget


_WRITE = ("values", "seqs", "ready", "since", "tries", "unsettled")
_WRITES = _Kind("values", _WRITE, (*_WRITE, "adopted"), 7, 2, (PEEK, ADOPT, FORGET))
_DEAD = _Kind(
    "dead",
    ("dead", "corpses"),
    ("values", "dead", "corpses", "adopted"),
    3,
    1,
    (PEEK_DEAD, ADOPT_DEAD, FORGET_DEAD),
)
_LEFTOVERS = ("values", "dead", "ready", "since", "tries", "unsettled", "corpses")


class Migration:
    """Moves into ``shards`` what the single-slot queue holds, and what shards of another count
    hold (``write_behind.shards`` changed); ``run`` is safe to repeat, from any replica."""

    def __init__(
        self, client: RedisClient, key_prefix: str, shards: list[Layout], *, reshard: bool = False
    ) -> None:
        """``shards``: the queue's layouts, replaced in place by the recorded count's when the
        queue was laid out in another and not ``reshard`` (the module docstring)."""
        self._client = client
        self._reshard = reshard
        self._prefix = key_prefix
        self._single = single_slot(key_prefix)
        # The shard count the queue was last laid out in, beside the single slot's seq.
        self._count = f"{key_prefix}{{wb}}:shards"
        self._shards = shards
        self._floored: dict[str, int] = {}  # per source: the seq the shards were raised to
        self._floor = client.register_script(FLOOR)
        self._tidy = client.register_script(TIDY)
        self._scripts = {
            kind.hash: tuple(client.register_script(script) for script in kind.scripts)
            for kind in (_WRITES, _DEAD)
        }

    async def run(self, bounded: Bounded) -> int:
        """One pass; returns how many writes and dead letters it moved. Each Redis call is
        made within ``bounded(op)``."""
        count = len(self._shards)
        async with bounded("migrate"):
            pipe = self._client.pipeline(transaction=False)
            pipe.get(self._single["seq"])
            pipe.exists(self._single["values"], self._single["dead"])
            pipe.get(self._count)
            seq, left, before = await pipe.execute()
        if before is None:
            # A queue an older cachecar laid out (its seq exists) keeps its one slot: older
            # replicas may still write to it (a rolling upgrade), and one queue orders a key.
            first = LEGACY if seq is not None else count
            async with bounded("migrate"):
                if await self._client.set(self._count, first, nx=True):
                    before = first
                else:
                    before = await self._client.get(self._count)  # another replica's, just now
        recorded = int(before)
        if recorded != count and not self._reshard:
            self._follow(recorded, count)
            count = recorded
        moved = 0
        if seq is not None and count != LEGACY:
            moved += await self._drain(bounded, self._single, int(seq), bool(left), None)
        if recorded != count:
            # write_behind.reshard: each key whose shard is another now is moved there (from
            # the single slot, just above, when the queue was an older cachecar's).
            for i in range(recorded):
                source = Layout(self._prefix, f"wb:{i}")
                async with bounded("migrate"):
                    pipe = self._client.pipeline(transaction=False)
                    pipe.get(source["seq"])
                    pipe.exists(source["values"], source["dead"])
                    seq, left = await pipe.execute()
                if seq is not None:
                    own = i if i < count else None
                    moved += await self._drain(bounded, source, int(seq), bool(left), own)
            async with bounded("migrate"):
                await self._client.set(self._count, count)
        if moved:
            logger.info("write-behind: moved %d queued writes and dead letters into shards", moved)
        return moved

    def _follow(self, recorded: int, count: int) -> None:
        """Lay this replica's queue out as the recorded count says, once."""
        layouts = [self._single] if recorded == LEGACY else shard_layouts(self._prefix, recorded)
        if [layout.tag for layout in layouts] == [layout.tag for layout in self._shards]:
            return
        self._shards[:] = layouts
        laid_out = (
            "the single slot of an older cachecar ({wb})"
            if recorded == LEGACY
            else f"{recorded} shards"
        )
        logger.warning(
            "write_behind.shards is %d, but the queue under this l2.key_prefix is %s: this "
            "replica uses it too, as every replica must. To lay it out in %d shards, stop "
            "every replica, start one with write_behind.reshard: true (it moves the queue), "
            "then the others",
            count,
            laid_out,
            count,
        )

    async def _drain(
        self, bounded: Bounded, source: Layout, seq: int, left: bool, own: int | None
    ) -> int:
        """Move what ``source`` holds into the shards; ``own``: its index when it is one of
        them (its keys that stay in it are left alone, and it is not tidied away)."""
        if self._floored.get(source.tag) != seq:
            async with bounded("migrate"):
                await asyncio.gather(
                    *(self._floor(keys=[shard["seq"]], args=[seq]) for shard in self._shards)
                )
            self._floored[source.tag] = seq
        if not left:
            return 0
        moved = 0
        for _ in range(PASSES):
            moved += await self._each(bounded, source, own, _WRITES)
            moved += await self._each(bounded, source, own, _DEAD)
            if own is not None:
                break
            async with bounded("migrate"):
                if await self._tidy(keys=source.keys(*_LEFTOVERS)):
                    break
        return moved

    async def _each(self, bounded: Bounded, source: Layout, own: int | None, kind: _Kind) -> int:
        """Move the writes (or dead letters) of ``source`` that belong in another shard, a
        batch at a time; returns how many."""
        moved, cursor = 0, 0
        while True:
            async with bounded("migrate"):
                cursor, found = await self._client.hscan(source[kind.hash], cursor, count=BATCH)
            keys = [cast(bytes, key).decode() for key in found]
            keys = [key for key in keys if own is None or self._shard_of(key) != own]
            if keys:
                moved += await self._move(bounded, source, kind, keys)
            if cursor == 0:
                return moved

    def _shard_of(self, key: str) -> int:
        return shard_of(key, len(self._shards))

    async def _move(self, bounded: Bounded, source: Layout, kind: _Kind, keys: list[str]) -> int:
        """peek (source), adopt (each target shard, at once), then forget (source)."""
        peek, adopt, forget = self._scripts[kind.hash]
        async with bounded("migrate"):
            flat = await peek(keys=source.keys(*kind.source), args=keys)
        by_shard: dict[int, list[Any]] = {}
        forgotten: list[Any] = []
        for i in range(0, len(flat), kind.width):
            key = flat[i].decode()
            by_shard.setdefault(self._shard_of(key), []).extend(flat[i : i + kind.width])
            # What the forget compares: the seq copied, or the dead letter itself.
            forgotten += [key, flat[i + kind.token]]
        if not forgotten:
            return 0
        async with bounded("migrate"):
            await asyncio.gather(
                *(
                    adopt(keys=self._shards[i].keys(*kind.target), args=[MARKS_FOR_MS, *found])
                    for i, found in by_shard.items()
                )
            )
        # Only once every shard has them: a write is never in neither place.
        async with bounded("migrate"):
            await forget(keys=source.keys(*kind.source), args=forgotten)
        return len(forgotten) // 2
