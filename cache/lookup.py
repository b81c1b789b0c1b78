"""The read's words: what a loader returns (``Loaded``) and what a read answers (``Lookup``).

Loader() -> Loaded(entry, how long each tier keeps it, whether waiters may share it, ...)
Revalidator(previous) -> Loaded: the same, for a key whose tiers hold ``previous`` (stale, or
    due for a refresh): the origin may confirm it instead of sending it again (``revalidated``)
TieredCache.get(...) -> Lookup(entry, Source: L1 | L2 | LOADER | STALE, coalesced, ...)
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Awaitable, Callable

from cache.entry import Entry


class Source(enum.Enum):
    L1 = "l1"  # the in-process tier had it
    L2 = "l2"  # Redis had it (and L1 has it now)
    LOADER = "loader"  # nobody had it; the loader (the origin) produced it
    STALE = "stale"  # past its freshness, served while it is refreshed or the loader failed


# Lookup.detail of a STALE answer: why a stale entry answered.
REVALIDATING = "stale-while-revalidate"
ORIGIN_FAILED = "stale-if-error"


@dataclasses.dataclass(frozen=True, slots=True)
class Loaded:
    """What a loader returns: the entry and how long each tier may keep it (0: not at all)."""

    entry: Entry
    l1_ttl: float = 0.0
    l2_ttl: float = 0.0
    shared: bool = True  # may be handed to callers waiting for the same key and variant
    detail: str = ""  # why it is not stored, for the caller to report
    tags: tuple[str, ...] = ()  # what L2 indexes the key under, for purge by tag
    failed: bool = False  # a failed answer (a 5xx): a stale entry may answer instead
    stale_for: float = 0.0  # how long past its freshness the tiers keep it (served stale, or
    # revalidated)
    revalidated: bool = False  # the origin confirmed the previous entry: this is it, refreshed


@dataclasses.dataclass(frozen=True, slots=True)
class Lookup:
    """The answer to ``get``."""

    entry: Entry
    source: Source
    stored: bool = False  # LOADER only: a tier kept the loaded entry
    coalesced: bool = False  # this caller waited for another caller's lookup
    detail: str = ""
    revalidated: bool = False  # LOADER only: the origin confirmed the entry the tiers held


Loader = Callable[[], Awaitable[Loaded]]
Revalidator = Callable[[Entry], Awaitable[Loaded]]
