"""L2 beyond the tier contract: key layout, bounded calls, foreign bytes, client checks."""

from __future__ import annotations

import asyncio
from typing import Any

import fakeredis
import pytest
from redis.asyncio import Redis

from cache.entry import Entry
from cache.errors import CorruptEntry, TierUnavailable
from cache.redis.tier import RedisTier, client_from_url
from cache.tier import Stored
from tests.fakes import FakeClock
from tests.ports import free_port, silent_port

ENTRY = Entry(200, (("Content-Type", "text/plain"),), b"hello", 1_700_000_000.0, 60.0)
ENTRY_NEW = Entry(200, (("Content-Type", "text/plain"),), b"written", 1_700_000_000.0, 60.0)


@pytest.mark.redis
async def test_every_key_starts_with_the_prefix_and_holds_variants_as_fields(
    redis_client: Redis, key_prefix: str
) -> None:
    tier = RedisTier(redis_client, key_prefix=key_prefix, timeout=1.0)
    await tier.set("users:1", "", ENTRY, 60)
    await tier.set("products:7", "abc", ENTRY, 60)
    keys = sorted([key async for key in redis_client.scan_iter(match=f"{key_prefix}*")])
    assert keys == [f"{key_prefix}products:7".encode(), f"{key_prefix}users:1".encode()]
    assert await redis_client.hkeys(f"{key_prefix}products:7") == [b"abc"]
    assert 0 < await redis_client.pttl(f"{key_prefix}users:1") <= 60_000


async def test_a_dead_port_is_unavailable_not_an_exception_of_redis() -> None:
    client = client_from_url(f"redis://127.0.0.1:{free_port()}", timeout=0.5)
    tier = RedisTier(client, key_prefix="t:", timeout=0.5)
    for call in (tier.get("k"), tier.set("k", "", ENTRY, 5), tier.delete("k"), tier.ping()):
        with pytest.raises(TierUnavailable):
            await call
    await tier.aclose()


async def test_a_redis_that_never_answers_is_cut_off_at_the_timeout() -> None:
    async with silent_port() as port:
        client = client_from_url(f"redis://127.0.0.1:{port}", timeout=0.05)
        tier = RedisTier(client, key_prefix="t:", timeout=0.05)
        with pytest.raises(TierUnavailable, match="no answer within 50ms"):
            await tier.get("k")
        await tier.aclose()


async def test_foreign_bytes_under_our_key_are_a_corrupt_entry() -> None:
    client = fakeredis.FakeAsyncRedis()
    await client.hset("t:users:1", "", b"\x80\x04\x95 a pickle, say")
    tier = RedisTier(client, key_prefix="t:", timeout=1.0)
    with pytest.raises(CorruptEntry):
        await tier.get("users:1")


def scripts_counted(client: Redis, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The keys of each script call ``client`` makes from now on, in order."""
    calls: list[int] = []
    evalsha = client.evalsha

    def counted(sha: str, numkeys: int, *keys_and_args: Any) -> Any:
        calls.append(numkeys)
        return evalsha(sha, numkeys, *keys_and_args)

    monkeypatch.setattr(client, "evalsha", counted)
    return calls


@pytest.mark.redis
async def test_reads_asked_for_in_one_round_of_the_loop_take_one_round_trip(
    redis_client: Redis, key_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    tier = RedisTier(redis_client, key_prefix=key_prefix, timeout=1.0)
    for i in range(40):
        await tier.set(f"users:{i}", "", ENTRY, 60)
    calls = scripts_counted(redis_client, monkeypatch)
    found = await asyncio.gather(*(tier.get(f"users:{i}") for i in range(50)))
    assert calls == [50]  # 40 there, 10 not: one script call for all
    assert [stored is not None for stored in found] == [True] * 40 + [False] * 10
    calls.clear()
    await asyncio.gather(*(tier.get(f"users:{i}") for i in range(300)))
    assert calls == [128, 128, 44]  # at most MAX_BATCH a round trip, sent together
    calls.clear()
    # A stampede on one key (a cold L1): read once, every caller answered.
    found = await asyncio.gather(*(tier.get("users:1") for _ in range(200)), tier.get("users:2"))
    assert calls == [2]
    assert all(stored is not None and stored.entry == ENTRY for stored in found)


@pytest.mark.redis
async def test_a_key_of_another_type_fails_its_own_read_not_the_others(
    redis_client: Redis, key_prefix: str
) -> None:
    tier = RedisTier(redis_client, key_prefix=key_prefix, timeout=1.0)
    await tier.set("users:1", "", ENTRY, 60)
    await redis_client.set(f"{key_prefix}users:2", b"a string, not a hash")
    one, two = await asyncio.gather(
        tier.get("users:1"), tier.get("users:2"), return_exceptions=True
    )
    assert isinstance(one, Stored)
    assert one.entry == ENTRY
    assert isinstance(two, CorruptEntry)


async def test_a_failed_round_trip_fails_each_of_its_reads_with_one_error() -> None:
    # One error object for the round trip: the caller counts one failure of Redis (one step
    # towards opening the breaker), not one per read it carried.
    async with silent_port() as port:
        client = client_from_url(f"redis://127.0.0.1:{port}", timeout=0.05)
        tier = RedisTier(client, key_prefix="t:", timeout=0.05)
        errors = await asyncio.gather(
            *(tier.get(f"k{i}") for i in range(10)), return_exceptions=True
        )
        assert all(isinstance(error, TierUnavailable) for error in errors)
        assert len({id(error) for error in errors}) == 1
        await tier.aclose()


@pytest.mark.redis
async def test_fills_asked_for_in_one_round_of_the_loop_take_one_round_trip(
    redis_client: Redis, key_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock()
    tier = RedisTier(redis_client, key_prefix=key_prefix, timeout=1.0, clock=clock, fence=60.0)
    await tier.delete("users:3")  # a write's mark: a fill that began before it stays out
    calls = scripts_counted(redis_client, monkeypatch)
    await redis_client.set(f"{key_prefix}users:5", b"a string, not a hash")
    began = clock.time() - 10
    fills = await asyncio.gather(
        *(tier.set(f"users:{i}", "v", ENTRY, 60, fetched_at=began) for i in range(100)),
        return_exceptions=True,
    )
    assert calls == [64, 36]  # at most MAX_BATCH a round trip, sent together
    # The key of another type fails its own fill alone; the fenced one is not stored.
    assert [i for i, fill in enumerate(fills) if isinstance(fill, CorruptEntry)] == [5]
    assert [i for i, fill in enumerate(fills) if fill is not None] == [5]
    monkeypatch.undo()
    found = await asyncio.gather(
        *(tier.get(f"users:{i}", "v") for i in range(100)), return_exceptions=True
    )
    assert [i for i, stored in enumerate(found) if not isinstance(stored, Stored)] == [3, 5]
    assert 0 < await redis_client.pttl(f"{key_prefix}users:7") <= 60_000


async def test_a_failed_round_trip_fails_each_of_its_fills_with_one_error() -> None:
    async with silent_port() as port:
        client = client_from_url(f"redis://127.0.0.1:{port}", timeout=0.05)
        tier = RedisTier(client, key_prefix="t:", timeout=0.05)
        errors = await asyncio.gather(
            *(tier.set(f"k{i}", "", ENTRY, 5, fetched_at=0.0) for i in range(10)),
            return_exceptions=True,
        )
        assert all(isinstance(error, TierUnavailable) for error in errors)
        assert len({id(error) for error in errors}) == 1
        await tier.aclose()


async def test_fills_of_a_round_trip_cut_off_at_shutdown_end_as_cancelled() -> None:
    async with silent_port() as port:
        client = client_from_url(f"redis://127.0.0.1:{port}", timeout=5.0)
        tier = RedisTier(client, key_prefix="t:", timeout=5.0)
        fills = [
            asyncio.ensure_future(tier.set(f"k{i}", "", ENTRY, 5, fetched_at=0.0)) for i in range(3)
        ]
        await asyncio.sleep(0.05)
        for task in list(tier._fills._sending if tier._fills else ()):  # the shutdown's cut
            task.cancel()
        done = await asyncio.wait_for(asyncio.gather(*fills, return_exceptions=True), 1.0)
        assert all(isinstance(outcome, asyncio.CancelledError) for outcome in done)
        await tier.aclose()


def test_a_client_that_decodes_responses_is_refused() -> None:
    with pytest.raises(ValueError, match="decode_responses=False"):
        RedisTier(fakeredis.FakeAsyncRedis(decode_responses=True), key_prefix="", timeout=1)


async def test_memory_urls_get_a_server_of_their_own() -> None:
    one = RedisTier(client_from_url("memory://", timeout=1), key_prefix="", timeout=1)
    two = RedisTier(client_from_url("memory://", timeout=1), key_prefix="", timeout=1)
    await one.set("k", "", ENTRY, 60)
    assert await one.get("k") is not None
    assert await two.get("k") is None


def fenced(client: Redis, clock: FakeClock) -> RedisTier:
    return RedisTier(client, key_prefix="t:", timeout=1.0, clock=clock, fence=60.0)


async def test_a_fill_that_began_before_a_write_elsewhere_is_not_stored() -> None:
    """Replica B fetched the old value; replica A's write landed before B's fill."""
    server = fakeredis.FakeServer()
    clock = FakeClock()
    a = fenced(fakeredis.FakeAsyncRedis(server=server), clock)
    b = fenced(fakeredis.FakeAsyncRedis(server=server), clock)
    fetch_began = clock.time()
    clock.advance(0.2)
    await a.replace("users:1", "", ENTRY_NEW, 60)
    await b.set("users:1", "", ENTRY, 60, fetched_at=fetch_began)
    found = await a.get("users:1")
    assert found is not None
    assert found.entry == ENTRY_NEW
    # A delete (cache-aside write, purge) fences the same way.
    await a.delete("users:2")
    await b.set("users:2", "", ENTRY, 60, fetched_at=fetch_began)
    assert await a.get("users:2") is None
    # A fill that began well after the mark is stored.
    clock.advance(5)
    await b.set("users:2", "", ENTRY, 60, fetched_at=clock.time())
    assert await a.get("users:2") is not None


async def test_a_replace_with_an_older_version_leaves_the_newer_one() -> None:
    tier = fenced(fakeredis.FakeAsyncRedis(), FakeClock())
    assert await tier.replace("users:1", "", ENTRY_NEW, 60, version=7) is True
    assert await tier.replace("users:1", "", ENTRY, 60, version=6) is False
    await tier.delete("users:1")  # a drop keeps the version: a late older write stays out
    assert await tier.replace("users:1", "", ENTRY, 60, version=5) is False
    assert await tier.replace("users:1", "", ENTRY, 60, version=8) is True
    found = await tier.get("users:1")
    assert found is not None
    assert found.entry == ENTRY


async def test_delete_counts_variants_not_its_own_marks() -> None:
    tier = fenced(fakeredis.FakeAsyncRedis(), FakeClock())
    await tier.replace("users:1", "", ENTRY, 60, version=3)
    assert await tier.delete("users:1") is True
    assert await tier.delete("users:1") is False  # only the marks are left
