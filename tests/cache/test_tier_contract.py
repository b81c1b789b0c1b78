"""What every tier promises, run on L1 (memory), fakeredis (memory://), the real Redis, and real
Redis deployments: a Cluster, a master behind Sentinel, a Redis over TLS."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import fakeredis
import pytest
from redis.asyncio import Redis

from cache.entry import Entry
from cache.memory import MemoryTier
from cache.redis.tier import RedisClient, RedisTier, client_from_url
from cache.tier import Tier
from tests.conftest import deployment_of
from tests.fakes import FakeClock
from tests.redis_keys import drop_prefix


@dataclass
class Backend:
    tier: Tier
    ttl: float  # a TTL short enough to wait out on this backend
    wait: Callable[[float], Awaitable[None]]  # let this many seconds pass for the tier


VARIANTS = 3  # the tiers' max_variants here


@pytest.fixture(params=["memory", "fakeredis", "redis", "cluster", "sentinel", "tls"])
async def backend(request: pytest.FixtureRequest, key_prefix: str) -> AsyncIterator[Backend]:
    if request.param == "memory":
        clock = FakeClock()

        async def advance(seconds: float) -> None:
            clock.advance(seconds)

        tier: Tier = MemoryTier(
            max_entries=100, max_bytes=1 << 20, clock=clock, max_variants=VARIANTS
        )
        yield Backend(tier, ttl=30.0, wait=advance)
        await tier.aclose()
        return
    # Redis keeps its own time: these backends wait it out for real, with a TTL of a few ms.
    client: RedisClient
    if request.param == "fakeredis":
        client = fakeredis.FakeAsyncRedis()
    elif request.param == "redis":
        client = Redis.from_url(request.getfixturevalue("redis_url"))
    else:  # built from its URL, as cachecar builds it
        client = client_from_url(deployment_of(request, request.param).url, timeout=1.0)
    try:
        yield Backend(
            RedisTier(client, key_prefix=key_prefix, timeout=1.0, max_variants=VARIANTS),
            ttl=0.05,
            wait=asyncio.sleep,
        )
    finally:
        await drop_prefix(client, key_prefix)
        await client.aclose()


def entry(body: bytes = b'{"id": 1}', status: int = 200) -> Entry:
    return Entry(
        status=status,
        headers=(("Content-Type", "application/json"), ("ETag", '"v1"'), ("X-Ünï", "çødé")),
        body=body,
        stored_at=1_700_000_000.0,
        ttl=600.0,
    )


async def test_an_unknown_key_is_none(backend: Backend) -> None:
    assert await backend.tier.get("nothing:here") is None
    assert await backend.tier.get("nothing:here", "some-variant") is None


async def test_what_is_set_is_what_is_got(backend: Backend) -> None:
    stored = entry(body=bytes(range(256)) * 4)
    await backend.tier.set("users:1", "", stored, 600)
    found = await backend.tier.get("users:1")
    assert found is not None
    assert found.entry == stored
    assert 590 < found.ttl_left <= 600


async def test_a_negative_entry_is_an_entry_not_a_miss(backend: Backend) -> None:
    await backend.tier.set("users:404", "", entry(b'{"error": "not found"}', status=404), 5)
    found = await backend.tier.get("users:404")
    assert found is not None
    assert found.entry.status == 404


async def test_variants_of_a_key_are_kept_apart(backend: Backend) -> None:
    await backend.tier.set("products:7", "json", entry(b"json"), 600)
    await backend.tier.set("products:7", "xml", entry(b"xml"), 600)
    json_variant = await backend.tier.get("products:7", "json")
    xml_variant = await backend.tier.get("products:7", "xml")
    assert json_variant is not None
    assert json_variant.entry.body == b"json"
    assert xml_variant is not None
    assert xml_variant.entry.body == b"xml"
    assert await backend.tier.get("products:7", "html") is None
    assert await backend.tier.get("products:7") is None


async def test_setting_a_variant_again_replaces_it(backend: Backend) -> None:
    await backend.tier.set("users:1", "", entry(b"old"), 600)
    await backend.tier.set("users:1", "", entry(b"new"), 600)
    found = await backend.tier.get("users:1")
    assert found is not None
    assert found.entry.body == b"new"


async def test_delete_drops_every_variant_once(backend: Backend) -> None:
    await backend.tier.set("products:7", "json", entry(), 600)
    await backend.tier.set("products:7", "xml", entry(), 600)
    await backend.tier.set("products:8", "", entry(), 600)
    assert await backend.tier.delete("products:7") is True
    assert await backend.tier.get("products:7", "json") is None
    assert await backend.tier.get("products:7", "xml") is None
    assert await backend.tier.delete("products:7") is False
    assert await backend.tier.get("products:8") is not None  # an unrelated key is untouched


async def test_an_entry_is_gone_after_its_ttl(backend: Backend) -> None:
    await backend.tier.set("users:1", "", entry(), backend.ttl)
    assert await backend.tier.get("users:1") is not None
    await backend.wait(backend.ttl * 2)
    assert await backend.tier.get("users:1") is None


async def test_a_ttl_of_zero_stores_nothing(backend: Backend) -> None:
    await backend.tier.set("users:1", "", entry(), 0)
    assert await backend.tier.get("users:1") is None


@pytest.mark.parametrize("key", ["/products?page=2&sort=name", "users:ünï cødé", "a" * 500])
async def test_any_key_text_works(backend: Backend, key: str) -> None:
    await backend.tier.set(key, "", entry(), 600)
    found = await backend.tier.get(key)
    assert found is not None
    assert found.entry == entry()


async def test_replace_makes_the_entry_the_only_variant(backend: Backend) -> None:
    await backend.tier.set("products:7", "json", entry(b"json"), 600)
    await backend.tier.set("products:7", "xml", entry(b"xml"), 600)
    assert await backend.tier.replace("products:7", "", entry(b"written"), 600) is True
    assert await backend.tier.get("products:7", "json") is None
    assert await backend.tier.get("products:7", "xml") is None
    found = await backend.tier.get("products:7")
    assert found is not None
    assert found.entry.body == b"written"


async def test_reads_asked_for_together_each_get_their_own(backend: Backend) -> None:
    # L2 sends the reads of one round of the event loop together (auto-pipelining), more than
    # one round trip's worth here, over many Cluster slots: each still gets its own answer.
    for i in range(0, 180, 2):  # 90: within the memory tier's 100 entries
        await backend.tier.set(f"items:{i}", f"v{i}", entry(body=b"%d" % i), 600)
    found = await asyncio.gather(
        *(backend.tier.get(f"items:{i}", f"v{i}") for i in range(180)),
        backend.tier.get("items:0", "another variant"),
    )
    for i, stored in enumerate(found[:180]):
        if i % 2:
            assert stored is None, i
        else:
            assert stored is not None, i
            assert stored.entry.body == b"%d" % i
    assert found[180] is None


@pytest.mark.parametrize("fill", [False, True], ids=["set", "fill"])
async def test_a_key_holds_so_many_variants_and_no_more(backend: Backend, fill: bool) -> None:
    tier = backend.tier
    fetched_at = 0.0 if fill else None
    for n in range(VARIANTS + 1):
        await tier.set("users:1", f"v{n}", entry(b"%d" % n), 30, fetched_at=fetched_at)
    held = [await tier.get("users:1", f"v{n}") for n in range(VARIANTS + 1)]
    assert [found is not None for found in held] == [True] * VARIANTS + [False]
    # A variant it holds is replaced as before; once the key is written, there is room again.
    await tier.set("users:1", "v0", entry(b"new"), 30, fetched_at=fetched_at)
    found = await tier.get("users:1", "v0")
    assert found is not None
    assert found.entry.body == b"new"
    await tier.replace("users:1", "w", entry(b"written"), 30)
    await tier.set("users:1", f"v{VARIANTS}", entry(b"late"), 30)
    assert await tier.get("users:1", f"v{VARIANTS}") is not None
