"""L2 as the tiered cache uses it: never the caller's problem, a key's writes in order.

    get(key, variant)  -> (fresh entry, None) | (None, stale entry) | (None, None)
                          L2 failing, breaker open, or the key being written: a counted miss
    read_soon(...)     -> what L2 holds, as a future, for the hit path (auto-pipelined), and
    outcome(...)          what it answered, the breaker told; counted by the caller
    counted(...)       -> what ``get`` answers for a read the hit path made and kept
    fill(...)          -> in the background; nothing when the key was written meanwhile
    write(key, new)    -> a drop (new is None) or a put, as a task of its own, after the key's
                          pending fills and its previous write; until it is done the key is not
                          trusted in L2. L2 down: the key is remembered, never trusted, and
                          dropped as soon as L2 answers, so an outage cannot resurrect a value a
                          write replaced; a put that loses to another replica's newer write
                          is ``superseded`` (the tiered cache drops the key from L1)

Every call asks the process's L2 breaker first and tells it the outcome; a failure is counted,
logged once per change of state, and carried on from as a miss. Bytes under a key that are not
an entry (``CorruptEntry``) mean Redis is fine: the key is dropped.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from functools import partial
from typing import Any, NamedTuple

from cache.breaker import Breaker
from cache.clock import Clock
from cache.entry import Entry
from cache.errors import CorruptEntry, TierUnavailable
from cache.observer import CacheObserver
from cache.tier import Stored, Tier

logger = logging.getLogger("cachecar.cache")

# Keys whose L2 delete failed, remembered until L2 answers; past this many, further ones are only
# logged (memory must stay bounded through a long outage).
MAX_PENDING_DELETES = 100_000

Announce = Callable[[Sequence[str]], Awaitable[None]]
Task = asyncio.Task[Any]
Read = tuple["Stored | None", "Entry | None"]  # (fresh, None) | (None, stale) | (None, None)


class Written(NamedTuple):
    """A written value on its way into the tiers."""

    variant: str
    entry: Entry
    l1_ttl: float
    l2_ttl: float
    version: int | None
    tags: Sequence[str]


class SharedTier:
    def __init__(
        self,
        tier: Tier,
        *,
        clock: Clock,
        observer: CacheObserver,
        breaker: Breaker | None = None,
        superseded: Callable[[str], Awaitable[object]] | None = None,
    ) -> None:
        """``superseded(key)``: called when a put lost to another replica's newer write in L2."""
        self.tier = tier
        self._superseded = superseded
        self._clock = clock
        self._observer = observer
        self._breaker = breaker
        self._fills: dict[str, set[Task]] = {}
        self._writes: dict[str, Task] = {}  # the latest write (drop or put) of a key
        self._writing: Counter[str] = Counter()
        self._pending_deletes: set[str] = set()
        self._retrying_deletes = False
        self._background: set[Task] = set()
        self._ok = True
        self._last_failure: TierUnavailable | None = None
        self._read_soon = getattr(tier, "get_soon", None)  # RedisTier's auto-pipelined read
        # Tells the other replicas which keys this one changed (coherence), once L2 has them.
        self.announce: Announce | None = None

    @property
    def pending_deletes(self) -> int:
        """Keys whose L2 copy must be dropped before L2 may answer for them again."""
        return len(self._pending_deletes)

    def pending(self, key: str) -> bool:
        """Whether ``key``'s drop waits for L2 to answer."""
        return key in self._pending_deletes

    def trusted(self, key: str) -> bool:
        """False while L2 may hold a value a write replaced: being dropped now, or a drop that
        failed."""
        return key not in self._writing and key not in self._pending_deletes

    # -- reads and fills --------------------------------------------------------------------------

    async def get(self, key: str, variant: str, keep_stale: float = 0.0) -> Read:
        """(the fresh entry with how long L1 may keep it, None) or (None, a stale one or None).
        ``keep_stale``: how long past its freshness L1 may keep it."""
        if not self.trusted(key) or not self._allowed():
            return None, None
        try:
            stored = await self.tier.get(key, variant)
        except TierUnavailable as exc:
            self._failed(exc)
            self._observer.lookup("l2", False)
            return None, None
        except CorruptEntry as exc:
            self._foreign(key, exc)
            self._observer.lookup("l2", False)
            return None, None
        self._answered()
        read = self.fresh(stored, keep_stale)
        self._observer.lookup("l2", read[0] is not None)
        return read

    def counted(self, key: str, stored: Stored | None, keep_stale: float) -> Read:
        """What ``get`` answers for what a read the hit path made found (``cache.peek``)."""
        if not self.trusted(key):
            return None, None
        read = self.fresh(stored, keep_stale)
        self._observer.lookup("l2", read[0] is not None)
        return read

    def fresh(self, stored: Stored | None, keep_stale: float) -> Read:
        """What ``get`` answers for what L2 holds."""
        if stored is None:
            return None, None
        fresh_left = stored.entry.expires_at() - self._clock.time()
        if fresh_left <= 0:
            return None, stored.entry
        # L1 may keep it while it is fresh, and stale as long as the route serves it stale;
        # never longer than L2 does.
        return Stored(stored.entry, min(stored.ttl_left, fresh_left + keep_stale)), None

    def read_soon(self, key: str, variant: str) -> asyncio.Future[Stored | None] | None:
        """What L2 holds for the hit path, as a future, sent with the other reads of this
        round of the event loop (``RedisTier.get_soon``); ``outcome`` says what it answered.
        Not counted: the caller counts what it answers with. None at once when L2 may not be
        asked now, or the tier cannot read that way."""
        if self._read_soon is None or not self.trusted(key) or not self._allowed():
            return None
        read: asyncio.Future[Stored | None] = self._read_soon(key, variant)
        return read

    def outcome(self, key: str, read: asyncio.Future[Stored | None]) -> Stored | None:
        """What a ``read_soon`` found: None also when L2 failed (the breaker is told) or the
        tier closed under it."""
        try:
            stored = read.result()
        except TierUnavailable as exc:
            self._failed(exc)
        except CorruptEntry as exc:
            self._foreign(key, exc)
        except asyncio.CancelledError:
            pass  # the tier closed under it
        else:
            self._answered()
            return stored
        return None

    def fill(
        self,
        key: str,
        variant: str,
        entry: Entry,
        ttl: float,
        *,
        fetched_at: float,
        tags: Sequence[str],
        wanted: Callable[[], bool],
        then: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Store a fetched entry in the background, unless ``wanted()`` says no any more (its
        key was invalidated) or a write of the key is under way; ``then`` runs after it."""
        task = self._spawn(self._fill(key, variant, entry, ttl, fetched_at, tags, wanted, then))
        self._fills.setdefault(key, set()).add(task)
        task.add_done_callback(partial(self._filled, key))

    def _filled(self, key: str, task: Task) -> None:
        fills = self._fills.get(key)
        if fills is not None:
            fills.discard(task)
            if not fills:
                del self._fills[key]

    async def _fill(
        self,
        key: str,
        variant: str,
        entry: Entry,
        ttl: float,
        fetched_at: float,
        tags: Sequence[str],
        wanted: Callable[[], bool],
        then: Callable[[], Awaitable[None]] | None,
    ) -> None:
        try:
            if not wanted() or not self.trusted(key) or not self._allowed():
                return
            try:
                await self.tier.set(key, variant, entry, ttl, fetched_at=fetched_at, tags=tags)
            except TierUnavailable as exc:
                self._failed(exc)
                return
            except CorruptEntry as exc:
                self._foreign(key, exc)
                return
            self._answered()
        finally:
            if then is not None:
                await then()

    # -- writes -----------------------------------------------------------------------------------

    def write(self, key: str, new: Written | None, *, announce: bool = True) -> Task:
        """Drop ``key`` (``new`` None) or make ``new`` its value in L2, as a task of its own:
        a caller cancelled meanwhile (its client gone, the shutdown grace over) must not leave
        the old value in Redis. The task answers whether L2 held something for the key (or took
        the write); None when L2 could not be asked (the key is remembered)."""
        # Until Redis has it, L2 is not trusted for the key: a read arriving in between must
        # not copy the old value back into L1.
        self._writing[key] += 1
        task = self._spawn(self._write(key, new, self._writes.get(key), announce))
        self._writes[key] = task
        task.add_done_callback(partial(self._written, key))
        return task

    def _written(self, key: str, task: Task) -> None:
        if self._writes.get(key) is task:
            del self._writes[key]

    async def _write(
        self, key: str, new: Written | None, previous: Task | None, announce: bool
    ) -> bool | None:
        try:
            # Two writes of one key reach L2 in the order they were made, after its fills.
            waited = [*self._fills.get(key, ()), *([previous] if previous else [])]
            if waited:
                await asyncio.wait(waited)
            held = await self._delete(key) if new is None else await self._replace(key, new)
            if held is not None and announce and self.announce is not None:
                await self.announce([key])
            return held
        finally:
            self._writing[key] -= 1
            if self._writing[key] <= 0:
                del self._writing[key]

    async def _replace(self, key: str, new: Written) -> bool | None:
        """True when L2 took the write (or holds a newer one); None when it is remembered."""
        if self._allowed():
            try:
                stored = await self.tier.replace(
                    key, new.variant, new.entry, new.l2_ttl, version=new.version, tags=new.tags
                )
            except TierUnavailable as exc:
                self._failed(exc)
            except CorruptEntry as exc:
                self._foreign(key, exc)
                return None
            else:
                self._pending_deletes.discard(key)
                self._answered()
                if not stored and self._superseded is not None:
                    # Another replica's newer write holds L2: this one lost, in L1 too.
                    await self._superseded(key)
                return True
        # L2 may still hold the value this write replaced: never trust it for the key again
        # until it has been dropped there.
        self._remember_delete(key)
        return None

    async def _delete(self, key: str) -> bool | None:
        """Drop ``key`` from L2: whether it held something; None when that must wait until L2
        answers (the key is remembered)."""
        if self._allowed():
            try:
                held = await self.tier.delete(key)
            except TierUnavailable as exc:
                self._failed(exc)
            else:
                self._pending_deletes.discard(key)
                self._answered()
                return held
        self._remember_delete(key)
        return None

    def _remember_delete(self, key: str) -> None:
        if len(self._pending_deletes) < MAX_PENDING_DELETES:
            self._pending_deletes.add(key)
        else:
            logger.error(
                "L2 is down with %d deletes pending; %r may be stale in L2 until its TTL",
                MAX_PENDING_DELETES,
                key,
            )

    async def _retry_deletes(self) -> None:
        if self._retrying_deletes:
            return
        self._retrying_deletes = True
        dropped: list[str] = []
        try:
            while self._pending_deletes and self._allowed():
                key = next(iter(self._pending_deletes))
                try:
                    await self.tier.delete(key)
                except TierUnavailable as exc:
                    self._failed(exc)
                    return
                self._pending_deletes.discard(key)
                dropped.append(key)
        finally:
            self._retrying_deletes = False
            if dropped and self.announce is not None:
                await self.announce(dropped)  # many keys a message, not one each

    # -- health -----------------------------------------------------------------------------------

    def _foreign(self, key: str, exc: CorruptEntry) -> None:
        """Redis answered, but what it holds under ``key`` is not ours to read: drop it."""
        self._answered()
        self._observer.tier_error("l2", "decode")
        logger.warning("L2 entry %r is not readable (%s); dropping it", key, exc)
        self._spawn(self._delete(key))

    def _allowed(self) -> bool:
        return self._breaker is None or self._breaker.allow()

    def _failed(self, exc: TierUnavailable) -> None:
        if exc is self._last_failure:
            return  # one round trip carried many reads (auto-pipelining): one failure
        self._last_failure = exc
        self._observer.tier_error("l2", exc.op)
        if self._breaker is not None:
            self._breaker.failure()
        if self._ok:
            self._ok = False
            logger.warning(
                "L2 %s failed (%s); serving from L1 and the origin meanwhile", exc.op, exc.reason
            )

    def _answered(self) -> None:
        if self._breaker is not None:
            self._breaker.success()
        if not self._ok:
            self._ok = True
            logger.info("L2 answers again")
        if self._pending_deletes and not self._retrying_deletes:
            self._spawn(self._retry_deletes())

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> Task:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def settle(self) -> None:
        """Wait for the background work (each call is bounded)."""
        while self._background:
            await asyncio.wait(list(self._background))
