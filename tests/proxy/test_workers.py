"""Starting and supervising workers (``proxy.workers``), without processes: a dead worker's
figures are handed to the fleet."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from proxy.config import parse_settings
from proxy.fleet import Merged, parse
from proxy.metrics import Metrics
from proxy.workers import Workers
from tests.fakes import FakeClock
from tests.proxy.test_fleet import WORKER


def workers(tmp_path: Path) -> Workers:
    settings = parse_settings(
        "upstream: {url: 'http://o'}\nl2: {url: 'redis://h'}\nserver: {workers: 2}", env={}
    )
    return Workers(settings, tmp_path / "c.yaml", Metrics(FakeClock()))


def values(pool: Workers) -> dict[str, float]:
    text = generate_latest(Merged(pool._merged())).decode()
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_a_dead_workers_counts_stay_and_its_gauges_go(tmp_path: Path) -> None:
    pool = workers(tmp_path)
    first, second = pool._slots
    first.families = parse(WORKER.format(requests=10, entries=3, breaker=0, subscribed=1))
    second.families = parse(WORKER.format(requests=5, entries=4, breaker=0, subscribed=1))
    assert values(pool)["cachecar_requests_total"] == 15
    pool._retire(first)  # it died; a new worker in its slot starts from 0
    first.families = parse(WORKER.format(requests=0, entries=0, breaker=0, subscribed=1))
    assert values(pool)["cachecar_requests_total"] == 15  # never backwards
    assert values(pool)["cachecar_l1_entries"] == 4  # its L1 died with it
    first.families = parse(WORKER.format(requests=2, entries=1, breaker=0, subscribed=1))
    assert values(pool)["cachecar_requests_total"] == 17
