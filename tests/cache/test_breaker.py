from __future__ import annotations

import asyncio

import pytest

from cache.breaker import Breaker, Guard
from cache.errors import CircuitOpen, CorruptEntry, TierUnavailable
from tests.fakes import FakeClock, RecordingObserver


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


def test_a_late_success_of_a_call_made_before_it_opened_does_not_close_it(
    clock: FakeClock,
) -> None:
    changes: list[bool] = []
    b = breaker(clock, changes)
    for _ in range(3):
        b.failure()
    b.success()  # a slow call, started while it was closed, answers now
    assert b.is_open
    assert not b.allow()
    clock.advance(10)
    assert b.allow()  # the probe
    b.success()
    assert changes == [True, False]  # closed by the probe
    assert b.allow()
    assert b.allow()  # closed: every call goes through


def test_failures_while_open_do_not_report_again(clock: FakeClock) -> None:
    changes: list[bool] = []
    b = breaker(clock, changes)
    for _ in range(10):
        b.failure()
    assert changes == [True]


# -- the guard: every L2 caller beside the tiered cache, behind the one breaker ------------------


def opened(clock: FakeClock, changes: list[bool] | None = None) -> Breaker:
    b = breaker(clock, changes if changes is not None else [])
    for _ in range(3):
        b.failure()
    return b


async def test_a_guard_refuses_at_once_while_open_and_the_call_is_not_made(
    clock: FakeClock, observer: RecordingObserver
) -> None:
    guard = Guard(opened(clock), observer=observer)
    made = []
    with pytest.raises(CircuitOpen) as refused:
        async with guard.call("queue enqueue"):
            made.append(1)
    assert made == []
    assert isinstance(refused.value, TierUnavailable)  # every caller's handling applies
    assert str(refused.value) == "queue enqueue: circuit breaker open"
    assert observer.errors == {}  # a call not made is no L2 error


async def test_guarded_failures_of_any_op_open_the_shared_breaker_and_are_counted(
    clock: FakeClock, observer: RecordingObserver
) -> None:
    changes: list[bool] = []
    b = breaker(clock, changes)
    guard = Guard(b, observer=observer)
    for op in ("lease", "publish", "queue claim"):
        with pytest.raises(TierUnavailable):
            async with guard.call(op):
                raise TierUnavailable(op, "refused")
    assert changes == [True]
    assert observer.errors == {("l2", "lease"): 1, ("l2", "publish"): 1, ("l2", "queue claim"): 1}


async def test_a_guarded_success_breaks_the_run_of_failures(clock: FakeClock) -> None:
    b = breaker(clock, [])
    guard = Guard(b)
    b.failure()
    b.failure()
    async with guard.call("ping"):
        pass
    b.failure()
    b.failure()
    assert not b.is_open


async def test_a_corrupt_answer_is_redis_answering_a_success_for_the_breaker(
    clock: FakeClock,
) -> None:
    changes: list[bool] = []
    b = opened(clock, changes)
    clock.advance(10)
    with pytest.raises(CorruptEntry):
        async with Guard(b).call("queue pending"):  # the probe
            raise CorruptEntry("not ours")
    assert not b.is_open
    assert changes == [True, False]


async def test_in_half_open_one_guarded_call_is_the_probe_and_the_tiered_cache_shares_it(
    clock: FakeClock,
) -> None:
    b = opened(clock)
    guard = Guard(b)
    clock.advance(10)
    probe_started, probe_may_end = asyncio.Event(), asyncio.Event()

    async def probe() -> None:
        async with guard.call("queue enqueue"):
            probe_started.set()
            await probe_may_end.wait()

    task = asyncio.create_task(probe())
    await probe_started.wait()
    with pytest.raises(CircuitOpen):
        async with guard.call("lease"):
            pass
    assert not b.allow()  # what the tiered cache asks before each of its calls
    probe_may_end.set()
    await task
    assert not b.is_open
    async with guard.call("lease"):
        pass


async def test_a_refusal_from_a_guard_inside_another_is_not_reported_twice(
    clock: FakeClock, observer: RecordingObserver
) -> None:
    b = breaker(clock, [])
    outer, inner = Guard(b, observer=observer), Guard(opened(clock), observer=observer)
    b.failure()
    with pytest.raises(CircuitOpen):
        async with outer.call("purge"), inner.call("purge"):
            pass
    assert observer.errors == {}
    b.failure()
    assert not b.is_open  # the refusal was no third failure


async def test_a_guard_without_a_breaker_only_counts(observer: RecordingObserver) -> None:
    guard = Guard(observer=observer)
    for _ in range(10):
        with pytest.raises(TierUnavailable):
            async with guard.call("publish"):
                raise TierUnavailable("publish", "refused")
    assert observer.errors == {("l2", "publish"): 10}
