"""The last-minute window behind /admin/stats."""

from __future__ import annotations

import math
from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from proxy.stats import LATENCY_BOUNDS, Window, _bin, percentiles


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


def test_stale_and_revalidated_answers_are_reads_but_not_hits() -> None:
    window = Window(started=0.0)
    for outcome in ("hit_l1", "hit_l2", "stale", "revalidated", "miss", "bypass", "write"):
        window.request(outcome, 0.001, now=0.5)
    ratio = window.snapshot(now=1.0)["hit_ratio"]["overall"]
    assert ratio == {"last_minute": 2 / 5, "since_start": 2 / 5}  # bypass and write are not reads


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


def test_each_bin_is_ten_percent_wider_and_holds_its_upper_bound() -> None:
    assert LATENCY_BOUNDS[0] == 1e-6
    for index, bound in enumerate(LATENCY_BOUNDS[1:], start=1):
        assert math.isclose(bound / LATENCY_BOUNDS[index - 1], 1.1)
        assert _bin(bound) == index
        assert _bin(math.nextafter(LATENCY_BOUNDS[index - 1], math.inf)) == index
    assert _bin(0.0) == _bin(1e-6) == 0
    assert LATENCY_BOUNDS[-1] > 1e9  # past any duration a running process measures


def test_counts_added_to_a_second_read_as_the_same_events_one_by_one() -> None:
    by_one, at_once = Window(started=10.0), Window(started=10.0)
    for seconds in (0.001, 0.001, 0.2):
        by_one.request("hit_l1", seconds, now=10.5)
    by_one.lookup("l1", True, now=10.5)
    by_one.lookup("l1", False, now=10.7)
    by_one.request("miss", 0.05, now=11.2)
    at_once.add_requests(10, "hit_l1", {_bin(0.001): 2, _bin(0.2): 1})
    at_once.add_lookups(10, "l1", hits=1, misses=1)
    at_once.add_requests(11, "miss", {_bin(0.05): 1})
    assert at_once.snapshot(now=12.0) == by_one.snapshot(now=12.0)
    assert at_once.dump() == by_one.dump()
