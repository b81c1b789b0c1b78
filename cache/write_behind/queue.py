"""The write-behind queue: durable in Redis, coalesced per key, leased to one flusher at a time.

The queue is ``shards`` queues side by side (``cache.write_behind.shards``): a key's writes all
go to the shard ``crc32(key) % shards``, whose keys share the hash tag ``{wb:i}``, so each script
touches one Redis Cluster slot, and on a Cluster the shards spread over the masters. A shard's
layout::

    {prefix}{wb:i}:seq      string  the last sequence number given to a write of the shard
    {prefix}{wb:i}:values   hash    key -> the newest unflushed write (``QueuedWrite`` bytes)
    {prefix}{wb:i}:seqs     hash    key -> that write's sequence number
    {prefix}{wb:i}:ready    zset    key -> when it may be claimed next (ms): now + coalesce_for
                                    for a fresh write, now + lease while a flusher holds it,
                                    now + backoff after a failure
    {prefix}{wb:i}:since    zset    key -> when its oldest unflushed write was acknowledged (ms)
    {prefix}{wb:i}:tries    hash    key -> failed attempts of its pending write (a write
                                    coalesced into it keeps them: a backoff is not restarted)
    {prefix}{wb:i}:dead     hash    key -> dead letter: JSON (key, method, path, attempts,
                                    last_error, failed_at)
    {prefix}{wb:i}:corpses  hash    key -> the dead write's bytes, for replay
    {prefix}{wb:i}:unsettled hash   key -> the seq of its newest write while the tiers may not
                                    hold it yet (see below)
    {prefix}{wb:i}:adopted  hash    marks of what ``cache.write_behind.migration`` moved in
    {prefix}{wb}:shards     string  the shard count the queue is laid out in

A sequence number orders the writes of one key (L2 keeps the highest it was given, and the ack
compares it): a key lives in one shard, so a counter per shard is enough. Each shard's counter
starts above the older single-slot queue's (the migration raises it), so a key written before
the upgrade is not refused by L2 after it.

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

Every step is one Lua script on one shard, so a crash between two steps leaves the queue
consistent: a claimed key whose holder died becomes ready again when its lease runs out (how a
claim shares a batch among the shards: ``WriteQueue.claim``). Times come from the caller's
clock (injected); replicas' clocks only need to agree to well within a lease.

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
import math
from collections.abc import Awaitable, Sequence
from typing import Any, TypeVar, cast

from cache.breaker import Guard
from cache.clock import Clock
from cache.errors import CacheError, CorruptEntry, TierError
from cache.redis.client import check_client
from cache.redis.tier import RedisClient, bounded, close_quietly, connect_quietly
from cache.write_behind.commit import GroupCommit, Settled
from cache.write_behind.migration import Migration
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
from cache.write_behind.shards import DEFAULT_SHARDS, shard_layouts, shard_of

logger = logging.getLogger("cachecar.write_behind")

# Seconds between looks for a single-slot queue that an older cachecar still running writes to.
MIGRATE_EVERY = 60.0

T = TypeVar("T")
# Shards a claim asks at once: a backlog fills a batch from this many, a claim and an ack each.
SPREAD = 4
_FAIL_KEYS = ("ready", "values", "seqs", "since", "tries", "dead", "corpses", "unsettled")
_ENQUEUE_KEYS = ("seq", "values", "seqs", "ready", "since", "dead", "corpses", "unsettled")


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
        shards: int = DEFAULT_SHARDS,
        reshard: bool = False,
    ) -> None:
        """``guard``: the process's L2 breaker (one shared by every L2 caller).
        ``max_pending`` is shared evenly by the shards: each refuses new keys past its part.
        ``shards`` is the count for a queue not laid out yet; one laid out already keeps its
        own unless ``reshard`` (``cache.write_behind.migration``)."""
        check_client(client, "queue's")
        if timeout <= 0:
            raise ValueError("the queue timeout must be positive")
        self._client = client
        self._timeout = timeout
        self._clock = clock
        self._shards = shard_layouts(key_prefix, shards)  # the queue's count, once migrated
        self._max_pending = max_pending
        self._window_ms = round(coalesce_for * 1000)
        self._guard = guard or Guard()
        self._migration = Migration(client, key_prefix, self._shards, reshard=reshard)
        self._migrated_at: float | None = None
        self._migrating = asyncio.Lock()
        self._turn = 0  # the shard a claim asks first: one further each claim
        self._enqueue = client.register_script(ENQUEUE)
        self._commits = GroupCommit(
            self._commit,
            self._shard,
            lambda: self._migrated("enqueue"),
            f"{max_pending} keys are waiting for the origin",
        )
        self._claim = client.register_script(CLAIM)
        self._ack = client.register_script(ACK)
        self._fail = client.register_script(FAIL)
        self._replay = client.register_script(REPLAY)

    def _shard(self, key: str) -> int:
        return shard_of(key, len(self._shards))

    def _k(self, shard: int, *names: str) -> list[str]:
        return self._shards[shard].keys(*names)

    def _now_ms(self) -> int:
        return round(self._clock.time() * 1000)

    async def _migrated(self, op: str) -> None:
        """Before the first call, and every ``MIGRATE_EVERY`` after: ``Migration.run``. No
        write goes to a shard before the first, so every shard's seq is above the former
        queue's, and the count is the queue's. A later look that fails is logged and tried
        again in ``MIGRATE_EVERY``: the master of the old slot being down must not stop the
        shards on the others."""
        now = self._clock.time()
        if self._migrated_at is not None and now - self._migrated_at < MIGRATE_EVERY:
            return
        async with self._migrating:
            if self._migrated_at is not None and now - self._migrated_at < MIGRATE_EVERY:
                return
            try:
                await self._migration.run(lambda _: self._bounded(op))
            except TierError as exc:
                if self._migrated_at is None:
                    raise
                logger.warning(
                    "write-behind: could not look for writes an older cachecar left in the "
                    "single-slot queue (%s); looking again in %gs",
                    exc,
                    MIGRATE_EVERY,
                )
            self._migrated_at = now

    async def enqueue(self, write: QueuedWrite) -> Queued:
        """Make ``write`` durable; says its sequence number and whether it coalesced.

        A key with no unsent write becomes claimable ``coalesce_for`` from now: what is written
        to it meanwhile is coalesced into one origin write.

        Raises ``TierUnavailable`` when Redis does not take it (the write is then not
        acknowledged; ``CircuitOpen``: Redis was not even asked, the breaker is open) and
        ``QueueFull`` past ``max_pending`` keys.

        Writes that arrive while an enqueue call is under way go together in the next one
        (``cache.write_behind.commit``). Each write is answered once Redis has it.
        """
        return await self._commits.add(write)

    def settled(self, key: str, seq: int) -> None:
        """The tiers hold write ``seq`` of ``key`` (or a newer one): it is settled. Sent with
        the next enqueue call; lost with the process, which costs the key one needless drop
        from the tiers when it is flushed."""
        self._commits.settle(key, seq)

    async def _commit(self, shard: int, writes: list[QueuedWrite], settled: Settled) -> list[int]:
        now = self._now_ms()
        shard_max = math.ceil(self._max_pending / len(self._shards))
        args: list[Any] = [now, shard_max, now + self._window_ms, len(writes)]
        for write in writes:
            args += [write.key, dump(write)]
        for key, seq in settled:
            args += [key, seq]
        async with self._bounded("enqueue"):
            return cast(
                list[int],
                await self._enqueue(keys=self._k(shard, *_ENQUEUE_KEYS), args=args),
            )

    async def pending(self, key: str) -> QueuedWrite | None:
        """The newest unflushed write of ``key``, if any."""
        await self._migrated("pending")
        async with self._bounded("pending"):
            data = await self._client.hget(self._shards[self._shard(key)]["values"], key)
        return None if data is None else load(key, cast(bytes, data))

    async def claim(self, limit: int, lease: float, *, early: float = 0.0) -> list[Claim]:
        """Lease up to ``limit`` ready keys to the caller, with their newest writes.

        ``early`` also takes keys due within that many seconds (a stop flushes keys still in
        their coalescing window; keys leased elsewhere or backing off longer stay).

        Shards are asked ``SPREAD`` at a time from a turn that moves on by one each call, each
        for its part of what the batch lacks; then those that may have more, in turn. A backlog
        fills a batch from few shards (each costs a claim and an ack); each shard is among the
        first asked in ``SPREAD`` of every ``shards`` calls. A failing shard is passed over.
        """
        await self._migrated("claim")
        now = self._now_ms()
        args = (now, round(lease * 1000), now + round(early * 1000))
        count = len(self._shards)
        order = [(self._turn + i) % count for i in range(count)]
        self._turn = (self._turn + 1) % count
        claims: list[Claim] = []
        more: list[int] = []  # shards not asked, or that gave all they were asked: may have more
        failure: Exception | None = None
        for start in range(0, count, SPREAD):
            lacking = limit - len(claims)
            if lacking <= 0:
                break
            group = order[start : start + SPREAD]
            share, extra = divmod(lacking, len(group))
            asked = [(shard, share + (i < extra)) for i, shard in enumerate(group)]
            more += [shard for shard, wanted in asked if not wanted]  # a batch smaller than it
            asked = [(shard, wanted) for shard, wanted in asked if wanted]
            answers = await _tolerant([self._claim_from(s, wanted, *args) for s, wanted in asked])
            for (shard, wanted), answer in zip(asked, answers, strict=True):
                if isinstance(answer, Exception):
                    failure = answer
                    continue
                claims += answer
                if len(answer) == wanted:
                    more.append(shard)
        for shard in more:
            if len(claims) >= limit:
                break
            try:
                claims += await self._claim_from(shard, limit - len(claims), *args)
            except CacheError as exc:
                failure = exc
        if failure is not None:
            if not claims:
                raise failure
            logger.warning("write-behind: a shard of the queue did not answer: %s", failure)
        return claims

    async def _claim_from(
        self, shard: int, limit: int, now: int, lease_ms: int, due_by: int
    ) -> list[Claim]:
        async with self._bounded("claim"):
            flat = await self._claim(
                keys=self._k(shard, "ready", "values", "seqs", "tries", "unsettled"),
                args=[now, lease_ms, limit, due_by],
            )
        until = now + lease_ms
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
        letter = _letter(DeadLetter(key, "?", "?", tries, error, now / 1000))
        async with self._bounded("fail"):
            await self._fail(
                keys=self._k(self._shard(key), *_FAIL_KEYS),
                args=[key, seq, now, now, 1, letter, record, lease],
            )

    async def ack(self, claim: Claim) -> bool:
        """The origin has ``claim``'s write; True when the key left the queue (``ack_all``)."""
        (done,) = await self.ack_all([claim])
        return done

    async def ack_all(self, claims: Sequence[Claim]) -> list[bool]:
        """The origin has every one of ``claims``' writes, recorded in one call per shard (the
        shards' at once); for each, True when its key left the queue.

        A newer write that arrived during the send goes out ``coalesce_for`` from now. A claim
        whose lease was taken over changes nothing: the new holder settles the key.
        """
        if not claims:
            return []
        now = self._now_ms()
        by_shard: dict[int, list[int]] = {}
        for i, claim in enumerate(claims):
            by_shard.setdefault(self._shard(claim.write.key), []).append(i)

        async def ack_shard(shard: int, which: list[int]) -> None:
            args: list[Any] = [now, now + self._window_ms]
            for i in which:
                args += [claims[i].write.key, claims[i].seq, claims[i].lease]
            keys = self._k(shard, "ready", "values", "seqs", "since", "tries", "unsettled")
            async with self._bounded("ack"):
                for i, result in zip(which, await self._ack(keys=keys, args=args), strict=True):
                    done[i] = result

        done = [0] * len(claims)
        await asyncio.gather(*(ack_shard(s, which) for s, which in by_shard.items()))
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
        write = claim.write
        letter = _letter(
            DeadLetter(write.key, write.method, write.target, claim.tries + 1, error, now / 1000)
        )
        async with self._bounded("fail"):
            gone = await self._fail(
                keys=self._k(self._shard(claim.write.key), *_FAIL_KEYS),
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
        """Queue every dead letter again (tries reset); returns the keys queued. A shard that
        fails keeps its dead letters (logged); the keys the others queued are still returned,
        for the caches to drop them: only when every shard fails is the error raised."""
        await self._migrated("replay")
        now = self._now_ms()

        async def replay_shard(shard: int) -> list[str]:
            async with self._bounded("replay"):
                replayed = await self._replay(
                    keys=self._k(
                        shard, "seq", "values", "seqs", "ready", "since", "tries", "dead", "corpses"
                    ),
                    args=[now],
                )
            return [key.decode() for key in replayed]

        answers = await _tolerant([replay_shard(s) for s in range(len(self._shards))])
        failures = [answer for answer in answers if isinstance(answer, Exception)]
        if len(failures) == len(answers):
            raise failures[0]
        if failures:
            logger.warning("write-behind: %d shard(s) not replayed: %s", len(failures), failures[0])
        return [key for answer in answers if not isinstance(answer, Exception) for key in answer]

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """Up to ``limit`` dead letters, the oldest first, of every shard."""
        await self._migrated("dead_letters")

        async def letters_of(shard: int) -> list[DeadLetter]:
            letters = []
            async with self._bounded("dead_letters"):
                dead = self._shards[shard]["dead"]
                async for _key, raw in self._client.hscan_iter(dead, count=limit):
                    letters.append(DeadLetter(**json.loads(raw)))
                    if len(letters) >= limit:
                        break
            return letters

        answers = await asyncio.gather(*(letters_of(s) for s in range(len(self._shards))))
        letters = sorted(
            (letter for answer in answers for letter in answer),
            key=lambda letter: letter.failed_at,
        )
        return letters[:limit]

    async def stats(self) -> QueueStats:
        """Depth, age of the oldest pending write and dead letters, summed over the shards
        (one pipeline: on a Cluster, one round trip to each master)."""
        await self._migrated("stats")
        async with self._bounded("stats"):
            pipe = self._client.pipeline(transaction=False)
            for shard in self._shards:
                pipe.zcard(shard["ready"])
                pipe.zrange(shard["since"], 0, 0, withscores=True)
                pipe.hlen(shard["dead"])
            answers = await pipe.execute()
        depth = sum(answers[0::3])
        oldest = [found[0][1] for found in answers[1::3] if found]
        dead = sum(answers[2::3])
        age = max(0.0, self._clock.time() - min(oldest) / 1000) if oldest else 0.0
        return QueueStats(depth=depth, oldest_age=age, dead=dead)

    async def connect(self) -> None:
        """``connect_quietly``, and the migration of an older queue: the first write of a start
        must not pay for the set-up. Failures are only logged: the first call tries again."""
        await connect_quietly(self._client)
        try:
            await self._migrated("migrate")
        except CacheError as exc:
            logger.warning("write-behind: the queue could not be readied at start (%s)", exc)

    async def aclose(self) -> None:
        # Writes on their way in are answered before the client goes.
        await self._commits.wait()
        await close_quietly(self._client)

    def _bounded(self, op: str) -> contextlib.AbstractAsyncContextManager[None]:
        return bounded(f"queue {op}", self._timeout, self._guard)


def _letter(letter: DeadLetter) -> str:
    return json.dumps(dataclasses.asdict(letter))


async def _tolerant(calls: Sequence[Awaitable[T]]) -> list[T | Exception]:
    """Each call's answer, or the error it raised, all made at once (a cancellation raises)."""
    answers = await asyncio.gather(*calls, return_exceptions=True)
    for answer in answers:
        if isinstance(answer, BaseException) and not isinstance(answer, Exception):
            raise answer
    return cast(list[T | Exception], answers)
