"""What every tier is: get, set, replace, delete, close.

A logical key (``users:1``) may hold several *variants* of its entry (one per value of the route's
``vary`` headers or query string), so that a write or purge of the key drops all of them at once.
Most keys have one variant, ``""``. A tier keeps at most ``max_variants`` of a key (its
constructor's; ``MAX_VARIANTS`` unless told): a new one past them is not kept, since a request
header's values may select unboundedly many.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol

from cache.entry import Entry

MAX_VARIANTS = 64  # variants of one key a tier keeps, unless told otherwise


class Stored(NamedTuple):
    """An entry as a tier holds it."""

    entry: Entry
    ttl_left: float  # seconds until this tier drops it


class Tier(Protocol):
    name: str  # "l1" or "l2": what the observer and the logs call it

    async def get(self, key: str, variant: str = "") -> Stored | None:
        """The stored variant of ``key``, or None when the tier does not have it."""
        ...

    async def set(
        self,
        key: str,
        variant: str,
        entry: Entry,
        ttl: float,
        *,
        fetched_at: float | None = None,
        tags: Sequence[str] = (),
    ) -> None:
        """Keep ``entry`` as ``variant`` of ``key`` for ``ttl`` seconds.

        ``fetched_at`` marks a fill: the entry was fetched from the origin starting then, and a
        shared tier must not store it if the key was written or dropped since (by any replica).
        ``tags``: a shared tier indexes the key under each, for purge by tag.
        """
        ...

    async def replace(
        self,
        key: str,
        variant: str,
        entry: Entry,
        ttl: float,
        *,
        version: int | None = None,
        tags: Sequence[str] = (),
    ) -> bool:
        """Make ``entry`` the only variant of ``key`` (a written value); False when the tier
        already holds a newer ``version`` of the key and kept it."""
        ...

    async def delete(self, key: str) -> bool:
        """Drop ``key`` with all its variants; True if there was something to drop."""
        ...

    async def aclose(self) -> None:
        """Release what the tier holds open."""
        ...


class LocalTier(Tier, Protocol):
    """A tier in this process (L1): it can also be read without a wait, and emptied, wholly or
    by key prefix."""

    # Every entry kept from now on lives at most this long (seconds), whatever its TTL: set
    # while this replica may miss the others' changes (``cache.changes``); infinite otherwise.
    ttl_cap: float

    def peek(self, key: str, variant: str = "") -> Stored | None:
        """``get``, answered at once."""
        ...

    def keep(self, key: str, variant: str, entry: Entry, ttl: float) -> None:
        """``set``, done at once."""
        ...

    def peek_rendered(
        self, key: str, variant: str, render: Callable[[Entry], bytes]
    ) -> tuple[Entry, float, bytes] | None:
        """``peek``, with ``render(entry)``: rendered once per stored entry and kept (and
        counted) with it; (entry, seconds left, rendering)."""
        ...

    async def delete_prefix(self, prefix: str) -> list[str]:
        """Drop every key starting with ``prefix``; returns them."""
        ...

    async def clear(self) -> int:
        """Drop everything; returns how many entries."""
        ...
