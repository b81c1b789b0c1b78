"""Leases: replicas that miss the same key at once make one origin fetch between them.

Facebook's memcache leases, on Redis. Single-flight already makes one fetch per key per
process; a lease makes it one per key across replicas:

    L1 and L2 miss -> SET lease NX PX hold -> won:  fetch, fill L2, release the lease
                                           -> lost: wait for the winner's fill in L2
                                                     filled       -> HIT-L2, no fetch
                                                     lease gone,  -> fetch itself (the winner
                                                     or waited        failed, stored nothing,
                                                     ``hold`` out     or died)

The wait is bounded by ``hold`` (the lease's TTL, longer than an origin fetch may take), so a
winner that dies costs the others one ``hold`` at most, never an error. Redis failing is no
lease at all: every replica fetches for itself, as without leases. Every lease call (and each
look for the fill) goes through the process's L2 ``guard``: while the breaker is open there is
no lease, at once, and the failures of lease calls count towards opening it.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable

from cache.breaker import Guard
from cache.errors import TierError
from cache.redis.client import check_client
from cache.redis.tier import RedisClient, bounded, close_quietly, connect_quietly
from cache.tier import Stored

LEASE = "!lease:"
FIRST_LOOK = 0.005  # seconds before a waiter first looks for the fill, doubling to LAST_LOOK
LAST_LOOK = 0.05

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class Leases:
    def __init__(
        self,
        client: RedisClient,
        *,
        key_prefix: str,
        timeout: float,
        hold: float,
        guard: Guard | None = None,
    ) -> None:
        """``guard``: the process's L2 breaker (one shared by every L2 caller)."""
        check_client(client, "leases'")
        self._client = client
        self._guard = guard or Guard()
        self._prefix = key_prefix
        self._timeout = timeout
        self._hold_ms = max(1, round(hold * 1000))
        self.hold = hold
        self._release = client.register_script(_RELEASE)

    def _name(self, key: str, variant: str) -> str:
        # The variant's length first, so no key and variant pair can spell another one's name.
        return f"{self._prefix}{LEASE}{len(variant)}:{variant}{key}"

    async def acquire(self, key: str, variant: str) -> str | None:
        """A token when this caller should fetch (it won, or Redis cannot say); None when
        another replica holds the lease."""
        token = secrets.token_hex(8)
        try:
            async with bounded("lease", self._timeout, self._guard):
                won = await self._client.set(
                    self._name(key, variant), token, nx=True, px=self._hold_ms
                )
        except TierError:
            return ""  # no lease to be had: fetch, as without leases
        return token if won else None

    async def release(self, key: str, variant: str, token: str) -> None:
        if not token:
            return
        try:
            async with bounded("lease", self._timeout, self._guard):
                await self._release(keys=[self._name(key, variant)], args=[token])
        except TierError:
            pass  # it expires after ``hold``; the waiters fetch themselves by then

    async def wait_for_fill(
        self, key: str, variant: str, look: Callable[[], Awaitable[Stored | None]]
    ) -> Stored | None:
        """What ``look`` (a read of L2) finds once the winner has filled it; None when the
        lease is gone without a fill, or ``hold`` has passed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.hold
        wait = FIRST_LOOK
        while loop.time() < deadline:
            await asyncio.sleep(wait)
            wait = min(wait * 2, LAST_LOOK)
            try:
                # The lease first: a winner releases it only after its fill, so once it is seen
                # gone, the look that follows finds the fill if there is one.
                async with bounded("lease", self._timeout, self._guard):
                    held = await self._client.exists(self._name(key, variant))
                # ``look`` is a bare read of the tier (bounded, but reported to no breaker).
                async with self._guard.call("lease"):
                    stored = await look()
            except TierError:
                return None
            if stored is not None or not held:
                return stored
        return None

    async def connect(self) -> None:
        """``connect_quietly``: the first lease of a start must not pay for the set-up."""
        await connect_quietly(self._client)

    async def aclose(self) -> None:
        await close_quietly(self._client)
