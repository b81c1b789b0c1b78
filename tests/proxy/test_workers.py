"""Adding up the figures of several workers (``proxy.workers``), without processes."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.openmetrics import exposition as openmetrics
from prometheus_client.openmetrics import parser as openmetrics_parser
from prometheus_client.parser import text_string_to_metric_families

from proxy.config import parse_settings
from proxy.metrics import Metrics
from proxy.workers import Workers, _Merged, _parse
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


def workers(tmp_path: Path) -> Workers:
    settings = parse_settings(
        "upstream: {url: 'http://o'}\nl2: {url: 'redis://h'}\nserver: {workers: 2}", env={}
    )
    return Workers(settings, tmp_path / "c.yaml", Metrics(FakeClock()))


def values(pool: Workers) -> dict[str, float]:
    registry = pool._merged()
    text = generate_latest(_Merged(registry)).decode()
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_counters_and_sizes_add_up_and_states_take_the_telling_worker(tmp_path: Path) -> None:
    pool = workers(tmp_path)
    first, second = pool._slots
    first.families = _parse(WORKER.format(requests=10, entries=3, breaker=0, subscribed=1))
    second.families = _parse(WORKER.format(requests=5, entries=4, breaker=1, subscribed=0))
    assert values(pool) == {
        "cachecar_requests_total": 15,
        "cachecar_l1_entries": 7,  # summed
        "cachecar_l2_breaker_open": 1,  # open if any worker's is
        "cachecar_coherence_subscribed": 0,  # subscribed only if every worker is
    }


def test_a_dead_workers_counts_stay_and_its_gauges_go(tmp_path: Path) -> None:
    pool = workers(tmp_path)
    first, second = pool._slots
    first.families = _parse(WORKER.format(requests=10, entries=3, breaker=0, subscribed=1))
    second.families = _parse(WORKER.format(requests=5, entries=4, breaker=0, subscribed=1))
    assert values(pool)["cachecar_requests_total"] == 15
    pool._retire(first)  # it died; a new worker in its slot starts from 0
    first.families = _parse(WORKER.format(requests=0, entries=0, breaker=0, subscribed=1))
    assert values(pool)["cachecar_requests_total"] == 15  # never backwards
    assert values(pool)["cachecar_l1_entries"] == 4  # its L1 died with it
    first.families = _parse(WORKER.format(requests=2, entries=1, breaker=0, subscribed=1))
    assert values(pool)["cachecar_requests_total"] == 17


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


def test_the_merged_exposition_is_valid_openmetrics(tmp_path: Path) -> None:
    pool = workers(tmp_path)
    for slot in pool._slots:
        slot.families = _parse(HISTOGRAM)
    text = openmetrics.generate_latest(_Merged(pool._merged())).decode()  # type: ignore[no-untyped-call]
    [family] = openmetrics_parser.text_string_to_metric_families(text)  # type: ignore[no-untyped-call]
    buckets = [s for s in family.samples if s.name.endswith("_bucket")]
    assert [(s.labels["outcome"], s.labels["le"], s.value) for s in buckets][:3] == [
        ("hit_l1", "0.5", 2.0),
        ("hit_l1", "10.0", 4.0),
        ("hit_l1", "+Inf", 4.0),
    ]
