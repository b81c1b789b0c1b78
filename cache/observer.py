"""How the engine reports what happens, without knowing who listens.

``proxy/metrics.py`` implements this with Prometheus; tests implement it with lists. Every method
is called on the event loop, on the hot path, so implementations must be cheap and never raise.
"""

from __future__ import annotations

import enum
from typing import Protocol


class Eviction(enum.StrEnum):
    """Why an entry left L1."""

    SIZE = "size"  # pushed out by max_entries or max_bytes
    EXPIRED = "expired"  # its TTL ran out
    INVALIDATED = "invalidated"  # a write or purge dropped it


class CacheObserver(Protocol):
    def lookup(self, tier: str, hit: bool) -> None:
        """A tier ("l1" or "l2") was asked for a key and had it (hit) or not."""

    def evicted(self, reason: Eviction, count: int) -> None:
        """``count`` entries left L1 for ``reason``."""

    def tier_error(self, tier: str, op: str) -> None:
        """A call ``op`` to a tier failed; the caller carried on as if it had missed."""

    def breaker_changed(self, tier: str, is_open: bool) -> None:
        """The circuit breaker in front of ``tier`` opened or closed."""

    def queued(self, coalesced: bool) -> None:
        """A write-behind write was made durable; ``coalesced``: it replaced an unflushed one."""

    def flushed(self, result: str) -> None:
        """The flusher sent a write: ``ok``, ``retry`` (will be sent again) or ``dead``."""


class NullObserver:
    """Listens to nothing; the default."""

    __slots__ = ()

    def lookup(self, tier: str, hit: bool) -> None:
        pass

    def evicted(self, reason: Eviction, count: int) -> None:
        pass

    def tier_error(self, tier: str, op: str) -> None:
        pass

    def breaker_changed(self, tier: str, is_open: bool) -> None:
        pass

    def queued(self, coalesced: bool) -> None:
        pass

    def flushed(self, result: str) -> None:
        pass
