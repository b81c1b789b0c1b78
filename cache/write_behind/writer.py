"""Write-behind: a write is acknowledged once it is durable, and reads see it from then on.

write(w)  -> the queue takes it (Redis), unsettled; one write of a key at a time in this process;
             the writes of concurrent callers share one Redis call
             refused -> the caller answers 503 (and the key is dropped from L1 and L2 when Redis
             timed out: it may have taken the write all the same; not when the L2 breaker is
             open: Redis was not asked, so the write is surely nowhere)
          -> L1 and L2 hold it as the key's value (a DELETE: a 404 tombstone), L2 ordered by
             the queue's sequence number across replicas
          -> settled (news sent with a later queue call) once L2 surely took it
crash     -> were the process to die between the queue and the tiers, the tiers would keep the
             old value: the write stays unsettled, and the flusher that sends it drops the key
             from the tiers (every replica's L1 too) before it acks it, so the old value cannot
             outlive the write's arrival at the origin. Until then the write was never
             acknowledged (the answer comes after the tiers), so reads of the old value are
             reads from before it.
read miss -> L1, L2 as usual; then, before the origin, the key's unflushed write if there is
             one: read-your-writes even after both tiers dropped the value
flusher   -> sends each key's newest write to the origin (``cache.write_behind.flusher``); a
             write the origin refuses for good is dead-lettered and the key dropped from the
             tiers, so reads go back to what the origin holds
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

from cache.errors import CacheError, CircuitOpen, TierError
from cache.locks import KeyLocks
from cache.lookup import Loaded, Loader
from cache.observer import CacheObserver, Invalidation, NullObserver
from cache.tiered import TieredCache
from cache.write_behind.flusher import Flusher
from cache.write_behind.queue import WriteQueue
from cache.write_behind.records import QueuedWrite

logger = logging.getLogger("cachecar.write_behind")


class WriteBehind:
    def __init__(
        self,
        cache: TieredCache,
        queue: WriteQueue,
        flusher: Flusher,
        observer: CacheObserver | None = None,
    ) -> None:
        self._cache = cache
        self.queue = queue
        self.flusher = flusher
        self._observer: CacheObserver = observer or NullObserver()
        self._task: asyncio.Task[None] | None = None
        self._locks = KeyLocks()
        # A write the flusher sends unsettled: the tiers may hold what it replaced.
        flusher.on_stale = cache.invalidate

    async def write(
        self,
        write: QueuedWrite,
        variant: str,
        *,
        l1_ttl: float,
        l2_ttl: float,
        tags: Sequence[str] = (),
    ) -> None:
        """Queue ``write``, then make it the cached value; raises when the queue refuses it.

        Writes of one key are made one at a time here, so the tiers end with the write the
        queue holds last; across replicas, the queue's sequence number orders L2.

        The tiers are not emptied of the key first (a Redis call, and an announcement to every
        replica, per write): a process dying before it gives them the write leaves it
        unsettled, which the flusher mends (see the module docstring).
        """
        async with self._locks.hold(write.key):
            try:
                queued = await self.queue.enqueue(write)
            except CircuitOpen:
                raise  # refused before Redis was asked: nothing to undo
            except TierError:
                # Redis may have run the script and lost only its answer: the write may be
                # queued after all, so nothing may keep serving the value it would replace.
                await self._cache.invalidate(write.key)
                raise
            self._observer.queued(queued.coalesced)
            await self._cache.put(
                write.key,
                variant,
                write.entry,
                l1_ttl=l1_ttl,
                l2_ttl=l2_ttl,
                version=queued.seq,
                tags=tags,
            )
            # An L2 that failed the put (now or for another key: which is not told) keeps the
            # key remembered for a drop; until that is done, the flusher is to drop it too.
            if self._cache.pending_deletes == 0:
                self.queue.settled(write.key, queued.seq)

    async def replay(self) -> int:
        """Queue the dead letters again; the caches drop their keys (they hold what the origin
        has, which the replayed writes replace). Returns how many were queued."""
        keys = await self.queue.replay()
        for key in keys:
            await self._cache.invalidate(key, Invalidation.ADMIN)
        self.flusher.wake()
        return len(keys)

    def loader(
        self,
        key: str,
        origin: Loader,
        *,
        l1_ttl: float,
        l2_ttl: float,
        tags: tuple[str, ...] = (),
    ) -> Loader:
        """``origin``, preceded by a look at the key's unflushed write."""

        async def load() -> Loaded:
            try:
                pending = await self.queue.pending(key)
            except CircuitOpen:
                # Redis is failing (the L2 breaker is open): the queue was not asked, and the
                # origin's value is the best left, as below.
                return await origin()
            except TierError as exc:
                # Without the queue there is no knowing; the origin's value is the best left.
                logger.warning(
                    "write-behind queue unreadable for %r (%s); asking the origin", key, exc
                )
                return await origin()
            if pending is not None:
                return Loaded(pending.entry, l1_ttl, l2_ttl, tags=tags)
            return await origin()

        return load

    def start(self) -> None:
        self._task = asyncio.create_task(self.flusher.run())

    async def aclose(self, grace: float) -> None:
        """Stop the periodic flush, send what is ready within ``grace``, leave the rest queued.

        A batch already being sent is finished, not cancelled: a cancelled send would leave its
        key leased, unsent, until the lease ran out.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        if self._task is not None:
            self.flusher.stop()
            try:
                async with asyncio.timeout(grace):
                    await asyncio.shield(self._task)
            except TimeoutError:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        sent = await self.flusher.drain(max(0.0, deadline - loop.time()))
        if sent:
            logger.info(
                "write-behind: flushed %d write%s on the way out", sent, "" if sent == 1 else "s"
            )
        try:
            stats = await self.queue.stats()
        except CacheError:
            stats = None
        if stats is not None and stats.depth:
            logger.warning(
                "write-behind: %d key%s still queued for the next start",
                stats.depth,
                "" if stats.depth == 1 else "s",
            )
        await self.queue.aclose()
