"""Serving past freshness: stale-while-revalidate, stale-if-error, and early refresh.

    fresh ----------------------------- expires_at ---------------+------------------+
      |  hit; refreshed early now and    |  stale-while-revalidate | stale-if-error   |
      |  then (XFetch), never all at once|  served at once, one    | served only when |
      |                                  |  refresh in background  | the origin fails |

An entry a tier keeps past its freshness (``Staleness.keep`` longer) is a *stale candidate*: it is
never a hit, but it may answer instead of a miss. Early refresh is XFetch (Vattani, Chierichetti
and Lowenstein, "Optimal Probabilistic Cache Stampede Prevention", VLDB 2015): a hit refreshes
the entry in the background when ``-β·δ·ln(rand) ≥ time left``, δ being how long the origin took
to produce it. The closer to expiry and the slower the origin, the likelier; with many readers of
a hot key one of them refreshes it shortly before it expires, and the rest never see it expire.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

from cache.entry import Entry


@dataclasses.dataclass(frozen=True, slots=True)
class Staleness:
    """How a route's entries may be served past their freshness (seconds; 0: not at all)."""

    while_revalidate: float = 0.0
    if_error: float = 0.0
    early_refresh: float = 0.0  # XFetch's β; 0 turns early refresh off

    def __post_init__(self) -> None:
        for name in ("while_revalidate", "if_error", "early_refresh"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, not {value!r}")

    @property
    def keep(self) -> float:
        """How long past its freshness a tier keeps an entry, to be served stale."""
        return max(self.while_revalidate, self.if_error)

    def keep_for(self, entry: Entry) -> float:
        """How long past its freshness a tier keeps ``entry`` to serve it stale: ``keep``,
        narrowed by the origin's own limits."""
        if entry.stale_limits is None:
            return self.keep
        return max(
            min(self.while_revalidate, entry.stale_limits[0]),
            min(self.if_error, entry.stale_limits[1]),
        )

    def revalidates(self, entry: Entry, now: float) -> bool:
        """May ``entry`` (stale) be served at once while it is refreshed? Within the route's
        window, narrowed by the origin's own (``Entry.stale_limits``)."""
        window = self.while_revalidate
        if entry.stale_limits is not None:
            window = min(window, entry.stale_limits[0])
        return not entry.must_revalidate and now - entry.expires_at() <= window

    def covers_error(self, entry: Entry, now: float) -> bool:
        """May ``entry`` (stale) be served because the origin failed? As ``revalidates``."""
        window = self.if_error
        if entry.stale_limits is not None:
            window = min(window, entry.stale_limits[1])
        return not entry.must_revalidate and now - entry.expires_at() <= window


NEVER = Staleness()


def refresh_early(
    time_left: float, fetch_seconds: float, beta: float, random: Callable[[], float]
) -> bool:
    """XFetch: should a hit with ``time_left`` of freshness refresh its entry now?"""
    if beta <= 0 or fetch_seconds <= 0:
        return False
    if time_left > 40 * beta * fetch_seconds:
        return False  # a chance below exp(-40): not worth a draw
    draw = random()
    if draw <= 0.0:
        return True  # -ln(0) is infinite
    return -beta * fetch_seconds * math.log(draw) >= time_left


# What a hit on an entry is now (``judge``).
EXPIRED = 0  # past its freshness
FRESH = 1
DUE = 2  # fresh, and due for an early refresh


def judge(entry: Entry, now: float, beta: float, random: Callable[[], float]) -> int:
    """EXPIRED, FRESH or DUE: the one freshness check of a hit, in L1 or in L2."""
    time_left = entry.stored_at + entry.ttl - now  # Entry.expires_at, without the call
    if time_left <= 0:
        return EXPIRED
    if beta and refresh_early(time_left, entry.fetch_seconds, beta, random):
        return DUE
    return FRESH
