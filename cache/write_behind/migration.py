"""Draining the queue of an older cachecar (one slot, ``{prefix}{wb}:...``) into the shards.

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
import logging
from collections.abc import Callable
from typing import Any, cast

from cache.redis.tier import RedisClient
from cache.write_behind.shards import Layout, shard_of

logger = logging.getLogger("cachecar.write_behind")

BATCH = 200  # old writes moved per step
MARKS_FOR_MS = 24 * 3600 * 1000
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

_WRITE = ("values", "seqs", "ready", "since", "tries", "unsettled")


class Migration:
    """Moves what ``old`` holds into ``shards``; ``run`` is safe to repeat, from any replica."""

    def __init__(self, client: RedisClient, old: Layout, shards: list[Layout]) -> None:
        self._client = client
        self._old = old
        self._shards = shards
        self._floored = -1  # the old seq every shard's seq was last raised to
        self._floor = client.register_script(FLOOR)
        self._peek = client.register_script(PEEK)
        self._adopt = client.register_script(ADOPT)
        self._forget = client.register_script(FORGET)
        self._peek_dead = client.register_script(PEEK_DEAD)
        self._adopt_dead = client.register_script(ADOPT_DEAD)
        self._forget_dead = client.register_script(FORGET_DEAD)
        self._tidy = client.register_script(TIDY)

    async def run(self, bounded: Bounded) -> int:
        """One pass; returns how many writes and dead letters it moved. Each Redis call is
        made within ``bounded(op)``."""
        old = self._old
        async with bounded("migrate"):
            pipe = self._client.pipeline(transaction=False)
            pipe.get(old["seq"])
            pipe.exists(old["values"], old["dead"])
            seq, left = await pipe.execute()
        if seq is None:
            return 0  # no older cachecar ever queued here
        if int(seq) != self._floored:
            async with bounded("migrate"):
                await asyncio.gather(
                    *(self._floor(keys=[shard["seq"]], args=[int(seq)]) for shard in self._shards)
                )
            self._floored = int(seq)
        if not left:
            return 0
        moved = 0
        for _ in range(PASSES):
            moved += await self._each(bounded, "values", self._move)
            moved += await self._each(bounded, "dead", self._move_dead)
            async with bounded("migrate"):
                gone = await self._tidy(
                    keys=old.keys(
                        "values", "dead", "ready", "since", "tries", "unsettled", "corpses"
                    )
                )
            if gone:
                break
        if moved:
            logger.info("write-behind: moved %d queued writes and dead letters into shards", moved)
        return moved

    async def _each(self, bounded: Bounded, name: str, move: Any) -> int:
        """``move`` every field of the old hash ``name``, a batch at a time."""
        moved, cursor = 0, 0
        while True:
            async with bounded("migrate"):
                cursor, found = await self._client.hscan(self._old[name], cursor, count=BATCH)
            if found:
                moved += await move(bounded, [cast(bytes, key).decode() for key in found])
            if cursor == 0:
                return moved

    async def _move(self, bounded: Bounded, keys: list[str]) -> int:
        async with bounded("migrate"):
            flat = await self._peek(keys=self._old.keys(*_WRITE), args=keys)
        by_shard: dict[int, list[Any]] = {}
        forget: list[Any] = []
        for i in range(0, len(flat), 7):
            key = flat[i].decode()
            by_shard.setdefault(shard_of(key, len(self._shards)), []).extend(
                [key, *flat[i + 1 : i + 7]]
            )
            forget += [key, flat[i + 2]]
        if not forget:
            return 0
        async with bounded("migrate"):
            await asyncio.gather(
                *(
                    self._adopt(
                        keys=self._shards[i].keys(*_WRITE, "adopted"),
                        args=[MARKS_FOR_MS, *writes],
                    )
                    for i, writes in by_shard.items()
                )
            )
        # Only once every shard has them: a write is never in neither place.
        async with bounded("migrate"):
            await self._forget(keys=self._old.keys(*_WRITE), args=forget)
        return len(forget) // 2

    async def _move_dead(self, bounded: Bounded, keys: list[str]) -> int:
        async with bounded("migrate"):
            flat = await self._peek_dead(keys=self._old.keys("dead", "corpses"), args=keys)
        by_shard: dict[int, list[Any]] = {}
        forget: list[Any] = []
        for i in range(0, len(flat), 3):
            key = flat[i].decode()
            by_shard.setdefault(shard_of(key, len(self._shards)), []).extend(
                [key, flat[i + 1], flat[i + 2]]
            )
            forget += [key, flat[i + 1]]
        if not forget:
            return 0
        async with bounded("migrate"):
            await asyncio.gather(
                *(
                    self._adopt_dead(
                        keys=self._shards[i].keys("values", "dead", "corpses", "adopted"),
                        args=[MARKS_FOR_MS, *letters],
                    )
                    for i, letters in by_shard.items()
                )
            )
        async with bounded("migrate"):
            await self._forget_dead(keys=self._old.keys("dead", "corpses"), args=forget)
        return len(forget) // 2
