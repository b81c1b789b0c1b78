"""The write-behind queue: durable in Redis, coalesced per key, leased to one flusher at a time.

Layout (every key shares the hash tag ``{wb}``, so each script touches one Cluster slot)::

    {prefix}{wb}:seq      string  the last sequence number given to a write (INCR)
    {prefix}{wb}:values   hash    key -> the newest unflushed write (``QueuedWrite`` bytes)
    {prefix}{wb}:seqs     hash    key -> that write's sequence number
    {prefix}{wb}:ready    zset    key -> when it may be claimed next (ms): now + coalesce_for
                                  for a fresh write, now + lease while a flusher holds it,
                                  now + backoff after a failure
    {prefix}{wb}:since    zset    key -> when its oldest unflushed write was acknowledged (ms)
    {prefix}{wb}:tries    hash    key -> failed attempts of its pending write (a write coalesced
                                  into it keeps them: an outage's backoff is not restarted)
    {prefix}{wb}:dead     hash    key -> dead letter: JSON (key, method, path, attempts,
                                  last_error, failed_at)
    {prefix}{wb}:corpses  hash    key -> the dead write's bytes, for replay
    {prefix}{wb}:unsettled hash   key -> the sequence number of its newest write while the tiers
                                  may not hold it yet (see below)

    enqueue  -> values/seqs replaced (a newer write coalesces an unflushed one);
                ready NX now + coalesce_for: the key's coalescing window; unsettled = seq
                (the writes of concurrent callers share one script call: a group commit,
                which also carries ``settled`` news: unsettled dropped if still that seq)
    claim    -> keys ready by now: ready = now + lease (the lease), their newest value returned,
                and whether it is unsettled
    ack      -> (a flusher's batch in one script call; per key only by the lease holder: ready
                still holds its lease)
                sent seq is still the newest: key leaves the queue
                a newer write arrived meanwhile: ready = now + coalesce_for (a new window)
    fail     -> (only by the lease holder) retry: ready = now + backoff; dead: moved to
                dead/corpses, key leaves the queue (unless a newer write is waiting: that one
                stays and is tried at once, and the dead one cannot be replayed over it)
    enqueue also drops the key's dead letter: a replay must never undo a newer write

Unsettled: a write is queued before the tiers are given it (``cache.write_behind.writer``), so a
process that dies in between leaves the tiers holding an older value. Its write stays
unsettled, and the flusher that sends it has the key dropped from the tiers before the ack:
the old value cannot outlive the write's arrival at the origin.

Every step is one Lua script, so a crash between two steps leaves the queue consistent: a
claimed key whose holder died becomes ready again when its lease runs out. Times come from the
caller's clock (injected); replicas' clocks only need to agree to well within a lease.

Every call goes through the process's L2 ``guard``: while the L2 breaker is open each one is
refused at once with ``CircuitOpen`` (Redis not asked), so a write is refused without waiting
out the queue's timeout and never acknowledged; a queue call may be the half-open probe.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
from collections.abc import Sequence
from typing import Any, cast

from cache.breaker import Guard
from cache.clock import Clock
from cache.errors import CorruptEntry, QueueFull
from cache.redis.client import check_client
from cache.redis.tier import RedisClient, bounded, close_quietly, connect_quietly
from cache.write_behind.records import (
    Claim,
    DeadLetter,
    Queued,
    QueuedWrite,
    QueueStats,
    dump,
    load,
)
from cache.write_behind.scripts import ACK, CLAIM, ENQUEUE, FAIL, REPLAY

logger = logging.getLogger("cachecar.write_behind")

# Writes one enqueue call takes at most: the script runs alone in Redis, so it stays short.
COMMIT_MAX = 256


class WriteQueue:
    """The durable queue over one Redis client (``memory://``: in process, not crash-safe)."""

    def __init__(
        self,
        client: RedisClient,
        *,
        key_prefix: str,
        timeout: float,
        clock: Clock,
        max_pending: int = 0,
        coalesce_for: float = 0.0,
        guard: Guard | None = None,
    ) -> None:
        """``guard``: the process's L2 breaker (one shared by every L2 caller)."""
        check_client(client, "queue's")
        if timeout <= 0:
            raise ValueError("the queue timeout must be positive")
        self._client = client
        self._timeout = timeout
        self._clock = clock
        self._max_pending = max_pending
        self._window_ms = round(coalesce_for * 1000)
        self._guard = guard or Guard()
        names = (
            "seq",
            "values",
            "seqs",
            "ready",
            "since",
            "tries",
            "dead",
            "corpses",
            "unsettled",
        )
        self._keys = {name: f"{key_prefix}{{wb}}:{name}" for name in names}
        self._enqueue = client.register_script(ENQUEUE)
        # The group commit: writes waiting for the next enqueue call, settled writes to report
        # with it, and the task making it.
        self._waiting: list[tuple[QueuedWrite, asyncio.Future[Queued]]] = []
        self._settled: list[tuple[str, int]] = []
        self._committing: asyncio.Task[None] | None = None
        self._claim = client.register_script(CLAIM)
        self._ack = client.register_script(ACK)
        self._fail = client.register_script(FAIL)
        self._replay = client.register_script(REPLAY)

    def _k(self, *names: str) -> list[str]:
        return [self._keys[name] for name in names]

    def _now_ms(self) -> int:
        return round(self._clock.time() * 1000)

    async def enqueue(self, write: QueuedWrite) -> Queued:
        """Make ``write`` durable; says its sequence number and whether it coalesced.

        A key with no unsent write becomes claimable ``coalesce_for`` from now: what is written
        to it meanwhile is coalesced into one origin write.

        Raises ``TierUnavailable`` when Redis does not take it (the write is then not
        acknowledged; ``CircuitOpen``: Redis was not even asked, the breaker is open) and
        ``QueueFull`` past ``max_pending`` keys.

        Writes that arrive while an enqueue call is under way go together in the next one (a
        group commit): a script call costs the event loop far more than the bytes of a write,
        so under load one call carries many writes. Each write is answered once Redis has it.
        """
        taken: asyncio.Future[Queued] = asyncio.get_running_loop().create_future()
        self._waiting.append((write, taken))
        self._commit_soon()
        return await taken

    def settled(self, key: str, seq: int) -> None:
        """The tiers hold write ``seq`` of ``key`` (or a newer one): it is settled. Sent with
        the next enqueue call; lost with the process, which costs the key one needless drop
        from the tiers when it is flushed."""
        self._settled.append((key, seq))
        self._commit_soon()

    def _commit_soon(self) -> None:
        if self._committing is None:
            self._committing = asyncio.create_task(self._commit())

    async def _commit(self) -> None:
        """Send the waiting writes and settlements, one call at a time, until none wait."""
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

    async def _commit_batch(
        self,
        batch: list[tuple[QueuedWrite, asyncio.Future[Queued]]],
        settled: list[tuple[str, int]],
    ) -> None:
        now = self._now_ms()
        args: list[Any] = [now, self._max_pending, now + self._window_ms, len(batch)]
        for write, _ in batch:
            args += [write.key, dump(write)]
        for key, seq in settled:
            args += [key, seq]
        try:
            async with self._bounded("enqueue"):
                flat = await self._enqueue(
                    keys=self._k(
                        "seq", "values", "seqs", "ready", "since", "dead", "corpses", "unsettled"
                    ),
                    args=args,
                )
        except asyncio.CancelledError:
            for _, taken in batch:
                taken.cancel()
            raise
        except Exception as exc:  # every caller of the call hears why (the loop must go on)
            # Settlements are dropped: each costs its key one needless drop when flushed.
            for _, taken in batch:
                if not taken.done():
                    taken.set_exception(exc)
            return
        for i, (_, taken) in enumerate(batch):
            if taken.done():
                continue
            seq, present = int(flat[2 * i]), int(flat[2 * i + 1])
            if seq == -1:
                taken.set_exception(
                    QueueFull(f"{self._max_pending} keys are waiting for the origin")
                )
            else:
                taken.set_result(Queued(seq, bool(present)))

    async def pending(self, key: str) -> QueuedWrite | None:
        """The newest unflushed write of ``key``, if any."""
        async with self._bounded("pending"):
            data = await self._client.hget(self._keys["values"], key)
        return None if data is None else load(key, cast(bytes, data))

    async def claim(self, limit: int, lease: float, *, early: float = 0.0) -> list[Claim]:
        """Lease up to ``limit`` ready keys to the caller, with their newest writes.

        ``early`` also takes keys due within that many seconds (a stop flushes keys still in
        their coalescing window; keys leased elsewhere or backing off longer stay).
        """
        now = self._now_ms()
        async with self._bounded("claim"):
            flat = await self._claim(
                keys=self._k("ready", "values", "seqs", "tries", "unsettled"),
                args=[now, round(lease * 1000), limit, now + round(early * 1000)],
            )
        until = now + round(lease * 1000)
        claims = []
        for i in range(0, len(flat), 5):
            key, seq, tries, record = flat[i].decode(), int(flat[i + 1]), flat[i + 2], flat[i + 3]
            try:
                write = load(key, record)
            except CorruptEntry as exc:
                # Not ours to send (another version, foreign bytes): out of the queue, kept.
                logger.error("write-behind: queued write of %r is unreadable (%s)", key, exc)
                await self._bury(key, seq, record, int(tries), until, f"unreadable: {exc}")
                continue
            claims.append(Claim(write, seq, int(tries), until, unsettled=flat[i + 4] == 1))
        return claims

    async def _bury(
        self, key: str, seq: int, record: bytes, tries: int, lease: int, error: str
    ) -> None:
        """Dead-letter a queued record that cannot be decoded, as it is."""
        now = self._now_ms()
        letter = json.dumps(
            {
                "key": key,
                "method": "?",
                "path": "?",
                "attempts": tries,
                "last_error": error,
                "failed_at": now / 1000,
            }
        )
        async with self._bounded("fail"):
            await self._fail(
                keys=self._k(
                    "ready", "values", "seqs", "since", "tries", "dead", "corpses", "unsettled"
                ),
                args=[key, seq, now, now, 1, letter, record, lease],
            )

    async def ack(self, claim: Claim) -> bool:
        """The origin has ``claim``'s write; True when the key left the queue (``ack_all``)."""
        (done,) = await self.ack_all([claim])
        return done

    async def ack_all(self, claims: Sequence[Claim]) -> list[bool]:
        """The origin has every one of ``claims``' writes, recorded in one call; for each,
        True when its key left the queue.

        A newer write that arrived during the send goes out ``coalesce_for`` from now. A claim
        whose lease was taken over changes nothing: the new holder settles the key.
        """
        if not claims:
            return []
        now = self._now_ms()
        args: list[Any] = [now, now + self._window_ms]
        for claim in claims:
            args += [claim.write.key, claim.seq, claim.lease]
        async with self._bounded("ack"):
            done = await self._ack(
                keys=self._k("ready", "values", "seqs", "since", "tries", "unsettled"), args=args
            )
        for claim, result in zip(claims, done, strict=True):
            if result == -1:
                logger.warning("write-behind: lost the lease of %r before its ack", claim.write.key)
        return [result == 1 for result in done]

    async def fail(self, claim: Claim, error: str, *, retry_in: float | None) -> bool:
        """The send failed: retry after ``retry_in`` seconds, or (None) dead-letter it.

        True when the key left the queue (dead, with no newer write waiting).
        """
        now = self._now_ms()
        dead = retry_in is None
        letter = json.dumps(
            {
                "key": claim.write.key,
                "method": claim.write.method,
                "path": claim.write.target,
                "attempts": claim.tries + 1,
                "last_error": error,
                "failed_at": now / 1000,
            }
        )
        async with self._bounded("fail"):
            gone = await self._fail(
                keys=self._k(
                    "ready", "values", "seqs", "since", "tries", "dead", "corpses", "unsettled"
                ),
                args=[
                    claim.write.key,
                    claim.seq,
                    now,
                    now + round((retry_in or 0) * 1000),
                    int(dead),
                    letter,
                    dump(claim.write),
                    claim.lease,
                ],
            )
        if gone == -1:
            logger.warning("write-behind: lost the lease of %r before its retry", claim.write.key)
        return bool(gone == 1)

    async def replay(self) -> list[str]:
        """Queue every dead letter again (tries reset); returns the keys queued."""
        async with self._bounded("replay"):
            replayed = await self._replay(
                keys=self._k("seq", "values", "seqs", "ready", "since", "tries", "dead", "corpses"),
                args=[self._now_ms()],
            )
        return [key.decode() for key in replayed]

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        letters = []
        async with self._bounded("dead_letters"):
            async for _key, raw in self._client.hscan_iter(self._keys["dead"], count=limit):
                letters.append(DeadLetter(**json.loads(raw)))
                if len(letters) >= limit:
                    break
        return sorted(letters, key=lambda letter: letter.failed_at)

    async def stats(self) -> QueueStats:
        async with self._bounded("stats"):
            pipe = self._client.pipeline(transaction=False)
            pipe.zcard(self._keys["ready"])
            pipe.zrange(self._keys["since"], 0, 0, withscores=True)
            pipe.hlen(self._keys["dead"])
            depth, oldest, dead = await pipe.execute()
        age = max(0.0, self._clock.time() - oldest[0][1] / 1000) if oldest else 0.0
        return QueueStats(depth=depth, oldest_age=age, dead=dead)

    async def connect(self) -> None:
        """``connect_quietly``: the first write of a start must not pay for the set-up."""
        await connect_quietly(self._client)

    async def aclose(self) -> None:
        if self._committing is not None:
            # Writes on their way in are answered before the client goes.
            await asyncio.wait([self._committing])
        await close_quietly(self._client)

    def _bounded(self, op: str) -> contextlib.AbstractAsyncContextManager[None]:
        return bounded(f"queue {op}", self._timeout, self._guard)


def describe(stats: QueueStats, letters: list[DeadLetter]) -> dict[str, Any]:
    """The admin API's view of the queue."""
    return {
        "queue_depth": stats.depth,
        "oldest_pending_age_seconds": round(stats.oldest_age, 3),
        "dead_letter_count": stats.dead,
        "dead_letters": [dataclasses.asdict(letter) for letter in letters],
    }
