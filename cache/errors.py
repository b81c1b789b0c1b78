"""Errors raised by the cache engine.

    CacheError              root: everything the engine raises on purpose
    ├── TierError           a tier gave no usable answer: what callers catch to carry on
    │   ├── TierUnavailable a tier did not answer (L2 down, slow or refusing); ``op`` names the call
    │   │   └── CircuitOpen not even asked: the tier's circuit breaker is open
    │   └── CorruptEntry    bytes that are no valid envelope (foreign, truncated, a newer version)
    └── QueueFull           the write-behind queue holds ``max_pending`` keys: a write to another
                            is refused
    LoadDeclined            raised by a loader: an answer not for the cache (too large to keep)

Foreign errors (redis-py's, OSError, timeouts) are translated into these once, where a tier calls
its client, and chained with ``raise ... from exc``. The tiered cache turns a ``TierError`` into a
miss; where the two must be told apart (a failure feeds the breaker, a corrupt entry is dropped
and says Redis is fine), the two subclasses are caught one by one.
"""

from __future__ import annotations


class CacheError(Exception):
    """Root of every error the engine raises on purpose."""


class TierError(CacheError):
    """A tier gave no usable answer: it failed, or what it holds cannot be read."""


class TierUnavailable(TierError):
    """A tier did not answer within its timeout, or answered with an error."""

    def __init__(self, op: str, reason: str) -> None:
        super().__init__(f"{op}: {reason}")
        self.op = op
        self.reason = reason


class CircuitOpen(TierUnavailable):
    """The call was not made: the breaker in front of the tier is open (or another call is
    its probe)."""

    def __init__(self, op: str) -> None:
        super().__init__(op, "circuit breaker open")


class CorruptEntry(TierError):
    """Bytes read from a tier are not an entry this version can decode."""


class QueueFull(CacheError):
    """``max_pending`` keys are waiting for the origin; a write to another key is refused."""


class LoadDeclined(Exception):
    """A loader's answer is not for the cache (too large to keep, say): it reaches every caller
    of the lookup as it is, and is never replaced by a stale entry as a failure would be."""

    def discard(self) -> None:
        """Nobody will take this answer (a background refresh made it): free what it holds."""
