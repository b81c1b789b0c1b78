"""The write-behind queue's steps, each one Lua script that Redis applies whole or not at all.

Every script touches only keys under one ``{wb}`` hash tag (one Redis Cluster slot); the
layout and what each step does are drawn in ``cache.write_behind.queue``. Times are milliseconds
from the caller's clock.
"""

# KEYS: seq values seqs ready since dead corpses unsettled
# ARGV: now_ms max_pending ready_at_ms count, then key record for each of ``count`` writes in
#       the order taken, then key seq for each write whose value the tiers now hold
# Returns seq, present for each write (-1, 0: refused, max_pending keys are waiting). The writes
# of many callers share one call (``cache.write_behind.queue`` commits them together); each is
# taken as if alone, so a key written twice in one call keeps the later record. A write is
# unsettled until its caller says the tiers hold it; a settlement of an older write than the
# key's newest is no news.
# A new write supersedes the key's dead letter: replaying it later would undo this write.
ENQUEUE = """
local max = tonumber(ARGV[2])
local last = 4 + 2 * tonumber(ARGV[4])
local out = {}
for i = 5, last, 2 do
  local key = ARGV[i]
  local present = redis.call('HEXISTS', KEYS[2], key)
  if present == 0 and max > 0 and redis.call('HLEN', KEYS[2]) >= max then
    table.insert(out, -1)
    table.insert(out, 0)
  else
    local seq = redis.call('INCR', KEYS[1])
    redis.call('HSET', KEYS[2], key, ARGV[i + 1])
    redis.call('HSET', KEYS[3], key, seq)
    redis.call('HSET', KEYS[8], key, seq)
    redis.call('ZADD', KEYS[4], 'NX', ARGV[3], key)
    redis.call('ZADD', KEYS[5], 'NX', ARGV[1], key)
    redis.call('HDEL', KEYS[6], key)
    redis.call('HDEL', KEYS[7], key)
    table.insert(out, seq)
    table.insert(out, present)
  end
end
for i = last + 1, #ARGV, 2 do
  if redis.call('HGET', KEYS[8], ARGV[i]) == ARGV[i + 1] then
    redis.call('HDEL', KEYS[8], ARGV[i])
  end
end
return out
"""

# KEYS: ready values seqs tries unsettled   ARGV: now_ms lease_ms limit due_by_ms
# Returns key, seq, tries, record, unsettled (0/1) for each key taken.
# Keys due by now first; then, up to due_by (a stop's drain), keys still in their coalescing
# window, never those waiting out a backoff (they have tries).
CLAIM = """
local now = tonumber(ARGV[1])
local lease = now + tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
local out = {}
local taken = 0
local function take(key)
  local value = redis.call('HGET', KEYS[2], key)
  if not value then
    redis.call('ZREM', KEYS[1], key)
    return
  end
  redis.call('ZADD', KEYS[1], lease, key)
  table.insert(out, key)
  table.insert(out, redis.call('HGET', KEYS[3], key))
  table.insert(out, redis.call('HGET', KEYS[4], key) or '0')
  table.insert(out, value)
  table.insert(out, redis.call('HEXISTS', KEYS[5], key))
  taken = taken + 1
end
for _, key in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, limit)) do
  take(key)
end
if taken < limit and tonumber(ARGV[4]) > now then
  local early = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, ARGV[4], 'LIMIT', 0, 4 * limit)
  for _, key in ipairs(early) do
    if taken >= limit then
      break
    end
    if redis.call('HEXISTS', KEYS[4], key) == 0 then
      take(key)
    end
  end
end
return out
"""

# Only the holder of a key's lease may settle it: its ready score is still the lease it was
# given. A replica that stalled past its lease finds another's there and changes nothing.

# KEYS: ready values seqs since tries unsettled
# ARGV: now_ms ready_at_ms, then key seq lease_ms for each sent write (a flusher's whole batch)
# Returns for each: 1 the key left the queue, 0 a newer write waits (a new window), -1 the lease
# was lost (nothing changed).
ACK = """
local out = {}
for i = 3, #ARGV, 3 do
  local key = ARGV[i]
  if tonumber(redis.call('ZSCORE', KEYS[1], key)) ~= tonumber(ARGV[i + 2]) then
    table.insert(out, -1)
  else
    local current = redis.call('HGET', KEYS[3], key)
    redis.call('HDEL', KEYS[5], key)
    if current == ARGV[i + 1] then
      redis.call('HDEL', KEYS[2], key)
      redis.call('HDEL', KEYS[3], key)
      redis.call('HDEL', KEYS[6], key)
      redis.call('ZREM', KEYS[1], key)
      redis.call('ZREM', KEYS[4], key)
      table.insert(out, 1)
    else
      redis.call('ZADD', KEYS[1], ARGV[2], key)
      redis.call('ZADD', KEYS[4], 'XX', ARGV[1], key)
      table.insert(out, 0)
    end
  end
end
return out
"""

# KEYS: ready values seqs since tries dead corpses unsettled
# ARGV: key seq now_ms retry_at_ms dead(0/1) letter record lease_ms
# Returns 1 when the key left the queue (dead, nothing newer waiting), 0 if it stays, -1 when
# the lease was lost. A dead write superseded by a newer one waiting is listed, but kept
# without its corpse: replaying it would undo the newer write.
FAIL = """
local key = ARGV[1]
if tonumber(redis.call('ZSCORE', KEYS[1], key)) ~= tonumber(ARGV[8]) then
  return -1
end
local current = redis.call('HGET', KEYS[3], key)
if ARGV[5] == '0' then
  redis.call('HINCRBY', KEYS[5], key, 1)
  redis.call('ZADD', KEYS[1], ARGV[4], key)
  return 0
end
redis.call('HSET', KEYS[6], key, ARGV[6])
redis.call('HDEL', KEYS[5], key)
if current == ARGV[2] then
  redis.call('HSET', KEYS[7], key, ARGV[7])
  redis.call('HDEL', KEYS[2], key)
  redis.call('HDEL', KEYS[3], key)
  redis.call('HDEL', KEYS[8], key)
  redis.call('ZREM', KEYS[1], key)
  redis.call('ZREM', KEYS[4], key)
  return 1
end
redis.call('HDEL', KEYS[7], key)
redis.call('ZADD', KEYS[1], ARGV[3], key)
return 0
"""

# KEYS: seq values seqs ready since tries dead corpses   ARGV: now_ms
# Returns the keys queued again. A dead letter without a corpse (superseded), or whose key has
# a newer write waiting, is only dropped.
REPLAY = """
local entries = redis.call('HGETALL', KEYS[8])
local replayed = {}
for i = 1, #entries, 2 do
  local key = entries[i]
  if redis.call('HEXISTS', KEYS[2], key) == 0 then
    local seq = redis.call('INCR', KEYS[1])
    redis.call('HSET', KEYS[2], key, entries[i + 1])
    redis.call('HSET', KEYS[3], key, seq)
    redis.call('ZADD', KEYS[4], ARGV[1], key)
    redis.call('ZADD', KEYS[5], ARGV[1], key)
    redis.call('HDEL', KEYS[6], key)
    table.insert(replayed, key)
  end
end
redis.call('DEL', KEYS[7], KEYS[8])
return replayed
"""
