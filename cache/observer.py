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


class Invalidation(enum.StrEnum):
    """Who dropped a key from the tiers."""

    WRITE = "write"  # a write through this process (any mode), or a write the origin refused
    REMOTE = "remote"  # another replica's write or purge
    ADMIN = "admin"  # an admin call: purge, or a replay of dead letters


class CacheObserver(Protocol):
    def lookup(self, tier: str, hit: bool) -> None:
        """A tier ("l1" or "l2") was asked for a key and had it (hit) or not."""

    def evicted(self, reason: Eviction, count: int) -> None:
        """``count`` entries left L1 for ``reason``."""

    def tier_error(self, tier: str, op: str) -> None:
        """A call ``op`` to a tier failed; the caller carried on as if it had missed."""

    def breaker_changed(self, tier: str, is_open: bool) -> None:
        """The circuit breaker in front of ``tier`` opened or closed."""

    def invalidated(self, source: Invalidation) -> None:
        """A key was dropped (or replaced by a written value) in every tier."""

    def queued(self, coalesced: bool) -> None:
        """A write-behind write was made durable; ``coalesced``: it replaced an unflushed one."""

    def coherence_changed(self, subscribed: bool) -> None:
        """This replica started, or stopped, hearing the others' changes (and using L1)."""

    def coherence_lag(self, seconds: float) -> None:
        """Another replica's change reached this one ``seconds`` after it was announced."""

    def degraded_read(self) -> None:
        """L1 answered a read while this replica did not hear the others' changes (each entry
        then lives at most ``coherence.degraded_ttl``)."""

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

    def invalidated(self, source: Invalidation) -> None:
        pass

    def queued(self, coalesced: bool) -> None:
        pass

    def coherence_changed(self, subscribed: bool) -> None:
        pass

    def coherence_lag(self, seconds: float) -> None:
        pass

    def degraded_read(self) -> None:
        pass

    def flushed(self, result: str) -> None:
        pass


class Observers:
    """Tells every one of ``observers`` (metrics, and a test's recorder beside them)."""

    __slots__ = ("_all",)

    def __init__(self, *observers: CacheObserver) -> None:
        self._all = observers

    def lookup(self, tier: str, hit: bool) -> None:
        for observer in self._all:
            observer.lookup(tier, hit)

    def evicted(self, reason: Eviction, count: int) -> None:
        for observer in self._all:
            observer.evicted(reason, count)

    def tier_error(self, tier: str, op: str) -> None:
        for observer in self._all:
            observer.tier_error(tier, op)

    def breaker_changed(self, tier: str, is_open: bool) -> None:
        for observer in self._all:
            observer.breaker_changed(tier, is_open)

    def invalidated(self, source: Invalidation) -> None:
        for observer in self._all:
            observer.invalidated(source)

    def queued(self, coalesced: bool) -> None:
        for observer in self._all:
            observer.queued(coalesced)

    def coherence_changed(self, subscribed: bool) -> None:
        for observer in self._all:
            observer.coherence_changed(subscribed)

    def coherence_lag(self, seconds: float) -> None:
        for observer in self._all:
            observer.coherence_lag(seconds)

    def degraded_read(self) -> None:
        for observer in self._all:
            observer.degraded_read()

    def flushed(self, result: str) -> None:
        for observer in self._all:
            observer.flushed(result)
