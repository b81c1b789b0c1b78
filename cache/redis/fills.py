"""L2 fills, auto-pipelined: the fills of one round of the event loop go to Redis in one round
trip, as the reads do (``cache.redis.reads``).

    fill_soon(name, variant, envelope, fetched_at, ttl_ms) -> a future; the first fill of a
                               round schedules the send
    end of the round        -> the fills, in the order asked, in round trips of up to
                               MAX_BATCH: one script, each fill fenced as ``FILL`` fences one
    the answers             -> each waiting future: None, or CorruptEntry (a key of another
                               Redis type: that fill alone); a failed round trip fails every
                               fill it carried with one TierUnavailable

A fill is fenced against writes made elsewhere (``cache.redis.tier``'s docstring): stored only
if the key's ``!w`` mark is older than the fill's fetch, and only if the key has room for
another variant. Whether it was stored is not reported: a fill is best effort. On a Cluster a
script may touch one slot only: there ``RedisTier`` sends ``FILL`` once per fill instead.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from cache.errors import CorruptEntry, TierError
from cache.redis.client import RedisClient

# room(key, variant, cap): may ``key`` take ``variant``? It may when it holds it already, or
# holds fewer than ``cap`` variants, the marks beside them ('!w' the last write, '!v' the queue
# version) not counted.
ROOM = """
local function room(key, variant, cap)
  if redis.call('HEXISTS', key, variant) == 1 then
    return true
  end
  local held = redis.call('HLEN', key) - redis.call('HEXISTS', key, '!w')
    - redis.call('HEXISTS', key, '!v')
  return held < tonumber(cap)
end
"""

# fill(...): 1 stored; 0 not (a write's mark as recent as the fetch, give or take ``slack``, or
# no room for another variant).
_FILL_ONE = (
    ROOM
    + """
local function fill(key, variant, envelope, fetched_at, ttl_ms, slack, cap)
  local mark = redis.call('HGET', key, '!w')
  if mark and tonumber(mark) + tonumber(slack) >= tonumber(fetched_at) then
    return 0
  end
  if not room(key, variant, cap) then
    return 0
  end
  redis.call('HSET', key, variant, envelope)
  if redis.call('PTTL', key) < tonumber(ttl_ms) then
    redis.call('PEXPIRE', key, ttl_ms)
  end
  return 1
end
"""
)

# KEYS: the key   ARGV: variant envelope fetched_at ttl_ms slack max_variants
FILL = _FILL_ONE + "return fill(KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6])\n"

# KEYS: the keys   ARGV: slack max_variants, then per key: variant envelope fetched_at ttl_ms
# -> per key: 1, 0, or -2 when it holds another Redis type (one such key must not fail the
# fills of the others)
_FILL_MANY = (
    _FILL_ONE
    + """
local out = {}
for i = 1, #KEYS do
  local key, at = KEYS[i], 2 + 4 * (i - 1)
  local kind = redis.call('TYPE', key)['ok']
  if kind == 'hash' or kind == 'none' then
    out[i] = fill(key, ARGV[at + 1], ARGV[at + 2], ARGV[at + 3], ARGV[at + 4], ARGV[1], ARGV[2])
  else
    out[i] = -2
  end
end
return out
"""
)
_WRONG_TYPE = -2
MAX_BATCH = 64  # fills sent in one round trip at most; more go in further ones, at once
# One fill to send: (Redis name, variant, envelope, fetched_at, ttl_ms), and its future.
_Fill = tuple[tuple[str, str, bytes, float, int], "asyncio.Future[None]"]


class PipelinedFills:
    """The fills of one client; ``bounded()`` bounds and translates each round trip."""

    def __init__(
        self,
        client: RedisClient,
        bounded: Callable[[], contextlib.AbstractAsyncContextManager[None]],
        *,
        slack: float,
        max_variants: int,
    ) -> None:
        self._client = client
        self._bounded = bounded
        self._slack = slack
        self._max_variants = max_variants
        self._many = client.register_script(_FILL_MANY)
        self._fills: list[_Fill] = []  # asked for in this round of the event loop
        self._sending: set[asyncio.Task[None]] = set()

    def fill_soon(
        self, name: str, variant: str, envelope: bytes, fetched_at: float, ttl_ms: int
    ) -> asyncio.Future[None]:
        """Store ``envelope`` as ``variant`` of the hash ``name``, fenced; a future answered
        once the round trip this fill goes in is back."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        if not self._fills:
            loop.call_soon(self._send_fills)
        self._fills.append(((name, variant, envelope, fetched_at, ttl_ms), future))
        return future

    def _send_fills(self) -> None:
        fills, self._fills = self._fills, []
        for start in range(0, len(fills), MAX_BATCH):
            task = asyncio.create_task(self._send(fills[start : start + MAX_BATCH]))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _send(self, fills: list[_Fill]) -> None:
        # Unlike a read, a fill is sent even when its caller left: the entry is worth keeping.
        try:
            args: list[str | bytes | float | int] = [self._slack, self._max_variants]
            for (_, variant, data, at, ttl), _ in fills:
                args += (variant, data, at, ttl)
            async with self._bounded():
                replies = await self._many(keys=[fill[0][0] for fill in fills], args=args)
        except BaseException as exc:  # TierError; cancelled (a shutdown); anything else: a bug
            for _, future in fills:
                if not future.done():
                    if isinstance(exc, Exception):
                        future.set_exception(exc)
                    else:
                        future.cancel()
            if not isinstance(exc, TierError):
                raise
            return
        for (_, future), reply in zip(fills, replies, strict=True):
            if future.done():
                continue
            if reply == _WRONG_TYPE:
                future.set_exception(CorruptEntry("set: the key holds another Redis type"))
            else:
                future.set_result(None)

    async def settle(self) -> None:
        """Wait for the round trips under way (each is bounded)."""
        if self._sending:
            await asyncio.wait(self._sending)
