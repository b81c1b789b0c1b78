"""bench.policy_sim: each policy keeps what it should, and none beats the optimum."""

from __future__ import annotations

import pytest

from bench.policy_sim import LRU, POLICIES, S3FIFO, Sieve, belady_hits, render, simulate


@pytest.mark.parametrize("make", POLICIES)
def test_a_trace_that_fits_misses_each_key_once(make: type) -> None:
    policy = make(10)
    trace = [n % 8 for n in range(200)]
    assert sum(policy.access(key) for key in trace) == 200 - 8


@pytest.mark.parametrize("make", POLICIES)
def test_no_policy_holds_more_than_its_size(make: type) -> None:
    policy = make(50)
    for key in range(1000):  # every key new: each one past 50 evicts (or is not admitted)
        policy.access(key)
    held = sum(policy.access(key) for key in range(1000))
    assert held <= 50


def test_lru_evicts_the_least_recently_used_and_belady_the_furthest_used() -> None:
    trace = [1, 2, 1, 3, 2]
    lru = LRU(2)
    assert [lru.access(key) for key in trace] == [False, False, True, False, False]
    assert belady_hits(trace, 2) == 2  # at 3, key 1 is never used again: it goes


def test_sieve_keeps_a_visited_key_past_the_hand() -> None:
    sieve = Sieve(2)
    assert [sieve.access(key) for key in [1, 2, 1, 3, 1]] == [False, False, True, False, True]


def test_s3fifo_keeps_a_key_seen_twice_over_a_scan() -> None:
    cache = S3FIFO(10)
    cache.access(0)
    cache.access(0)  # seen again while new: it moves to the main queue on its way out
    for key in range(1, 40):  # a scan of keys read once
        cache.access(key)
    assert cache.access(0)


def test_the_optimum_is_never_beaten_and_the_report_names_each_policy() -> None:
    rows = simulate(keys=2000, requests=20_000, share=0.1, seed=3)
    assert [row.trace for row in rows] == ["zipf", "scan", "shift"]
    for row in rows:
        assert all(hits <= row.hits["optimum"] for hits in row.hits.values()), row
    zipf = rows[0]
    assert zipf.static is not None
    assert zipf.static <= zipf.hits["optimum"]
    report = render(rows, 2000, 0.1)
    for name in ("LRU", "SIEVE", "S3-FIFO", "W-TinyLFU", "optimum (Belady)"):
        assert name in report
