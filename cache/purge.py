"""Purge: drop keys by name, by prefix or by tag, from L2 and from every replica's L1.

    key     -> both tiers here, announced to the other replicas
    prefix  -> L2 walked with SCAN a batch at a time (never KEYS), each batch dropped and
               announced; then what only this replica's L1 holds; then the prefix announced,
               so the others drop what only their L1s hold
    tag     -> the tag's set in L2 (filled when tagged entries are stored) read with SSCAN a
               batch at a time, its keys dropped and announced, then the set dropped

The figure returned is how many keys held something here (L2, or this replica's L1).

Each step of a walk (a SCAN, an SSCAN) and the tag's drop is a call behind the process's L2
``guard``: while the breaker is open a prefix or tag purge fails at once with ``CircuitOpen``
(a prefix purge still empties the L1s), and its failures count towards opening the breaker.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from cache.breaker import Guard
from cache.observer import Invalidation
from cache.redis.coherence import Coherence
from cache.redis.tier import RedisTier
from cache.tiered import TieredCache


class Purger:
    def __init__(
        self,
        cache: TieredCache,
        l2: RedisTier | None,
        coherence: Coherence | None,
        guard: Guard | None = None,
    ) -> None:
        """``guard``: the process's L2 breaker (the tiered cache asks it for its own calls)."""
        self._cache = cache
        self._l2 = l2
        self._coherence = coherence
        self._guard = guard or Guard()

    async def key(self, key: str) -> int:
        return await self._cache.purge([key])

    async def prefix(self, prefix: str) -> int:
        held = 0
        try:
            if self._l2 is not None:
                walk = self._l2.keys_with_prefix(prefix)
                while (keys := await self._next(walk)) is not None:
                    held += await self._cache.purge(keys)
        finally:
            # Also when L2 failed part way: this replica's L1, and the others', follow.
            held += await self._cache.forget_prefix(prefix, Invalidation.ADMIN)
            if self._coherence is not None:
                await self._coherence.publish_prefix(prefix)
        return held

    async def tag(self, tag: str) -> int:
        if self._l2 is None:
            return 0  # tags are indexed in L2 only (the config asks for one with tags)
        held = 0
        walk = self._l2.tagged(tag)
        while (keys := await self._next(walk)) is not None:
            held += await self._cache.purge(keys)
        # Dropped only once its keys are: a purge cut short can be sent again and finds them.
        async with self._guard.call("purge"):
            await self._l2.drop_tag(tag)
        return held

    async def _next(self, walk: AsyncIterator[list[str]]) -> list[str] | None:
        """The walk's next batch (None after the last): one SCAN or SSCAN, guarded."""
        async with self._guard.call("purge"):
            return await anext(walk, None)
