"""The merged figures of the workers (``proxy.workers``): several processes counted as one.

    each worker's /metrics text  -> parse -> families ─┐
    what dead workers counted (counters only)  ────────┴─> Fleet.metrics -> one exposition
    each worker's /worker/stats  -> window + figures ─┐
    what dead workers counted (totals only)  ─────────┴─> Fleet.stats -> stats.document

Counters and histograms are summed; so is a gauge, unless a sum means nothing: then the largest
(``LARGEST``) or smallest (``SMALLEST``). A worker that died keeps counting with the last figures
read from it, so no counter goes backwards when it is restarted; its gauges and its last minute
go with it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

from proxy.stats import Figures, Window, document

# Gauges whose sum over workers means nothing.
LARGEST = frozenset(
    {
        "cachecar_l2_breaker_open",  # one worker skipping Redis is worth knowing
        "cachecar_build_info",
        "cachecar_write_behind_queue_depth",  # the queue is shared: each reports all of it
        "cachecar_write_behind_oldest_age_seconds",
        "cachecar_write_behind_dead_letters",
        "process_max_fds",
    }
)
SMALLEST = frozenset(
    {
        "cachecar_coherence_subscribed",  # 1 only while every worker hears the others
        "cachecar_write_behind_queue_readable",
        "process_start_time_seconds",
    }
)
SUMMED_TYPES = frozenset({"counter", "histogram", "summary"})

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@dataclass
class Family:
    name: str
    kind: str
    help: str
    samples: Samples = field(default_factory=dict)


class Fleet:
    """The workers' figures added up, with what the workers that died had counted."""

    def __init__(self, started: float) -> None:
        self._retired: dict[str, Family] = {}
        self._retired_window = Window(started)
        self._retired_totals: Counter[str] = Counter()

    def retire(self, families: Iterable[Family], stats: dict[str, Any] | None) -> None:
        """Keep what a dead worker counted (its last figures read): its counters add to
        everyone's from now on."""
        for family in families:
            if family.kind not in SUMMED_TYPES:
                continue
            kept = self._retired.setdefault(
                family.name, Family(family.name, family.kind, family.help)
            )
            for key, value in family.samples.items():
                kept.samples[key] = kept.samples.get(key, 0.0) + value
        if stats is not None:
            self._retired_window.merge(stats["window"], seconds=False)
            self._retired_totals.update(_totals(stats["snapshot"]))

    def metrics(self, live: Iterable[list[Family]]) -> list[Metric]:
        """The live workers' families (each worker's last read) and the dead ones' as one."""
        merged: dict[str, Family] = {}
        gauges: dict[str, list[Samples]] = {}
        for family in [f for families in live for f in families] + list(self._retired.values()):
            into = merged.setdefault(family.name, Family(family.name, family.kind, family.help))
            if family.kind in SUMMED_TYPES:
                for key, value in family.samples.items():
                    into.samples[key] = into.samples.get(key, 0.0) + value
            else:
                gauges.setdefault(family.name, []).append(family.samples)
        for name, parts in gauges.items():
            pick = max if name in LARGEST else min if name in SMALLEST else sum
            keys = {key for part in parts for key in part}
            merged[name].samples = {
                key: float(pick(part[key] for part in parts if key in part)) for key in keys
            }
        metrics = []
        for family in merged.values():
            metric = Metric(family.name, family.help, family.kind)
            # In the workers' order: each label set's lines stay together, buckets by le.
            for (sample, labels), value in family.samples.items():
                metric.add_sample(sample, dict(labels), value)
            metrics.append(metric)
        return metrics

    def stats(self, live: Sequence[dict[str, Any]], control: Figures, now: float) -> dict[str, Any]:
        """The ``/admin/stats`` document of the live workers' ``/worker/stats`` answers and the
        dead ones' totals; what is the same for every worker (what is configured, the shared
        queue's figures) is the supervisor's, ``control``."""
        window = Window(self._retired_window.started)
        window.merge(self._retired_window.dump(), seconds=False)
        for stats in live:
            window.merge(stats["window"])
        snapshots = [s["snapshot"] for s in live]
        figures = Figures(
            totals=self._retired_totals + sum((_totals(s) for s in snapshots), Counter()),
            l1_entries=sum(s["l1"]["entries"] for s in snapshots),
            l1_bytes=sum(s["l1"]["bytes"] for s in snapshots),
            l1_max_entries=sum(s["l1"]["max_entries"] for s in snapshots),
            l1_max_bytes=sum(s["l1"]["max_bytes"] for s in snapshots),
            l2_enabled=control.l2_enabled,
            breaker_open=any(s["l2"]["breaker"] == "open" for s in snapshots),
            coherence_enabled=control.coherence_enabled,
            subscribed=bool(snapshots) and all(s["coherence"]["subscribed"] for s in snapshots),
            degraded_ttl=control.degraded_ttl,
            write_behind=control.write_behind,
            queue_available=control.queue_available,
            queue_depth=control.queue_depth,
            oldest_pending_age=control.oldest_pending_age,
            dead_letters=control.dead_letters,
        )
        return document(window, now, figures)


class Merged:
    """A collector of metrics already made (``Fleet.metrics``), for a registry of its own."""

    def __init__(self, metrics: list[Metric]) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return self._metrics


def parse(text: str) -> list[Family]:
    """A worker's ``/metrics`` text, as families of samples."""
    families = []
    for parsed in text_string_to_metric_families(text):
        family = Family(parsed.name, parsed.type, parsed.documentation)
        for sample in parsed.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            family.samples[key] = sample.value
        families.append(family)
    return families


def _totals(snapshot: dict[str, Any]) -> Counter[str]:
    """A worker's since-start figures that add up across workers."""
    totals: Counter[str] = Counter({"coalesced": snapshot["coalesced_total"]})
    for reason, n in snapshot["l1"]["evictions_total"].items():
        totals[f"evicted:{reason}"] = n
    totals["l2_errors"] = snapshot["l2"]["errors_total"]
    for result, n in snapshot["write_behind"]["flushed_total"].items():
        totals[f"flushed:{result}"] = n
    totals["wb_coalesced"] = snapshot["write_behind"]["coalesced_total"]
    totals["degraded_reads"] = snapshot["coherence"]["degraded_reads_total"]
    return totals
