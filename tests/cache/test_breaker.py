from __future__ import annotations

from cache.breaker import Breaker
from tests.fakes import FakeClock


def breaker(clock: FakeClock, changes: list[bool]) -> Breaker:
    return Breaker(failures=3, reset_after=10, clock=clock, on_change=changes.append)


def test_opens_after_consecutive_failures_only(clock: FakeClock) -> None:
    changes: list[bool] = []
    b = breaker(clock, changes)
    b.failure()
    b.failure()
    b.success()  # the run is broken
    b.failure()
    b.failure()
    assert b.allow()
    b.failure()
    assert b.is_open
    assert not b.allow()
    assert changes == [True]


def test_one_probe_after_reset_after_then_closed_on_success(clock: FakeClock) -> None:
    changes: list[bool] = []
    b = breaker(clock, changes)
    for _ in range(3):
        b.failure()
    clock.advance(9.9)
    assert not b.allow()
    clock.advance(0.1)
    assert b.allow()  # the probe
    assert not b.allow()  # only one at a time
    b.success()
    assert not b.is_open
    assert b.allow()
    assert changes == [True, False]


def test_a_failed_probe_waits_reset_after_again(clock: FakeClock) -> None:
    b = breaker(clock, [])
    for _ in range(3):
        b.failure()
    clock.advance(10)
    assert b.allow()
    b.failure()
    assert b.is_open
    clock.advance(5)
    assert not b.allow()
    clock.advance(5)
    assert b.allow()


def test_a_probe_that_never_reports_is_given_up(clock: FakeClock) -> None:
    b = breaker(clock, [])
    for _ in range(3):
        b.failure()
    clock.advance(10)
    assert b.allow()  # this caller is cancelled and never reports
    clock.advance(10)
    assert b.allow()  # a new probe is allowed rather than staying open forever


def test_failures_while_open_do_not_report_again(clock: FakeClock) -> None:
    changes: list[bool] = []
    b = breaker(clock, changes)
    for _ in range(10):
        b.failure()
    assert changes == [True]
