"""L1 at ``max_bytes`` takes about ``max_bytes`` of real memory, renderings included.

Measured with tracemalloc, which is deterministic: every block Python allocates, at the size
asked for. What the allocator rounds that up to (pymalloc's 16-byte classes, malloc's chunk
header) is real memory too and ``MemoryTier`` counts it, so the snapshots are also summed with
the same rounding (``allocated``). Not measured here: the allocator's own pool and arena headers
(under 1 %) and fragmentation, which RSS sees and these cannot.
"""

from __future__ import annotations

import gc
import tracemalloc

import pytest

from cache.entry import Entry, allocated
from cache.memory import MemoryTier
from tests.fakes import FakeClock

MAX_BYTES = 4 << 20
# The bound from the performance issue: L1 within max_bytes + 10 %. The store's bookkeeping is
# counted at its average once L1 is full (cache/memory.py, _STORE_ITEM); its tables, queues,
# expiry heap and ghost swing around that average by about 200 bytes a key, which for these
# entries stays within 7 % at the worst instant, so 10 % leaves a margin and still fails if a part
# is missed (an uncounted rendering alone is 8-25 % of these entries).
BOUND = 1.10
# And L1 must not waste its budget either: counted bytes that are not there.
FLOOR = 0.85
NAMES = ("Content-Type", "ETag", "Date", "Cache-Control", "X-Origin-Shard", "Last-Modified")


def realistic(n: int, body_size: int, headers: int) -> Entry:
    """An entry as the proxy stores one: shared header names, values and body of its own."""
    values = (
        f"application/json; charset=utf-{n % 9}",
        f'"{n:016x}"',
        f"Fri, 27 Nov 2026 14:{n % 60:02d}:07 GMT",
        f"max-age={60 + n % 7}",
        f"shard-{n % 16}",
        f"Thu, 26 Nov 2026 10:{n % 60:02d}:00 GMT",
    )
    body = b'{"id": %d, "name": "item %d"}' % (n, n)
    return Entry(
        200,
        tuple(zip(NAMES[:headers], values[:headers], strict=False)),
        body + b" " * max(0, body_size - len(body)),
        1.7e9 + n,
        60.0 + n % 3,
    )


def head(entry: Entry) -> bytes:
    """What the proxy renders of an entry: its response head, a few hundred bytes."""
    lines = [b"HTTP/1.1 200 OK\r\n"]
    lines.extend(f"{name}: {value}\r\n".encode() for name, value in entry.headers)
    lines.append(b"X-Cache: HIT-L1\r\nCache-Status: cachecar; hit; detail=l1\r\n")
    lines.append(b"Content-Length: %d\r\n" % len(entry.body))
    return b"".join(lines)


def rounded_traced() -> int:
    return sum(allocated(trace.size) for trace in tracemalloc.take_snapshot().traces)


@pytest.mark.parametrize(
    ("body_size", "headers"), [(100, 3), (1024, 6), (100_000, 6)], ids=["small", "1KB", "100KB"]
)
async def test_l1_at_max_bytes_takes_max_bytes(body_size: int, headers: int) -> None:
    probe = MemoryTier(max_entries=1, max_bytes=1 << 30, clock=FakeClock())
    await probe.set("items:0", "", realistic(0, body_size, headers), 600)
    probe.peek_rendered("items:0", "", head)
    fits = MAX_BYTES // probe.bytes
    tier = MemoryTier(max_entries=1 << 30, max_bytes=MAX_BYTES, clock=FakeClock())
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        base_rounded = rounded_traced()
        peak = 0
        # Twice what fits: L1 fills, then evicts as long again (its tables are at their least
        # compact then, and dead heap items pile up between clean-ups).
        for n in range(2 * fits):
            key = f"items:{n}"
            await tier.set(key, "", realistic(n, body_size, headers), 600)
            assert tier.peek_rendered(f"items:{n}", "", head) is not None  # an equal, new key
            peak = max(peak, tracemalloc.get_traced_memory()[0] - base)
        gc.collect()
        held = rounded_traced() - base_rounded
    finally:
        tracemalloc.stop()
    assert tier.bytes <= MAX_BYTES
    # Full: the budget left would not hold one more entry. Not "fits - 1 entries": entries of
    # one shape differ by a size class with the length of a key or value, and which lengths
    # cross a class is the interpreter's (a str is 16 bytes smaller on CPython 3.12 than 3.11).
    assert MAX_BYTES - tier.bytes < 1.02 * tier.bytes / tier.entries
    assert peak <= BOUND * MAX_BYTES
    assert FLOOR * MAX_BYTES <= held <= BOUND * MAX_BYTES
