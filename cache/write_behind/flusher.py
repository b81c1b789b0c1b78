"""The flusher: sends queued writes to the origin, in batches, until the queue is empty.

    every flush_interval / 4 (at once again while batches come back full):
      claim up to batch_size ready keys (each leased to this replica; a key is ready
      flush_interval after its first unsent write, the queue's coalescing window)
      -> send each key's newest write, at most ``concurrency`` at a time
           ok         -> (an unsettled write: ``on_stale(key)`` first, so caches drop what may
                         predate it) ack, the batch's in one call once its sends are done: the
                         key leaves the queue (or goes again at once if rewritten)
           retry      -> fail: ready again after an exponential backoff with jitter
           permanent,
           or the last
           attempt    -> dead letter; ``on_dead(key)`` so caches stop serving what the origin
                         refused

Order per key holds because a key is leased to one flusher at a time, each send carries the
newest value at claim time, and a send is only started while at least ``send_timeout`` of the
lease is left: a replica that stalls past its lease does not send, so it cannot land an old
value after a newer one sent by the replica that took the key over. The claims of a batch share
one lease, so the batch's last send ends within it too, and so does the one ack that follows.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
from collections.abc import Awaitable, Callable
from typing import NamedTuple, Protocol

from cache.clock import Clock
from cache.errors import CacheError
from cache.observer import CacheObserver, NullObserver
from cache.write_behind.queue import WriteQueue
from cache.write_behind.records import Claim, QueuedWrite

logger = logging.getLogger("cachecar.write_behind")


class Outcome(enum.Enum):
    OK = "ok"  # the origin has the write
    RETRY = "retry"  # the origin may take it later (5xx, 408, 429, no answer)
    PERMANENT = "permanent"  # the origin refused it for good (any other 4xx)


class Sent(NamedTuple):
    outcome: Outcome
    detail: str = ""  # what the origin said, for the dead letter


class Sink(Protocol):
    async def send(self, write: QueuedWrite) -> Sent:
        """Deliver ``write`` to the origin; must return within the flusher's ``send_timeout``."""
        ...


class Backoff:
    """Exponential with equal jitter: attempt n waits between d/2 and d, d = initial * 2^(n-1)."""

    def __init__(self, initial: float, maximum: float, rng: random.Random | None = None) -> None:
        if not 0 < initial <= maximum:
            raise ValueError("backoff needs 0 < initial <= max")
        self._initial = initial
        self._max = maximum
        self._rng = rng or random.Random()

    def delay(self, attempt: int) -> float:
        ceiling = min(self._max, self._initial * 2 ** min(attempt - 1, 60))
        return float(ceiling / 2 + self._rng.uniform(0, ceiling / 2))


class Flusher:
    def __init__(
        self,
        queue: WriteQueue,
        sink: Sink,
        *,
        clock: Clock,
        interval: float,
        batch_size: int,
        concurrency: int,
        max_attempts: int,
        backoff: Backoff,
        send_timeout: float,
        on_dead: Callable[[str], Awaitable[None]] | None = None,
        on_stale: Callable[[str], Awaitable[None]] | None = None,
        observer: CacheObserver | None = None,
    ) -> None:
        """``on_dead(key)``: the origin refused the key's write for good. ``on_stale(key)``:
        the origin took a write the tiers may not hold (its writer died before it gave it to
        them), so they may hold an older value; ``cache.write_behind.writer`` sets it."""
        self._queue = queue
        self._sink = sink
        self._clock = clock
        self._interval = interval
        self._batch_size = batch_size
        self._limit = asyncio.Semaphore(concurrency)
        self._max_attempts = max_attempts
        self._backoff = backoff
        self._send_timeout = send_timeout
        # Long enough for any send to finish, with room for a slow claim round trip.
        self.lease = 2 * send_timeout + interval
        self._on_dead = on_dead
        self.on_stale = on_stale
        self._observer: CacheObserver = observer or NullObserver()
        self._wake = asyncio.Event()
        self._queue_ok = True
        self._stopping = False

    def wake(self) -> None:
        """Flush now rather than at the next interval (a write arrived, a replay was asked)."""
        self._wake.set()

    def stop(self) -> None:
        """Let ``run`` return once the batch in flight is settled (never cut a send short)."""
        self._stopping = True
        self._wake.set()

    async def run(self) -> None:
        """Flush every interval until ``stop`` (or cancelled)."""
        while not self._stopping:
            try:
                full = await self.flush_once() >= self._batch_size
            except CacheError as exc:
                self._queue_failed(exc)
                full = False
            except Exception:
                # The loop must outlive any one bad round: a dead flusher strands the queue.
                logger.exception("write-behind: a flush round failed; trying again")
                full = False
            if not full:
                with contextlib.suppress(TimeoutError):
                    # Keys come due at any moment (each its own window): look often, so a
                    # write reaches the origin within about 1.25 flush intervals.
                    async with asyncio.timeout(self._interval / 4):
                        await self._wake.wait()
                self._wake.clear()

    async def drain(self, within: float) -> int:
        """Flush what is ready until nothing is, or ``within`` seconds pass; returns sends made.

        Keys still in their coalescing window go now; keys waiting out a backoff stay queued:
        their origin is failing, and they survive a stop.
        """
        sent = 0
        try:
            async with asyncio.timeout(within):
                while count := await self.flush_once(early=self._interval):
                    sent += count
        except TimeoutError:
            logger.warning("write-behind: stop grace (%gs) over with writes still queued", within)
        except CacheError as exc:
            self._queue_failed(exc)
        return sent

    async def flush_once(self, *, early: float = 0.0) -> int:
        """Claim one batch and send it; returns how many writes were claimed."""
        claims = await self._queue.claim(self._batch_size, self.lease, early=early)
        if claims:
            said = await asyncio.gather(*(self._send(claim) for claim in claims))
            sent = [(claim, s) for claim, s in zip(claims, said, strict=True) if s is not None]
            # One call records every write the origin took: a script call per write would
            # cost the flusher more than the origin's answer does.
            await asyncio.gather(
                self._recorded(
                    self._acked([claim for claim, s in sent if s.outcome is Outcome.OK])
                ),
                *(self._failed(claim, s) for claim, s in sent if s.outcome is not Outcome.OK),
            )
        if not self._queue_ok:
            self._queue_ok = True
            logger.info("write-behind queue answers again")
        return len(claims)

    async def _send(self, claim: Claim) -> Sent | None:
        """What the origin said of ``claim``'s write; None when it was not sent."""
        async with self._limit:
            # A claim that waited its turn too long may have been taken over already.
            if self._clock.time() + self._send_timeout > claim.lease / 1000:
                return None
            try:
                async with asyncio.timeout(self._send_timeout):
                    return await self._sink.send(claim.write)
            except TimeoutError:
                return Sent(Outcome.RETRY, f"no answer within {self._send_timeout:g}s")
            except Exception as exc:
                logger.exception("write-behind: sending %s failed", claim.write.target)
                return Sent(Outcome.RETRY, f"{type(exc).__name__}: {exc}")

    async def _acked(self, claims: list[Claim]) -> None:
        if claims:
            stale = [claim.write.key for claim in claims if claim.unsettled]
            if stale and self.on_stale is not None:
                # Before the ack: a stop or a crash in between sends the write again, and drops
                # the key again, rather than leave the older value cached for good.
                await asyncio.gather(*(self._limited(self.on_stale(key)) for key in stale))
            await self._queue.ack_all(claims)
            for _ in claims:
                self._observer.flushed("ok")

    async def _failed(self, claim: Claim, sent: Sent) -> None:
        await self._limited(self._recorded(self._settle(claim, sent)))

    async def _limited(self, call: Awaitable[None]) -> None:
        # Calls made per write go as many at once as sends do (a batch the origin refused
        # whole would otherwise take a Redis connection per write).
        async with self._limit:
            await call

    async def _recorded(self, settling: Awaitable[None]) -> None:
        try:
            await settling
        except CacheError as exc:
            # The lease runs out and the writes are sent again: at least once, never lost.
            logger.warning("write-behind: could not record what the origin said: %s", exc)

    async def _settle(self, claim: Claim, sent: Sent) -> None:
        key = claim.write.key
        if sent.outcome is Outcome.OK:
            await self._acked([claim])
            return
        attempt = claim.tries + 1
        if sent.outcome is Outcome.RETRY and attempt < self._max_attempts:
            delay = self._backoff.delay(attempt)
            await self._queue.fail(claim, sent.detail, retry_in=delay)
            self._observer.flushed("retry")
            logger.info(
                "write-behind: %s %s failed (%s), attempt %d of %d, next in %.2fs",
                claim.write.method,
                claim.write.target,
                sent.detail,
                attempt,
                self._max_attempts,
                delay,
            )
            return
        left = await self._queue.fail(claim, sent.detail, retry_in=None)
        self._observer.flushed("dead")
        logger.error(
            "write-behind: %s %s moved to dead letters after %d attempt%s: %s",
            claim.write.method,
            claim.write.target,
            attempt,
            "" if attempt == 1 else "s",
            sent.detail,
        )
        if left and self._on_dead is not None:
            await self._on_dead(key)

    def _queue_failed(self, exc: CacheError) -> None:
        if self._queue_ok:
            self._queue_ok = False
            logger.warning("write-behind queue unavailable (%s); retrying", exc)
