"""What cachecar counts, once, for both ways of looking at it.

    engine events (CacheObserver) ─┐
    proxy events (request, origin) ─┴─> Metrics ─> Prometheus registry  -> GET /metrics
                                                └> stats.Window          -> GET /admin/stats

Every figure comes from one call here, so the Prometheus counters, ``/admin/stats`` and the
``X-Cache`` header a client saw can never disagree. The registry is injected: a test makes its
own and reads exact values back; ``serve`` makes one per process.

Labels stay bounded: a route label is the route's path template (``/users/{id}``), never a key or
a raw path; ``unmatched`` stands for every path no route matches; methods outside HTTP's usual
ones are ``other``.

Gauges that live elsewhere are read when asked for: L1's size from the tier, the write-behind
queue from Redis (``proxy.queue_gauges``: ``refresh`` before each scrape or snapshot).

The calls every hit makes (``answered`` or ``request``, and the engine's ``lookup``) only count
into plain lists, for the wall-clock second running: a request's duration goes into one slot,
found by one bisect of Prometheus' bucket bounds and the stats window's bin bounds merged, and
its seconds into a sum beside them. Those counts are taken into the Prometheus metrics and the
window together (``_take_in``) when a later second's first event comes, and whenever either is
read (a collector registered first, ``snapshot``, ``window``), so a scrape, a snapshot and a test
reading a sample see every count once. A Prometheus child's update takes a lock, and the window's
per-event bookkeeping a logarithm and a few dictionaries: counted one by one, the two cost a hit
about a sixth of its time.

prometheus_client has no public call that adds many observations to a histogram at once, so
``_take_in`` uses two internals of a ``Histogram`` child, each pinned by
``tests/proxy/test_metrics.py::test_the_histogram_internals_metrics_py_adds_counts_into_behave_as_it_relies_on``:

- ``_sum``: the sum of the durations, a value with ``inc``;
- ``_buckets``: one value with ``inc`` per bucket bound and one for +Inf, not cumulative.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections import Counter as CounterOf
from collections.abc import Iterable
from importlib.metadata import version
from itertools import compress
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from cache.clock import Clock, SystemClock
from cache.memory import MemoryTier
from cache.observer import Eviction, Invalidation
from cache.write_behind.queue import WriteQueue
from proxy.queue_gauges import QueueGauges
from proxy.routes import UNMATCHED
from proxy.stats import FLUSH_RESULTS, LATENCY_BOUNDS, OUTCOMES, Figures, Window, document

METHODS = frozenset({"GET", "HEAD", "PUT", "PATCH", "POST", "DELETE", "OPTIONS"})
L2_OPS = ("get", "set", "replace", "delete", "decode", "publish")
READ_OUTCOMES = (
    "hit_l1",
    "hit_l2",
    "miss",
    "stale",
    "revalidated",
    "write",
)  # the outcomes of a cached route

# A hit answers in well under a millisecond, an origin fetch in tens of them.
REQUEST_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
ORIGIN_BUCKETS = REQUEST_BUCKETS[3:]
LAG_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

# A request's duration goes into slot ``bisect_left(_BOUNDS, seconds)``: the slots split the line
# at every Prometheus bucket bound and every stats bin bound, so each slot lies in one bucket
# (``le`` semantics: a duration equal to a bound is in that bound's bucket) and in one bin. The
# last slot is past every bound: the +Inf bucket, the last bin.
_BOUNDS = tuple(sorted({*REQUEST_BUCKETS, *LATENCY_BOUNDS}))
_BUCKET_OF = (*(bisect_left(REQUEST_BUCKETS, b) for b in _BOUNDS), len(REQUEST_BUCKETS))
_BIN_OF = (*(bisect_left(LATENCY_BOUNDS, b) for b in _BOUNDS), len(LATENCY_BOUNDS))
_SLOTS = len(_BOUNDS) + 1  # then the sum of the durations

Series = tuple[str, str, int, str]
"""(route, method label, status, outcome): what one answer is counted under (``Metrics.series``)."""


def method_label(method: str) -> str:
    return method if method in METHODS else "other"


def origin_failed(status: str) -> bool:
    """An origin answer that counts as an error: 5xx, or no answer at all."""
    return not status.isdigit() or int(status) >= 500


class _TakeIn(Collector):
    """Registered before every metric: moves the counts kept aside into them when read."""

    def __init__(self, take_in: Any) -> None:
        self._take_in = take_in

    def collect(self) -> Iterable[Metric]:
        self._take_in()
        return ()


class Metrics:
    """The Prometheus metrics of one process and the stats window beside them."""

    def __init__(self, clock: Clock, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._clock = clock
        # SystemClock.time is time.time behind one more call, which the hot path can do without.
        self._time = time.time if type(clock) is SystemClock else clock.time
        started = clock.time()
        self._window = Window(started)
        # The hot path's counts since the last ``_take_in`` (see the module docstring), all of
        # them in ``_second``, the window's newest: an event at or past ``_second_ends`` takes
        # them in first and starts its own second. The first event always does, so that, as
        # in ``Window.request``, a clock stepped back counts in the newest second and no other.
        self._second = int(started)
        self._second_ends = -math.inf
        self._answers: dict[Series, list[float]] = {}  # per slot, then the sum
        self._looked_up: dict[str, list[int]] = {"l1": [0, 0], "l2": [0, 0]}  # [misses, hits]
        self._degraded = 0  # L1 hits in degraded mode, not yet taken in
        r = self.registry
        r.register(_TakeIn(self._take_in))
        self._requests = Counter(
            "cachecar_requests", "Requests answered on the proxy listener.",
            ["route", "method", "status"], registry=r,
        )  # fmt: skip
        self._duration = Histogram(
            "cachecar_request_duration_seconds",
            "Time from a request's arrival to its answer's last byte, by outcome.",
            ["route", "outcome"], buckets=REQUEST_BUCKETS, registry=r,
        )  # fmt: skip
        self._lookups = Counter(
            "cachecar_cache_lookups", "Lookups in a tier, by whether the tier had the key.",
            ["tier", "result"], registry=r,
        )  # fmt: skip
        self._origin = Counter(
            "cachecar_origin_requests",
            "Requests sent to the origin; status is timeout or unreachable when none came back.",
            ["route", "method", "status"], registry=r,
        )  # fmt: skip
        self._origin_duration = Histogram(
            "cachecar_origin_request_duration_seconds",
            "Time until the origin's response head.",
            ["route"], buckets=ORIGIN_BUCKETS, registry=r,
        )  # fmt: skip
        self._coalesced = Counter(
            "cachecar_coalesced_requests",
            "Reads that waited for another request's origin fetch of the same key.",
            ["route"], registry=r,
        )  # fmt: skip
        self._l1_entries = Gauge("cachecar_l1_entries", "Entries (variants) in L1.", registry=r)
        self._l1_bytes = Gauge("cachecar_l1_bytes", "Bytes held in L1.", registry=r)
        self._evictions = Counter(
            "cachecar_l1_evictions", "Entries that left L1, by why.", ["reason"], registry=r
        )
        self._l2_errors = Counter(
            "cachecar_l2_errors", "Failed L2 calls, by operation.", ["op"], registry=r
        )
        self._breaker = Gauge(
            "cachecar_l2_breaker_open", "1 while the L2 circuit breaker is open.", registry=r
        )
        self._invalidations = Counter(
            "cachecar_invalidations", "Keys dropped from the tiers, by who asked.",
            ["source"], registry=r,
        )  # fmt: skip
        self._queue = QueueGauges(r)
        self._flushed = Counter(
            "cachecar_write_behind_flushed", "Writes this process sent to the origin, by result.",
            ["result"], registry=r,
        )  # fmt: skip
        self._wb_coalesced = Counter(
            "cachecar_write_behind_coalesced",
            "Queued writes that replaced an unflushed write of the same key.",
            registry=r,
        )
        self._coherence = Gauge(
            "cachecar_coherence_subscribed",
            "1 while this replica hears the others' changes (and trusts its L1); 0 without "
            "(L1 in degraded mode, or unused).",
            registry=r,
        )
        self._degraded_reads = Counter(
            "cachecar_coherence_degraded_reads",
            "Reads L1 answered while this replica did not hear the others' changes "
            "(degraded mode: each entry at most coherence.degraded_ttl old).",
            registry=r,
        )
        self._coherence_lag = Histogram(
            "cachecar_coherence_lag_seconds",
            "Time from another replica announcing a change to this one dropping the key from L1.",
            buckets=LAG_BUCKETS,
            registry=r,
        )
        ProcessCollector(registry=r)  # process_resident_memory_bytes, CPU seconds, open fds
        Gauge(
            "cachecar_build_info", "The running cachecar's version.", ["version"], registry=r
        ).labels(version("cachecar")).set(1)
        # Every series a dashboard or alert divides by exists from the start, at 0.
        for tier in ("l1", "l2"):
            for result in ("hit", "miss"):
                self._lookups.labels(tier, result)
        for reason in Eviction:
            self._evictions.labels(reason.value)
        for op in L2_OPS:
            self._l2_errors.labels(op)
        for source in Invalidation:
            self._invalidations.labels(source.value)
        for result in FLUSH_RESULTS:
            self._flushed.labels(result)
        self._children: dict[tuple[int | str, ...], Any] = {}
        # Since-start figures for the snapshot, kept beside the counters (cheaper than reading
        # them back out of the registry).
        self._totals: CounterOf[str] = CounterOf()
        self._l1: MemoryTier | None = None
        self._l2_enabled = False
        self._coherence_enabled = False
        self._coherence_subscribed = False
        self._degraded_ttl = 0.0
        self._breaker_open = False

    def routes(self, cached: list[str]) -> None:
        """Create the series of each cached route's outcomes at 0.

        Every series of a ratio then starts at one scrape together, so ``rate`` extrapolates
        numerator and denominator alike: the PromQL hit ratio of a known sequence is exact.
        """
        for route in cached:
            for outcome in READ_OUTCOMES:
                self._child(self._duration, route, outcome)
            self._child(self._coalesced, route)
        self._child(self._duration, UNMATCHED, "bypass")

    def now(self) -> float:
        return self._clock.time()

    # -- what the proxy reports ------------------------------------------------------------------

    @staticmethod
    def series(route: str, method: str, status: int, outcome: str) -> Series:
        """What ``answered`` counts an answer under; the same for every answer alike, so a
        caller can make it once and keep it."""
        return (route, method_label(method), status, outcome)

    def answered(self, series: Series, seconds: float, now: float) -> None:
        """A request on the proxy listener was answered after ``seconds``, at ``now`` (this
        clock's ``time()``, which the caller has read anyway): ``request``, for the hit path."""
        if now >= self._second_ends:
            self._next_second(now)
        try:
            counts = self._answers[series]
        except KeyError:  # its first answer since the last take-in
            counts = self._answers[series] = [0] * _SLOTS + [0.0]
        counts[bisect_left(_BOUNDS, seconds)] += 1
        counts[-1] += seconds

    def request(self, route: str, method: str, status: int, outcome: str, seconds: float) -> None:
        """A request on the proxy listener was answered."""
        self.answered(self.series(route, method, status, outcome), seconds, self._time())

    def _next_second(self, now: float) -> None:
        """An event in a later second than the one counted so far: that one is over."""
        self._take_in()
        self._second = int(now)
        self._second_ends = self._second + 1.0

    def _take_in(self) -> None:
        """Move the hot path's counts into the Prometheus metrics and the stats window."""
        answers, self._answers = self._answers, {}
        looked_up, self._looked_up = self._looked_up, {"l1": [0, 0], "l2": [0, 0]}
        degraded, self._degraded = self._degraded, 0
        if degraded:
            self._degraded_reads.inc(degraded)
            self._totals["degraded_reads"] += degraded
        second, window = self._second, self._window
        for (route, method, status, outcome), counts in answers.items():
            buckets = [0] * (len(REQUEST_BUCKETS) + 1)
            bins: dict[int, int] = {}
            for slot in compress(range(_SLOTS), counts):  # the few slots counted in
                n = int(counts[slot])
                buckets[_BUCKET_OF[slot]] += n
                bins[_BIN_OF[slot]] = bins.get(_BIN_OF[slot], 0) + n
            self._child(self._requests, route, method, str(status)).inc(sum(buckets))
            child = self._child(self._duration, route, outcome)
            # prometheus_client's Histogram child: ``observe`` adds to one bucket and the sum.
            child._sum.inc(counts[-1])
            for index, n in enumerate(buckets):
                if n:
                    child._buckets[index].inc(n)
            window.add_requests(second, outcome, bins)
        for tier, (misses, hits) in looked_up.items():
            for result, n in (("hit", hits), ("miss", misses)):
                if n:
                    self._child(self._lookups, tier, result).inc(n)
            if hits or misses:
                window.add_lookups(second, tier, hits, misses)

    @property
    def window(self) -> Window:
        """The stats window, every count so far in it."""
        self._take_in()
        return self._window

    def origin_request(self, route: str, method: str, status: str, seconds: float) -> None:
        """The origin answered ``status`` (or ``timeout``/``unreachable``) after ``seconds``."""
        now = self._time()
        if now >= self._second_ends:
            self._next_second(now)
        self._child(self._origin, route, method_label(method), status).inc()
        self._child(self._origin_duration, route).observe(seconds)
        # In the second the hot path counts in, not ``now``'s: after a clock stepped back the
        # two differ, and that second is the newest.
        self._window.origin(origin_failed(status), seconds, self._second)

    def coalesced(self, route: str) -> None:
        self._child(self._coalesced, route).inc()
        self._totals["coalesced"] += 1

    def _child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, remembered: the hot path skips prometheus' own lookup."""
        key: tuple[int | str, ...] = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    # -- CacheObserver ---------------------------------------------------------------------------

    def lookup(self, tier: str, hit: bool) -> None:
        now = self._time()
        if now >= self._second_ends:
            self._next_second(now)
        try:
            self._looked_up[tier][hit] += 1
        except KeyError:  # a tier named in no release yet: counted all the same
            self._looked_up[tier] = [0, 1] if hit else [1, 0]

    def evicted(self, reason: Eviction, count: int) -> None:
        self._child(self._evictions, reason.value).inc(count)
        self._totals[f"evicted:{reason.value}"] += count

    def tier_error(self, tier: str, op: str) -> None:
        if tier == "l2":
            self._child(self._l2_errors, op).inc()
            self._totals["l2_errors"] += 1

    def breaker_changed(self, tier: str, is_open: bool) -> None:
        if tier == "l2":
            self._breaker_open = is_open
            self._breaker.set(1 if is_open else 0)

    def invalidated(self, source: Invalidation) -> None:
        self._child(self._invalidations, source.value).inc()

    def coherence_changed(self, subscribed: bool) -> None:
        self._coherence_subscribed = subscribed
        self._coherence.set(1 if subscribed else 0)

    def coherence_lag(self, seconds: float) -> None:
        self._coherence_lag.observe(seconds)

    def degraded_read(self) -> None:
        self._degraded += 1  # on the hit path: taken in with the lookups

    def queued(self, coalesced: bool) -> None:
        if coalesced:
            self._wb_coalesced.inc()
            self._totals["wb_coalesced"] += 1

    def flushed(self, result: str) -> None:
        self._child(self._flushed, result).inc()
        self._totals[f"flushed:{result}"] += 1

    # -- gauges read when asked for --------------------------------------------------------------

    def watch(
        self,
        l1: MemoryTier,
        *,
        l2: bool,
        coherence: bool,
        queue: WriteQueue | None,
        degraded_ttl: float = 0.0,
    ) -> None:
        """Read L1's size from ``l1`` and the write-behind gauges from ``queue``."""
        self._l1 = l1
        self._l2_enabled = l2
        self._coherence_enabled = coherence
        self._degraded_ttl = degraded_ttl
        self._queue.watch(queue)
        self._l1_entries.set_function(lambda: l1.entries)
        self._l1_bytes.set_function(lambda: l1.bytes)

    async def refresh(self) -> None:
        """Read the write-behind queue's figures from Redis; on failure keep the last ones."""
        await self._queue.refresh()

    def figures(self) -> Figures:
        """What ``/admin/stats`` says beside the window (call ``refresh`` first)."""
        self._take_in()
        l1, queue = self._l1, self._queue.stats
        return Figures(
            totals=self._totals.copy(),
            l1_entries=l1.entries if l1 else 0,
            l1_bytes=l1.bytes if l1 else 0,
            l1_max_entries=l1.max_entries if l1 else 0,
            l1_max_bytes=l1.max_bytes if l1 else 0,
            l2_enabled=self._l2_enabled,
            breaker_open=self._breaker_open,
            coherence_enabled=self._coherence_enabled,
            subscribed=self._coherence_subscribed,
            degraded_ttl=self._degraded_ttl,
            write_behind=self._queue.queue is not None,
            queue_available=self._queue.available,
            queue_depth=queue.depth if queue else 0,
            oldest_pending_age=queue.oldest_age if queue else 0.0,
            dead_letters=queue.dead if queue else 0,
        )

    def snapshot(self) -> dict[str, Any]:
        """The ``/admin/stats`` document (call ``refresh`` first for fresh queue figures)."""
        now = self._clock.time()
        return document(self.window, now, self.figures())


__all__ = ["OUTCOMES", "UNMATCHED", "Metrics", "Series", "method_label", "origin_failed"]
