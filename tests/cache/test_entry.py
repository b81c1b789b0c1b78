from __future__ import annotations

import gc
import struct
import sys
import tracemalloc

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cache.entry import MAGIC, Entry, decode, encode
from cache.errors import CorruptEntry

header_text = st.text(
    alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\r\n"), max_size=40
)
entries = st.builds(
    Entry,
    status=st.integers(100, 599),
    headers=st.lists(st.tuples(header_text, header_text), max_size=8).map(tuple),
    body=st.binary(max_size=2048),
    stored_at=st.floats(0, 4e9, allow_nan=False),
    ttl=st.floats(0, 1e7, allow_nan=False),
    fetch_seconds=st.one_of(st.just(0.0), st.floats(1e-6, 1e4)),
    must_revalidate=st.booleans(),
    stale_limits=st.none() | st.tuples(*[st.floats(0, 1e7) | st.just(float("inf"))] * 2),
)


@given(entries)
def test_every_entry_survives_the_envelope(entry: Entry) -> None:
    assert decode(encode(entry)) == entry


def test_the_envelope_is_versioned_and_starts_with_its_magic() -> None:
    data = encode(Entry(200, (("Content-Type", "application/json"),), b"{}", 1.0, 30.0))
    assert data[:2] == MAGIC
    assert data[2] == 1


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"CC",
        b"\x80\x04\x95pickle",  # what a pickle looks like: never executed, just refused
        b'{"status": 200}',
        b"XX" + bytes(40),
    ],
)
def test_foreign_bytes_are_refused(data: bytes) -> None:
    with pytest.raises(CorruptEntry):
        decode(data)


def test_a_newer_version_is_refused_not_misread() -> None:
    data = bytearray(encode(Entry(200, (), b"x", 1.0, 1.0)))
    data[2] = 2
    with pytest.raises(CorruptEntry, match="version 2"):
        decode(bytes(data))


@given(entries, st.data())
def test_truncated_or_extended_envelopes_are_refused(entry: Entry, data: st.DataObject) -> None:
    raw = encode(entry)
    cut = data.draw(st.integers(0, len(raw) - 1))
    with pytest.raises(CorruptEntry):
        decode(raw[:cut])
    with pytest.raises(CorruptEntry):
        decode(raw + b"\x00")


def test_a_header_that_runs_past_the_end_is_refused() -> None:
    raw = bytearray(encode(Entry(200, (("A", "b"),), b"", 1.0, 1.0)))
    struct.pack_into(">H", raw, 28, 500)  # the first header's name claims 500 bytes
    with pytest.raises(CorruptEntry):
        decode(bytes(raw))


def test_age_and_expiry_follow_stored_at_and_ttl() -> None:
    entry = Entry(200, (), b"", stored_at=100.0, ttl=30.0)
    assert entry.expires_at() == 130.0
    assert entry.age(112.5) == 12.5
    assert entry.age(90.0) == 0.0  # a clock behind the writer's never gives a negative Age


def realistic(n: int, body_size: int) -> Entry:
    """An entry as the proxy stores one: shared header names, values and body of its own."""
    return Entry(
        200,
        (
            ("Content-Type", f"application/json; charset=utf-{n % 9}"),
            ("ETag", f'"{n:016x}"'),
            ("Date", f"Fri, 27 Nov 2026 14:{n % 60:02d}:07 GMT"),
            ("Cache-Control", f"max-age={60 + n % 7}"),
            ("X-Origin-Shard", f"shard-{n % 16}"),
        ),
        b"%d" % n + b" " * body_size,
        1.7e9 + n,
        60.0 + n,
    )


@pytest.mark.parametrize("body_size", [0, 1024, 100_000])
def test_size_is_the_memory_an_entry_takes(body_size: int) -> None:
    # tracemalloc sees each object at its requested size; size() adds what the allocator rounds
    # up (up to 15 bytes an object, a dozen objects an entry), so it may be that much above.
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = [realistic(n, body_size) for n in range(200)]
        traced = tracemalloc.get_traced_memory()[0] - before - sys.getsizeof(kept)
    finally:
        tracemalloc.stop()
    counted = sum(entry.size() for entry in kept)
    assert traced <= counted <= traced + 16 * 14 * len(kept)


def test_decoded_entries_share_their_header_names() -> None:
    first = decode(encode(realistic(1, 10)))
    second = decode(encode(realistic(2, 10)))
    assert all(a is b for (a, _), (b, _) in zip(first.headers, second.headers, strict=True))
    assert first.size() == realistic(1, 10).size()


@pytest.mark.parametrize(
    "entry",
    [
        Entry(0, (), b"", 1.0, 1.0),
        Entry(600, (), b"", 1.0, 1.0),
        Entry(200, (), b"", float("nan"), 1.0),
        Entry(200, (), b"", 1.0, float("inf")),
        Entry(200, (), b"", 1.0, -1.0),
        Entry(200, (), b"", 1.0, 1.0, fetch_seconds=float("inf")),
        Entry(200, (), b"", 1.0, 1.0, fetch_seconds=-1.0),
    ],
    ids=[
        "status-0",
        "status-600",
        "nan-stored-at",
        "infinite-ttl",
        "negative-ttl",
        "infinite-fetch",
        "negative-fetch",
    ],
)
def test_well_formed_envelopes_with_impossible_values_are_refused(entry: Entry) -> None:
    # Written by something else (or a bug): read as a miss, never served with a NaN freshness
    # or a status aiohttp cannot send.
    with pytest.raises(CorruptEntry):
        decode(encode(entry))


def test_the_fetch_time_travels_only_when_measured() -> None:
    # An entry without one is byte for byte what earlier versions wrote and read.
    plain = Entry(200, (), b"x", 1.0, 1.0)
    timed = Entry(200, (), b"x", 1.0, 1.0, fetch_seconds=0.25)
    assert len(encode(timed)) == len(encode(plain)) + 8
    assert encode(plain)[3] == 0
    assert decode(encode(timed)).fetch_seconds == 0.25


def test_a_fetch_time_cut_short_is_refused() -> None:
    data = encode(Entry(200, (), b"", 1.0, 1.0, fetch_seconds=0.25))
    with pytest.raises(CorruptEntry, match="fetch time"):
        decode(data[:30])


def test_stale_limits_that_are_not_durations_are_corrupt() -> None:
    data = bytearray(encode(Entry(200, (), b"", 1.0, 30.0, stale_limits=(5.0, 60.0))))
    data[28:36] = struct.pack(">d", float("nan"))
    with pytest.raises(CorruptEntry, match="stale limits"):
        decode(bytes(data))
