"""The figures behind ``/admin/stats`` and ``/dashboard``: the last minute, second by second.

Prometheus answers "over the last minute" for a server that scrapes; this answers it for an
operator with only cachecar. One bucket per wall-clock second, the last ``WINDOW`` complete
seconds kept, plus totals since start. Latencies go into log-spaced bins (each 10 % wider than
the one before), so a percentile is exact to within 5 % whatever the spread, in constant memory.

``request``, ``lookup`` and ``origin`` count one event at ``now``. ``add_requests`` and
``add_lookups`` add many at once to one second: ``proxy.metrics`` counts the hot path's events
for the second running in its own lists and adds them here once that second is over (or when
read), which is what keeps a hit's share of this small.

A figure with nothing to compute it from is None (JSON null), never 0: a hit ratio of 0 % with
no traffic would be a lie an alert could act on.

``document`` builds the ``/admin/stats`` document from a window and the ``Figures`` beside it:
one process's (``Metrics.figures``) or the workers' added up (``proxy.fleet``).
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections import Counter, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cache.observer import Eviction

WINDOW = 60  # seconds in "last minute"
RECENT = 10  # seconds a req/s figure is averaged over

OUTCOMES = ("hit_l1", "hit_l2", "miss", "stale", "revalidated", "bypass", "write")
CACHEABLE = frozenset(
    {"hit_l1", "hit_l2", "miss", "stale", "revalidated"}
)  # reads the cache could answer
HITS = frozenset({"hit_l1", "hit_l2"})  # STALE is a read, not a hit (docs/observability.md)
PERCENTILES = (("p50", 0.50), ("p95", 0.95), ("p99", 0.99))
FLUSH_RESULTS = ("ok", "retry", "dead")  # what a write-behind flush comes to

_BIN_GROWTH = math.log(1.1)
_SMALLEST = 1e-6  # a latency below one microsecond goes into bin 0
# The upper bound of each bin: bin i holds (LATENCY_BOUNDS[i - 1], LATENCY_BOUNDS[i]]. A bound
# list rather than a logarithm, so that ``proxy.metrics`` finds a latency's bin and its Prometheus
# bucket with one bisect of both lists merged. Up to 1e9 s (31 years): no duration measured in
# a running process reaches the last bin, whose width is unbounded.
LATENCY_BOUNDS = tuple(
    _SMALLEST * math.exp(i * _BIN_GROWTH)
    for i in range(math.ceil(math.log(1e9 / _SMALLEST) / _BIN_GROWTH) + 1)
)


def _bin(seconds: float) -> int:
    return bisect_left(LATENCY_BOUNDS, seconds)


def _bin_value(index: int) -> float:
    """The middle (geometric) of bin ``index``."""
    if index == 0:
        return _SMALLEST
    return _SMALLEST * math.exp((index - 0.5) * _BIN_GROWTH)


def percentiles(bins: Mapping[int, int]) -> dict[str, float] | None:
    """p50/p95/p99 of a binned latency distribution; None when it is empty."""
    total = sum(bins.values())
    if total == 0:
        return None
    result: dict[str, float] = {}
    ordered = sorted(bins.items())
    for name, fraction in PERCENTILES:
        rank = math.ceil(fraction * total)  # the rank-th smallest sample, 1-based
        seen = 0
        for index, count in ordered:
            seen += count
            if seen >= rank:
                result[name] = _bin_value(index)
                break
    return result


def _ratio(hits: int, total: int) -> float | None:
    return hits / total if total else None


class _Second:
    """Everything counted in one wall-clock second."""

    __slots__ = ("lookups", "origin", "origin_bins", "origin_errors", "requests", "second")

    def __init__(self, second: int) -> None:
        self.second = second
        self.requests: dict[str, dict[int, int]] = {}  # outcome -> latency bin -> count
        self.lookups: Counter[tuple[str, bool]] = Counter()  # (tier, hit)
        self.origin = 0
        self.origin_errors = 0
        self.origin_bins: Counter[int] = Counter()

    def count(self, outcome: str) -> int:
        bins = self.requests.get(outcome)
        return sum(bins.values()) if bins else 0


class Window:
    """Per-second counts over the last minute, and totals since start."""

    def __init__(self, started: float) -> None:
        self.started = started
        self._seconds: deque[_Second] = deque(maxlen=WINDOW + 1)
        self.requests: Counter[str] = Counter()
        self.lookups: Counter[tuple[str, bool]] = Counter()
        self.origin_requests = 0
        self.origin_errors = 0

    def _at(self, now: float) -> _Second:
        second = int(now)
        if not self._seconds or self._seconds[-1].second < second:
            self._seconds.append(_Second(second))
        current = self._seconds[-1]
        # A clock stepped back leaves the event in the newest bucket rather than reordering.
        return current

    def request(self, outcome: str, seconds: float, now: float) -> None:
        self.requests[outcome] += 1
        bins = self._at(now).requests.setdefault(outcome, {})
        index = _bin(seconds)
        bins[index] = bins.get(index, 0) + 1

    def lookup(self, tier: str, hit: bool, now: float) -> None:
        self.lookups[tier, hit] += 1
        self._at(now).lookups[tier, hit] += 1

    def add_requests(self, second: int, outcome: str, bins: Mapping[int, int]) -> None:
        """Requests answered in ``second`` with ``outcome``: so many in each latency bin.

        ``second`` is the newest second counted so far, or a later one: as ``request`` with a
        ``now`` in that second."""
        mine = self._at(second).requests.setdefault(outcome, {})
        for index, n in bins.items():
            mine[index] = mine.get(index, 0) + n
        self.requests[outcome] += sum(bins.values())

    def add_lookups(self, second: int, tier: str, hits: int, misses: int) -> None:
        """Lookups in ``tier`` during ``second`` (as in ``add_requests``)."""
        counted = self._at(second).lookups
        for hit, n in ((True, hits), (False, misses)):
            if n:
                counted[tier, hit] += n
                self.lookups[tier, hit] += n

    def origin(self, error: bool, seconds: float, now: float) -> None:
        bucket = self._at(now)
        self.origin_requests += 1
        bucket.origin += 1
        bucket.origin_bins[_bin(seconds)] += 1
        if error:
            self.origin_errors += 1
            bucket.origin_errors += 1

    # -- several processes' windows as one (server.workers) ----------------------------------

    def dump(self) -> dict[str, Any]:
        """Everything this window holds, as JSON, for ``merge`` in another process."""
        return {
            "started": self.started,
            "requests": dict(self.requests),
            "lookups": [[tier, hit, n] for (tier, hit), n in self.lookups.items()],
            "origin_requests": self.origin_requests,
            "origin_errors": self.origin_errors,
            "seconds": [
                {
                    "second": s.second,
                    "requests": {o: list(bins.items()) for o, bins in s.requests.items()},
                    "lookups": [[tier, hit, n] for (tier, hit), n in s.lookups.items()],
                    "origin": s.origin,
                    "origin_errors": s.origin_errors,
                    "origin_bins": list(s.origin_bins.items()),
                }
                for s in self._seconds
            ],
        }

    def merge(self, dumped: Mapping[str, Any], *, seconds: bool = True) -> None:
        """Add another window's counts (``dump``) to this one's; ``seconds=False``: its totals
        since start only (a process that is gone: its last minute no longer counts)."""
        self.started = min(self.started, float(dumped["started"]))
        self.requests.update(dumped["requests"])
        for tier, hit, n in dumped["lookups"]:
            self.lookups[tier, hit] += n
        self.origin_requests += dumped["origin_requests"]
        self.origin_errors += dumped["origin_errors"]
        if not seconds:
            return
        kept = {s.second: s for s in self._seconds}
        for raw in dumped["seconds"]:
            bucket = kept.get(raw["second"])
            if bucket is None:
                bucket = kept[raw["second"]] = _Second(raw["second"])
            for outcome, bins in raw["requests"].items():
                mine = bucket.requests.setdefault(outcome, {})
                for index, n in bins:
                    mine[index] = mine.get(index, 0) + n
            for tier, hit, n in raw["lookups"]:
                bucket.lookups[tier, hit] += n
            bucket.origin += raw["origin"]
            bucket.origin_errors += raw["origin_errors"]
            bucket.origin_bins.update(dict(raw["origin_bins"]))
        newest = sorted(kept.values(), key=lambda s: s.second)[-(WINDOW + 1) :]
        self._seconds = deque(newest, maxlen=WINDOW + 1)

    def complete(self, now: float, span: int) -> list[_Second]:
        """The last ``span`` complete seconds before ``now`` (since the start), quiet ones too."""
        current = int(now)
        first = max(current - span, int(self.started))
        kept = {s.second: s for s in self._seconds}
        return [kept.get(second) or _Second(second) for second in range(first, current)]

    def snapshot(self, now: float) -> dict[str, Any]:
        minute = self.complete(now, WINDOW)
        recent = self.complete(now, RECENT)
        # Averaged over the seconds that have passed: a proxy up for 3 s is not 70 % idle.
        span = max(1, min(RECENT, int(now) - int(self.started)))
        return {
            "uptime_seconds": max(0.0, now - self.started),
            "window_seconds": WINDOW,
            "hit_ratio": {
                "overall": {
                    "last_minute": _overall(minute),
                    "since_start": _ratio(
                        sum(self.requests[o] for o in HITS),
                        sum(self.requests[o] for o in CACHEABLE),
                    ),
                },
                **{
                    tier: {
                        "last_minute": _tier(minute, tier),
                        "since_start": _ratio(
                            self.lookups[tier, True],
                            self.lookups[tier, True] + self.lookups[tier, False],
                        ),
                    }
                    for tier in ("l1", "l2")
                },
            },
            "requests_per_second": _per_second(recent, span),
            "requests_total": {
                **{o: self.requests[o] for o in OUTCOMES},
                "total": sum(self.requests[o] for o in OUTCOMES),
            },
            "latency_seconds": {
                "all": percentiles(_merged(s.requests[o] for s in minute for o in s.requests)),
                **{
                    o: percentiles(_merged(s.requests[o] for s in minute if o in s.requests))
                    for o in OUTCOMES
                },
            },
            "origin": {
                "requests_per_second": sum(s.origin for s in recent) / span,
                "errors_per_second": sum(s.origin_errors for s in recent) / span,
                "requests_total": self.origin_requests,
                "errors_total": self.origin_errors,
                "latency_seconds": percentiles(_merged(s.origin_bins for s in minute)),
            },
            "history": [_point(s) for s in minute],
        }


def _merged(parts: Iterable[Mapping[int, int]]) -> Counter[int]:
    merged: Counter[int] = Counter()
    for part in parts:
        merged.update(part)
    return merged


def _overall(seconds: list[_Second]) -> float | None:
    return _ratio(
        sum(s.count(o) for s in seconds for o in HITS),
        sum(s.count(o) for s in seconds for o in CACHEABLE),
    )


def _tier(seconds: list[_Second], tier: str) -> float | None:
    hits = sum(s.lookups[tier, True] for s in seconds)
    return _ratio(hits, hits + sum(s.lookups[tier, False] for s in seconds))


def _per_second(seconds: list[_Second], span: int) -> dict[str, float]:
    rates = {o: sum(s.count(o) for s in seconds) / span for o in OUTCOMES}
    rates["total"] = sum(rates.values())
    return rates


def _point(second: _Second) -> dict[str, Any]:
    return {
        "t": second.second,
        "requests": {o: second.count(o) for o in OUTCOMES},
        "hit_ratio": {
            "overall": _overall([second]),
            "l1": _tier([second], "l1"),
            "l2": _tier([second], "l2"),
        },
        "latency_seconds": percentiles(_merged(second.requests.values())),
        "origin_requests": second.origin,
        "origin_errors": second.origin_errors,
    }


@dataclass(frozen=True)
class Figures:
    """What ``/admin/stats`` says beside the window: one process's, or the workers' added up."""

    # Since start: coalesced, evicted:<reason>, l2_errors, flushed:<result>, wb_coalesced,
    # degraded_reads.
    totals: Counter[str] = field(default_factory=Counter)
    l1_entries: int = 0
    l1_bytes: int = 0
    l1_max_entries: int = 0
    l1_max_bytes: int = 0
    l2_enabled: bool = False
    breaker_open: bool = False
    coherence_enabled: bool = False
    subscribed: bool = False
    degraded_ttl: float = 0.0  # coherence.degraded_ttl: L1's entries' lives while unsubscribed
    write_behind: bool = False  # a queue is configured
    queue_available: bool = False  # its figures were read, the last time successfully
    queue_depth: int = 0
    oldest_pending_age: float = 0.0
    dead_letters: int = 0


def coherence_state(figures: Figures) -> str:
    """How L1 serves: ``subscribed`` (hearing the other replicas), ``degraded`` (not hearing
    them, entries capped at ``degraded_ttl``), ``unsubscribed`` (not hearing them, L1 unused),
    or ``off`` (coherence not enabled: one replica, or no Redis)."""
    if not figures.coherence_enabled:
        return "off"
    if figures.subscribed:
        return "subscribed"
    return "degraded" if figures.degraded_ttl > 0 else "unsubscribed"


def document(window: Window, now: float, figures: Figures) -> dict[str, Any]:
    """The ``/admin/stats`` document at ``now``."""
    totals = figures.totals
    return {
        "version": 1,
        "time": now,
        **window.snapshot(now),
        "coalesced_total": totals["coalesced"],
        "l1": {
            "entries": figures.l1_entries,
            "bytes": figures.l1_bytes,
            "max_entries": figures.l1_max_entries,
            "max_bytes": figures.l1_max_bytes,
            "evictions_total": {r.value: totals[f"evicted:{r.value}"] for r in Eviction},
        },
        "l2": {
            "enabled": figures.l2_enabled,
            "breaker": "open" if figures.breaker_open else "closed",
            "errors_total": totals["l2_errors"],
        },
        "coherence": {
            "enabled": figures.coherence_enabled,
            "subscribed": figures.subscribed,
            "state": coherence_state(figures),
            "degraded_ttl_seconds": figures.degraded_ttl,
            "degraded_reads_total": totals["degraded_reads"],
        },
        "write_behind": {
            "enabled": figures.write_behind,
            "available": figures.queue_available,
            "queue_depth": figures.queue_depth,
            "oldest_pending_age_seconds": figures.oldest_pending_age,
            "dead_letters": figures.dead_letters,
            "flushed_total": {r: totals[f"flushed:{r}"] for r in FLUSH_RESULTS},
            "coalesced_total": totals["wb_coalesced"],
        },
    }
