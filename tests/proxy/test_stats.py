"""The last-minute window behind /admin/stats."""

from __future__ import annotations

import math
from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from proxy.stats import Window, _bin, percentiles


@given(st.lists(st.floats(min_value=1e-5, max_value=60.0), min_size=1, max_size=300))
def test_percentiles_are_within_five_percent_of_the_exact_ones(samples: list[float]) -> None:
    found = percentiles(Counter(_bin(s) for s in samples))
    assert found is not None
    ordered = sorted(samples)
    for name, fraction in (("p50", 0.50), ("p95", 0.95), ("p99", 0.99)):
        exact = ordered[math.ceil(fraction * len(ordered)) - 1]
        assert abs(found[name] - exact) <= 0.05 * exact, (name, found[name], exact)


def test_an_empty_distribution_has_no_percentiles() -> None:
    assert percentiles({}) is None


def test_only_complete_seconds_are_reported() -> None:
    window = Window(started=100.0)
    window.request("hit_l1", 0.001, now=100.2)
    window.request("miss", 0.010, now=101.5)  # the second still running
    snapshot = window.snapshot(now=101.6)
    assert [point["t"] for point in snapshot["history"]] == [100]
    assert snapshot["hit_ratio"]["overall"]["last_minute"] == 1.0
    assert snapshot["hit_ratio"]["overall"]["since_start"] == 0.5
    assert snapshot["requests_total"]["total"] == 2


def test_stale_answers_are_reads_but_not_hits() -> None:
    window = Window(started=0.0)
    for outcome in ("hit_l1", "hit_l2", "stale", "miss", "bypass", "write"):
        window.request(outcome, 0.001, now=0.5)
    ratio = window.snapshot(now=1.0)["hit_ratio"]["overall"]
    assert ratio == {"last_minute": 2 / 4, "since_start": 2 / 4}  # bypass and write are not reads


def test_a_clock_stepped_back_keeps_counting_in_the_newest_second() -> None:
    window = Window(started=0.0)
    window.request("hit_l1", 0.001, now=10.5)
    window.request("hit_l1", 0.001, now=9.5)  # NTP stepped the clock back
    snapshot = window.snapshot(now=11.0)
    assert [(p["t"], p["requests"]["hit_l1"]) for p in snapshot["history"]][-2:] == [
        (9, 0),
        (10, 2),
    ]


def test_quiet_seconds_are_points_of_no_traffic() -> None:
    window = Window(started=100.0)
    window.request("hit_l1", 0.001, now=100.5)
    window.request("hit_l1", 0.001, now=103.5)
    history = window.snapshot(now=104.0)["history"]
    assert [(p["t"], p["requests"]["hit_l1"]) for p in history] == [
        (100, 1), (101, 0), (102, 0), (103, 1),
    ]  # fmt: skip
    assert history[1]["hit_ratio"] == {"overall": None, "l1": None, "l2": None}
    assert history[1]["latency_seconds"] is None
    assert len(window.snapshot(now=500.0)["history"]) == 60  # a minute, never more


def test_origin_errors_are_counted_apart() -> None:
    window = Window(started=0.0)
    window.origin(error=False, seconds=0.02, now=0.1)
    window.origin(error=True, seconds=5.0, now=0.2)
    origin = window.snapshot(now=1.0)["origin"]
    assert origin["requests_total"] == 2
    assert origin["errors_total"] == 1
    assert origin["requests_per_second"] == 2.0
    assert origin["errors_per_second"] == 1.0
    assert origin["latency_seconds"]["p99"] >= 4.75
