"""Errors raised by the cache engine.

    CacheError          root: everything the engine raises on purpose
    ├── TierUnavailable a tier did not answer (L2 down, slow or refusing); ``op`` names the call
    │   └── CircuitOpen (cache.breaker) not even asked: the tier's circuit breaker is open
    └── CorruptEntry    bytes that are not a valid envelope (foreign, truncated, a newer version)
    LoadDeclined        raised by a loader: an answer not for the cache (too large to keep)

Foreign errors (redis-py's, OSError, timeouts) are translated into these once, where a tier calls
its client, and chained with ``raise ... from exc``. The tiered cache turns both into a miss.
"""

from __future__ import annotations


class CacheError(Exception):
    """Root of every error the engine raises on purpose."""


class TierUnavailable(CacheError):
    """A tier did not answer within its timeout, or answered with an error."""

    def __init__(self, op: str, reason: str) -> None:
        super().__init__(f"{op}: {reason}")
        self.op = op
        self.reason = reason


class CorruptEntry(CacheError):
    """Bytes read from a tier are not an entry this version can decode."""


class LoadDeclined(Exception):
    """A loader's answer is not for the cache (too large to keep, say): it reaches every caller
    of the lookup as it is, and is never replaced by a stale entry as a failure would be."""

    def discard(self) -> None:
        """Nobody will take this answer (a background refresh made it): free what it holds."""
