"""The queue's group commit: the writes of concurrent callers go to Redis together.

    add(write)     -> waits with the others; answered once Redis has it (its seq), or with
                      the error of the call that carried it
    settle(k, seq) -> news for the next call (the tiers hold that write of k)
    a commit       -> up to COMMIT_MAX writes and all the news, split by shard: one call per
                      shard, the shards' at once; the next commit starts when all are answered

A script call costs the event loop far more than the bytes of a write, so under load one call
carries many writes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from cache.errors import QueueFull
from cache.write_behind.records import Queued, QueuedWrite

# Writes one commit takes at most: each shard's script runs alone in Redis, so it stays short.
COMMIT_MAX = 256

Waiting = list[tuple[QueuedWrite, asyncio.Future[Queued]]]
Settled = list[tuple[str, int]]
# A shard's call: its writes and news in, seq and present (0/1) for each write out (seq -1:
# refused, the shard is full).
Send = Callable[[int, list[QueuedWrite], Settled], Awaitable[list[int]]]


class GroupCommit:
    def __init__(
        self,
        send: Send,
        shard_of: Callable[[str], int],
        before: Callable[[], Awaitable[None]],
        full: str,
    ) -> None:
        """``before``: awaited ahead of every commit (the queue's migration check); ``full``:
        what a refused write's ``QueueFull`` says."""
        self._send = send
        self._shard_of = shard_of
        self._before = before
        self._full = full
        self._waiting: Waiting = []
        self._settled: Settled = []
        self._committing: asyncio.Task[None] | None = None

    async def add(self, write: QueuedWrite) -> Queued:
        taken: asyncio.Future[Queued] = asyncio.get_running_loop().create_future()
        self._waiting.append((write, taken))
        self._commit_soon()
        return await taken

    def settle(self, key: str, seq: int) -> None:
        self._settled.append((key, seq))
        self._commit_soon()

    async def wait(self) -> None:
        """Until the writes on their way in are answered."""
        if self._committing is not None:
            await asyncio.wait([self._committing])

    def _commit_soon(self) -> None:
        if self._committing is None:
            self._committing = asyncio.create_task(self._commit())

    async def _commit(self) -> None:
        """Send the waiting writes and settlements, one commit at a time, until none wait."""
        try:
            while self._waiting or self._settled:
                batch = self._waiting[:COMMIT_MAX]
                del self._waiting[:COMMIT_MAX]
                settled, self._settled = self._settled, []
                # A caller that gave up before its write left is not queued at all.
                batch = [(write, taken) for write, taken in batch if not taken.done()]
                if batch or settled:
                    await self._commit_batch(batch, settled)
        except asyncio.CancelledError:
            # The loop is going away: nobody may wait for a call that will never be made.
            for _, taken in self._waiting:
                taken.cancel()
            self._waiting.clear()
            raise
        finally:
            self._committing = None

    async def _commit_batch(self, batch: Waiting, settled: Settled) -> None:
        if not await self._answered(batch, self._before()):
            return
        writes: dict[int, Waiting] = {}
        news: dict[int, Settled] = {}
        for write, taken in batch:
            writes.setdefault(self._shard_of(write.key), []).append((write, taken))
        for key, seq in settled:
            news.setdefault(self._shard_of(key), []).append((key, seq))
        await asyncio.gather(
            *(
                self._commit_shard(shard, writes.get(shard, []), news.get(shard, []))
                for shard in writes.keys() | news.keys()
            )
        )

    async def _commit_shard(self, shard: int, batch: Waiting, settled: Settled) -> None:
        flat: list[int] = []

        async def send() -> None:
            flat.extend(await self._send(shard, [write for write, _ in batch], settled))

        # Settlements of a failed call are dropped: each costs its key one needless drop when
        # flushed.
        if not await self._answered(batch, send()):
            return
        for i, (_, taken) in enumerate(batch):
            if taken.done():
                continue
            seq, present = int(flat[2 * i]), int(flat[2 * i + 1])
            if seq == -1:
                taken.set_exception(QueueFull(self._full))
            else:
                taken.set_result(Queued(seq, bool(present)))

    @staticmethod
    async def _answered(batch: Waiting, call: Awaitable[None]) -> bool:
        """Make ``call``; False when it failed, its error then told to every caller."""
        try:
            await call
        except asyncio.CancelledError:
            for _, taken in batch:
                taken.cancel()
            raise
        except Exception as exc:  # every caller of the call hears why (the loop must go on)
            for _, taken in batch:
                if not taken.done():
                    taken.set_exception(exc)
            return False
        return True
