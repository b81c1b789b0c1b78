"""The flusher: batches, bounded concurrency, retries with backoff, dead letters, draining."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Sequence

import fakeredis
import pytest

from cache.entry import Entry
from cache.write_behind.flusher import Backoff, Flusher, Outcome, Sent
from cache.write_behind.queue import WriteQueue
from cache.write_behind.records import Claim, QueuedWrite
from tests.fakes import FakeClock, RecordingObserver


def put(key: str, body: bytes) -> QueuedWrite:
    return QueuedWrite(key, "PUT", f"/{key}", Entry(200, (), body, 0.0, 60.0))


class Origin:
    """A sink that records what it receives; answers are set per key."""

    def __init__(self) -> None:
        self.received: list[tuple[str, bytes]] = []
        self.answers: dict[str, Sent] = {}
        self.in_flight = 0
        self.most_in_flight = 0
        self.delay = 0.0

    async def send(self, write: QueuedWrite) -> Sent:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay)
        finally:
            self.in_flight -= 1
        answer = self.answers.get(write.key, Sent(Outcome.OK))
        if answer.outcome is Outcome.OK:
            self.received.append((write.key, write.entry.body))
        return answer


@pytest.fixture
def queue(clock: FakeClock) -> WriteQueue:
    client = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    return WriteQueue(client, key_prefix="t:", timeout=2.0, clock=clock)


def flusher_for(
    queue: WriteQueue,
    origin: Origin,
    clock: FakeClock,
    observer: RecordingObserver | None = None,
    dead: list[str] | None = None,
    **overrides: int,
) -> Flusher:
    async def on_dead(key: str) -> None:
        if dead is not None:
            dead.append(key)

    return Flusher(
        queue,
        origin,
        clock=clock,
        interval=0.05,
        batch_size=overrides.get("batch_size", 10),
        concurrency=overrides.get("concurrency", 4),
        max_attempts=overrides.get("max_attempts", 3),
        backoff=Backoff(1.0, 8.0, random.Random(7)),
        send_timeout=1.0,
        on_dead=on_dead,
        observer=observer,
    )


async def test_a_flush_sends_each_key_once_with_its_newest_value(
    queue: WriteQueue, clock: FakeClock
) -> None:
    origin = Origin()
    for n in range(100):
        await queue.enqueue(put(f"k{n % 10}", str(n).encode()))
    flusher = flusher_for(queue, origin, clock)
    assert await flusher.flush_once() == 10
    assert sorted(origin.received) == sorted((f"k{k}", str(90 + k).encode()) for k in range(10))
    assert await flusher.flush_once() == 0


async def test_batches_are_bounded_and_sends_run_at_bounded_concurrency(
    queue: WriteQueue, clock: FakeClock
) -> None:
    origin = Origin()
    origin.delay = 0.01
    for n in range(25):
        await queue.enqueue(put(f"k{n}", b"x"))
    flusher = flusher_for(queue, origin, clock, batch_size=10, concurrency=3)
    assert await flusher.drain(5.0) == 25
    assert len(origin.received) == 25
    assert origin.most_in_flight == 3


async def test_a_batch_the_origin_took_is_recorded_in_one_call(
    queue: WriteQueue, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A script call per write would cost the flusher more than the origin's answer."""
    origin = Origin()
    origin.answers["k3"] = Sent(Outcome.RETRY, "the origin answered 503")
    for n in range(10):
        await queue.enqueue(put(f"k{n}", b"x"))
    recorded: list[int] = []
    ack_all = queue.ack_all

    async def counted(claims: Sequence[Claim]) -> list[bool]:
        recorded.append(len(claims))
        return await ack_all(claims)

    monkeypatch.setattr(queue, "ack_all", counted)
    flusher = flusher_for(queue, origin, clock, batch_size=10, concurrency=3)
    assert await flusher.flush_once() == 10
    assert recorded == [9]
    assert (await queue.stats()).depth == 1  # k3, waiting out its backoff


async def test_an_unsettled_write_has_its_key_dropped_before_the_ack(
    queue: WriteQueue, clock: FakeClock
) -> None:
    """Its writer may have died before the tiers had it: they may hold an older value."""
    origin = Origin()
    settled = await queue.enqueue(put("settled", b"x"))
    queue.settled("settled", settled.seq)
    await queue.enqueue(put("unsettled", b"x"))
    dropped: list[tuple[str, int]] = []

    async def on_stale(key: str) -> None:
        dropped.append((key, (await queue.stats()).depth))

    flusher = flusher_for(queue, origin, clock)
    flusher.on_stale = on_stale
    assert await flusher.flush_once() == 2
    assert dropped == [("unsettled", 2)]  # while both were still queued
    assert (await queue.stats()).depth == 0


async def test_a_failing_write_is_retried_after_a_backoff_and_then_succeeds(
    queue: WriteQueue, clock: FakeClock, observer: RecordingObserver
) -> None:
    origin = Origin()
    origin.answers["k"] = Sent(Outcome.RETRY, "the origin answered 503")
    await queue.enqueue(put("k", b"v"))
    flusher = flusher_for(queue, origin, clock, observer)
    await flusher.flush_once()
    assert await flusher.flush_once() == 0  # waiting out the backoff
    clock.advance(1.0)  # attempt 1 waits between 0.5s and 1s
    del origin.answers["k"]
    assert await flusher.flush_once() == 1
    assert origin.received == [("k", b"v")]
    assert observer.flushes == Counter({"retry": 1, "ok": 1})


async def test_after_max_attempts_a_write_is_dead_and_other_keys_keep_flowing(
    queue: WriteQueue, clock: FakeClock, observer: RecordingObserver
) -> None:
    origin = Origin()
    origin.answers["bad"] = Sent(Outcome.RETRY, "the origin answered 500")
    dead: list[str] = []
    flusher = flusher_for(queue, origin, clock, observer, dead, max_attempts=3)
    await queue.enqueue(put("bad", b"x"))
    for attempt in range(3):
        await queue.enqueue(put(f"good{attempt}", b"y"))
        await flusher.flush_once()
        clock.advance(8.0)
    assert [key for key, _ in origin.received] == ["good0", "good1", "good2"]
    [letter] = await queue.dead_letters()
    assert (letter.key, letter.attempts, letter.last_error) == ("bad", 3, "the origin answered 500")
    assert dead == ["bad"]  # the caches are told to drop what the origin never took
    assert observer.flushes == Counter({"ok": 3, "retry": 2, "dead": 1})
    assert (await queue.stats()).depth == 0


async def test_a_permanent_refusal_is_dead_at_once(queue: WriteQueue, clock: FakeClock) -> None:
    origin = Origin()
    origin.answers["bad"] = Sent(Outcome.PERMANENT, "the origin answered 422")
    dead: list[str] = []
    await queue.enqueue(put("bad", b"x"))
    await flusher_for(queue, origin, clock, dead=dead, max_attempts=10).flush_once()
    [letter] = await queue.dead_letters()
    assert letter.attempts == 1
    assert dead == ["bad"]


async def test_a_sink_that_raises_is_a_retry_and_the_loop_lives_on(
    queue: WriteQueue, clock: FakeClock
) -> None:
    class Broken(Origin):
        async def send(self, write: QueuedWrite) -> Sent:
            raise RuntimeError("a bug in the sink")

    await queue.enqueue(put("k", b"v"))
    flusher = flusher_for(queue, Broken(), clock)
    await flusher.flush_once()
    clock.advance(1.0)  # past the first backoff
    [claim] = await queue.claim(10, 1.0)
    assert claim.tries == 1


async def test_a_send_that_hangs_is_a_retry(queue: WriteQueue, clock: FakeClock) -> None:
    origin = Origin()
    origin.delay = 5.0  # past send_timeout (1s)
    await queue.enqueue(put("k", b"v"))
    flusher = flusher_for(queue, origin, clock)
    await flusher.flush_once()
    assert origin.received == []
    assert (await queue.stats()).depth == 1  # still queued, waiting out its backoff


async def test_a_claim_whose_lease_ran_short_is_not_sent(
    queue: WriteQueue, clock: FakeClock
) -> None:
    """A replica that stalled past its lease must not send: another may have the key now."""
    origin = Origin()
    flusher = flusher_for(queue, origin, clock)
    await queue.enqueue(put("k", b"v"))
    [claim] = await queue.claim(10, flusher.lease)
    clock.advance(flusher.lease - 0.5)  # less than send_timeout (1s) left
    assert await flusher._send(claim) is None
    assert origin.received == []


async def test_drain_stops_at_its_deadline_and_leaves_the_rest_queued(
    queue: WriteQueue, clock: FakeClock
) -> None:
    origin = Origin()
    origin.delay = 0.2
    for n in range(20):
        await queue.enqueue(put(f"k{n}", b"x"))
    flusher = flusher_for(queue, origin, clock, batch_size=2, concurrency=1)
    await flusher.drain(0.5)
    assert 0 < len(origin.received) < 20
    assert (await queue.stats()).depth == 20 - len(origin.received)


async def test_run_flushes_every_interval_until_cancelled(
    queue: WriteQueue, clock: FakeClock
) -> None:
    origin = Origin()
    flusher = flusher_for(queue, origin, clock)
    task = asyncio.create_task(flusher.run())
    try:
        await queue.enqueue(put("k", b"v"))
        for _ in range(200):
            if origin.received:
                break
            await asyncio.sleep(0.01)
        assert origin.received == [("k", b"v")]
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


@pytest.mark.parametrize("attempt", [1, 2, 3, 4, 10, 60, 1000])
def test_backoff_is_exponential_with_jitter_and_capped(attempt: int) -> None:
    backoff = Backoff(0.1, 30.0, random.Random(attempt))
    ceiling = min(30.0, 0.1 * 2 ** (attempt - 1))
    delays = [backoff.delay(attempt) for _ in range(50)]
    assert all(ceiling / 2 <= d <= ceiling for d in delays)
    assert len(set(delays)) > 1  # jittered: replicas that failed together retry apart


def test_backoff_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="initial <= max"):
        Backoff(5.0, 1.0)
