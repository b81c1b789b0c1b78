"""A circuit breaker in front of a tier.

    closed --(``failures`` failures in a row)--> open --(``reset_after``)--> half-open
      ^                                                                      |
      +------------------------ the probe succeeds <-------------------------+
                                the probe fails: open again for ``reset_after``

While open, callers skip the tier entirely, so an L2 outage costs requests nothing. In half-open
exactly one call goes through as a probe; a probe that never reports back (its caller was
cancelled) is given up after another ``reset_after`` and a new probe is allowed.

One breaker stands for one tier in one process, and every caller of that tier shares it: the
tiered cache (which asks and reports itself) and, through a ``Guard``, the write-behind queue,
leases, coherence's announcements, purges and the readiness probe. So an outage seen by any of
them spares all the others its timeout, and the probe is whichever call comes first.

    guard.call(op) -> breaker.allow()? --no--> CircuitOpen (the call is not made)
                   -> yes: the call (bounded by its own timeout)
                        TierUnavailable -> failure() (and counted), raised
                        CorruptEntry    -> success() (the tier answered), raised
                        returned        -> success()
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable

from cache.clock import Clock
from cache.errors import CircuitOpen, CorruptEntry, TierUnavailable
from cache.observer import CacheObserver, NullObserver

logger = logging.getLogger("cachecar.cache")


class Breaker:
    def __init__(
        self,
        *,
        failures: int,
        reset_after: float,
        clock: Clock,
        on_change: Callable[[bool], None] = lambda is_open: None,
    ) -> None:
        if failures < 1:
            raise ValueError("a breaker opens after at least one failure")
        if reset_after <= 0:
            raise ValueError("reset_after must be positive")
        self._threshold = failures
        self._reset_after = reset_after
        self._clock = clock
        self._on_change = on_change
        self._failures = 0
        self._opened_at: float | None = None
        self._probe_at: float | None = None

    @property
    def is_open(self) -> bool:
        """True from the moment it opens until a probe succeeds (half-open counts as open)."""
        return self._opened_at is not None

    def allow(self) -> bool:
        """May a call go to the tier now? In half-open, True for one probe at a time."""
        if self._opened_at is None:
            return True
        now = self._clock.monotonic()
        if now - self._opened_at < self._reset_after:
            return False
        if self._probe_at is not None and now - self._probe_at < self._reset_after:
            return False
        self._probe_at = now
        return True

    def success(self) -> None:
        if self._opened_at is not None and self._probe_at is None:
            # No call is let through while open but the probe: this one started before the
            # breaker opened, and its late answer says nothing of the tier now.
            return
        self._failures = 0
        self._probe_at = None
        if self._opened_at is not None:
            self._opened_at = None
            self._on_change(False)

    def failure(self) -> None:
        self._failures += 1
        if self._opened_at is not None:
            # A failed probe (or a straggler from before it opened): stay open, restart the wait.
            if self._probe_at is not None:
                self._opened_at = self._clock.monotonic()
                self._probe_at = None
            return
        if self._failures >= self._threshold:
            self._opened_at = self._clock.monotonic()
            self._on_change(True)


class Guard:
    """The calls to a tier made beside the tiered cache, behind the tier's shared ``breaker``.

    ``async with guard.call(op):`` around one call (already bounded and translated, see
    ``cache.redis.tier.bounded``): refused at once with ``CircuitOpen`` while the breaker is open,
    and its outcome told to the breaker; a failure is also counted (``tier_error``). Without a
    breaker a guard only counts. A call that never ends (cancelled) reports nothing: the
    breaker gives up on such a probe after ``reset_after``.
    """

    def __init__(
        self,
        breaker: Breaker | None = None,
        *,
        tier: str = "l2",
        observer: CacheObserver | None = None,
    ) -> None:
        self.breaker = breaker
        self._tier = tier
        self._observer: CacheObserver = observer or NullObserver()

    @contextlib.asynccontextmanager
    async def call(self, op: str) -> AsyncIterator[None]:
        breaker = self.breaker
        if breaker is not None and not breaker.allow():
            raise CircuitOpen(op)
        try:
            yield
        except CircuitOpen:
            raise  # a guard inside this one refused: nothing was asked, nothing to report
        except TierUnavailable as exc:
            self._observer.tier_error(self._tier, exc.op)
            if breaker is not None:
                breaker.failure()
            raise
        except CorruptEntry:
            # The tier answered; what it holds is not ours to read. It is healthy.
            if breaker is not None:
                breaker.success()
            raise
        if breaker is not None:
            breaker.success()


def breaker_logger(
    tier: str, reset_after: float, observer: CacheObserver
) -> Callable[[bool], None]:
    """An ``on_change`` for a tier's ``Breaker`` that logs and reports each change once."""

    def on_change(is_open: bool) -> None:
        observer.breaker_changed(tier, is_open)
        if is_open:
            logger.warning(
                "%s circuit breaker open: skipping %s, next probe in %gs", tier, tier, reset_after
            )
        else:
            logger.info("%s circuit breaker closed", tier)

    return on_change
