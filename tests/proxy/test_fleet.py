"""Adding up the figures of several workers (``proxy.fleet``), without processes."""

from __future__ import annotations

import json
from typing import Any

from prometheus_client import generate_latest
from prometheus_client.openmetrics import exposition as openmetrics
from prometheus_client.openmetrics import parser as openmetrics_parser
from prometheus_client.parser import text_string_to_metric_families

from cache.memory import MemoryTier
from cache.observer import Eviction
from proxy.fleet import Fleet, Merged, parse
from proxy.metrics import Metrics
from tests.fakes import FakeClock

WORKER = """\
# HELP cachecar_requests_total Requests.
# TYPE cachecar_requests_total counter
cachecar_requests_total{{method="GET",route="/u",status="200"}} {requests}
# HELP cachecar_l1_entries Entries.
# TYPE cachecar_l1_entries gauge
cachecar_l1_entries {entries}
# HELP cachecar_l2_breaker_open Open.
# TYPE cachecar_l2_breaker_open gauge
cachecar_l2_breaker_open {breaker}
# HELP cachecar_coherence_subscribed Subscribed.
# TYPE cachecar_coherence_subscribed gauge
cachecar_coherence_subscribed {subscribed}
"""


def values(fleet: Fleet, *workers: str) -> dict[str, float]:
    text = generate_latest(Merged(fleet.metrics(parse(w) for w in workers))).decode()
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_counters_and_sizes_add_up_and_states_take_the_telling_worker() -> None:
    first = WORKER.format(requests=10, entries=3, breaker=0, subscribed=1)
    second = WORKER.format(requests=5, entries=4, breaker=1, subscribed=0)
    assert values(Fleet(0.0), first, second) == {
        "cachecar_requests_total": 15,
        "cachecar_l1_entries": 7,  # summed
        "cachecar_l2_breaker_open": 1,  # open if any worker's is
        "cachecar_coherence_subscribed": 0,  # subscribed only if every worker is
    }


def test_a_retired_workers_counters_stay_and_its_gauges_go() -> None:
    fleet = Fleet(0.0)
    fleet.retire(parse(WORKER.format(requests=10, entries=3, breaker=1, subscribed=0)), None)
    now = values(fleet, WORKER.format(requests=2, entries=1, breaker=0, subscribed=1))
    assert now == {
        "cachecar_requests_total": 12,
        "cachecar_l1_entries": 1,
        "cachecar_l2_breaker_open": 0,
        "cachecar_coherence_subscribed": 1,
    }


HISTOGRAM = """\
# HELP cachecar_request_duration_seconds Time.
# TYPE cachecar_request_duration_seconds histogram
cachecar_request_duration_seconds_bucket{outcome="hit_l1",le="0.5"} 1.0
cachecar_request_duration_seconds_bucket{outcome="hit_l1",le="10.0"} 2.0
cachecar_request_duration_seconds_bucket{outcome="hit_l1",le="+Inf"} 2.0
cachecar_request_duration_seconds_count{outcome="hit_l1"} 2.0
cachecar_request_duration_seconds_sum{outcome="hit_l1"} 3.0
cachecar_request_duration_seconds_bucket{outcome="miss",le="0.5"} 0.0
cachecar_request_duration_seconds_bucket{outcome="miss",le="10.0"} 1.0
cachecar_request_duration_seconds_bucket{outcome="miss",le="+Inf"} 1.0
cachecar_request_duration_seconds_count{outcome="miss"} 1.0
cachecar_request_duration_seconds_sum{outcome="miss"} 4.0
"""


def test_the_merged_exposition_is_valid_openmetrics() -> None:
    merged = Fleet(0.0).metrics([parse(HISTOGRAM), parse(HISTOGRAM)])
    text = openmetrics.generate_latest(Merged(merged)).decode()  # type: ignore[no-untyped-call]
    [family] = openmetrics_parser.text_string_to_metric_families(text)  # type: ignore[no-untyped-call]
    buckets = [s for s in family.samples if s.name.endswith("_bucket")]
    assert [(s.labels["outcome"], s.labels["le"], s.value) for s in buckets][:3] == [
        ("hit_l1", "0.5", 2.0),
        ("hit_l1", "10.0", 4.0),
        ("hit_l1", "+Inf", 4.0),
    ]


def worker_stats(metrics: Metrics) -> Any:
    """A worker's ``/worker/stats`` answer, through JSON as the supervisor reads it."""
    return json.loads(json.dumps({"snapshot": metrics.snapshot(), "window": metrics.window.dump()}))


def busy_worker(clock: FakeClock) -> Metrics:
    metrics = Metrics(clock)
    metrics.watch(
        MemoryTier(max_entries=10, max_bytes=1000, clock=clock), l2=True, coherence=True, queue=None
    )
    metrics.coherence_changed(True)
    metrics.request("/u", "GET", 200, "hit_l1", 0.001)
    metrics.request("/u", "GET", 200, "miss", 0.02)
    metrics.origin_request("/u", "GET", "200", 0.015)
    metrics.lookup("l1", False)
    metrics.coalesced("/u")
    metrics.evicted(Eviction.SIZE, 2)
    metrics.tier_error("l2", "get")
    metrics.flushed("ok")
    metrics.degraded_read()
    clock.advance(2.0)
    return metrics


def test_one_workers_stats_read_as_its_own_document() -> None:
    clock = FakeClock()
    worker = busy_worker(clock)
    merged = Fleet(worker.window.started).stats(
        [worker_stats(worker)], worker.figures(), clock.time()
    )
    assert json.dumps(merged) == json.dumps(worker.snapshot())  # the same keys, in the same order


def test_workers_stats_add_up_and_a_retired_workers_totals_stay() -> None:
    clock = FakeClock()
    first, second = busy_worker(clock), busy_worker(clock)
    fleet = Fleet(first.window.started)
    fleet.retire([], worker_stats(first))
    merged = fleet.stats([worker_stats(second)], second.figures(), clock.time())
    assert merged["requests_total"]["total"] == 4  # since start: the retired worker's too
    assert merged["coalesced_total"] == 2
    assert merged["l1"]["evictions_total"]["size"] == 4
    assert merged["l2"]["errors_total"] == 2
    assert merged["write_behind"]["flushed_total"]["ok"] == 2
    assert merged["history"][-2]["requests"]["hit_l1"] == 1  # its last minute went with it
    assert merged["l1"]["max_entries"] == 10  # its L1 too
    assert merged["coherence"]["subscribed"] is True
    assert merged["coherence"]["degraded_reads_total"] == 2
