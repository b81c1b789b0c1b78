"""A cached response and the binary envelope it is stored in.

The envelope is a small, versioned, length-checked format: never pickle, so a Redis shared across
versions or services cannot make a replica run code, and bytes that are not ours decode to a clean
``CorruptEntry`` (the tiered cache turns that into a miss).

    offset  size  field
    0       2     magic  b"CC"
    2       1     version (1)
    3       1     flags (bit 0: a fetch time follows the head; bit 1: must revalidate;
                         bit 2: the origin's stale limits follow; other bits reserved)
    4       2     status
    6       8     stored_at  (float64, wall-clock seconds)
    14      8     ttl        (float64, seconds fresh after stored_at)
    22      2     header count
    24      4     body length
    28      8     fetch_seconds (float64), only when flags bit 0 is set
    ...     16    stale_limits (2 float64: while-revalidate, if-error; inf: not said), only
                  when flags bit 2 is set
    ...     ...   per header: name length (u16), value length (u16), name, value (UTF-8)
    ...     ...   body

All integers are big-endian. ``fetch_seconds`` is how long the origin took to produce the entry:
what probabilistic early refresh (``cache.stale``) weighs the time left against. Readers that
predate the flag see an unknown flag and treat the entry as a miss, never as something else.
"""

from __future__ import annotations

import math
import struct
import sys
from dataclasses import dataclass

from cache.errors import CorruptEntry

MAGIC = b"CC"
VERSION = 1

_HEAD = struct.Struct(">2sBBHddHI")
_FIELD = struct.Struct(">HH")
_FETCH = struct.Struct(">d")
_LIMITS = struct.Struct(">dd")
_HAS_FETCH = 0x01
_MUST_REVALIDATE = 0x02
_HAS_LIMITS = 0x04
_MAX_FIELD = 0xFFFF

Headers = tuple[tuple[str, str], ...]


def allocated(size: int) -> int:
    """What the allocator really spends on an object ``sys.getsizeof`` puts at ``size`` bytes.

    pymalloc serves requests up to 512 bytes from 16-byte size classes; larger ones go to glibc's
    malloc, which adds an 8-byte chunk header and rounds to 16. (Its pools' and arenas' own
    headers, and the page rounding of blocks it maps on their own, add well under 1 %.)
    """
    return (size + 15) & ~15 if size <= 512 else (size + 23) & ~15


@dataclass(frozen=True, slots=True)
class Entry:
    """One stored response: what the origin answered and when."""

    status: int
    headers: Headers
    body: bytes
    stored_at: float
    ttl: float
    fetch_seconds: float = 0.0  # how long the origin took to produce it (0: not measured)
    must_revalidate: bool = False  # never served once stale (the origin said so)
    # The origin's own stale-while-revalidate and stale-if-error (seconds; inf: it said
    # nothing of one), which narrow a route's windows (``cache.stale``); None: it said neither.
    stale_limits: tuple[float, float] | None = None

    def expires_at(self) -> float:
        """Wall-clock second after which the entry is no longer fresh."""
        return self.stored_at + self.ttl

    def age(self, now: float) -> float:
        """Seconds since the origin produced this response (never negative)."""
        return max(0.0, now - self.stored_at)

    def size(self) -> int:
        """Bytes this entry takes in this process: the object, its body, its header table and
        values, its numbers; what L1 counts against ``l1.max_bytes`` (computed when stored).

        Header names are not counted: every path that builds entries shares them between entries
        (aiohttp's parser hands out one object per name, ``decode`` interns them, the proxy's
        own entries use literals), so one more entry costs only a pointer to each.
        """
        headers = self.headers
        cost = (
            _ENTRY + _FLOAT * (3 if self.fetch_seconds else 2) + allocated(sys.getsizeof(self.body))
        )
        if self.stale_limits is not None:
            cost += _LIMITS_COST
        if not -5 <= self.status <= 256:  # CPython shares the objects of the small ints
            cost += _INT
        if headers:
            cost += allocated(sys.getsizeof(headers)) + _PAIR * len(headers)
            for _, value in headers:
                cost += allocated(sys.getsizeof(value))
        return cost


# The fixed parts of ``Entry.size``, taken from this interpreter's own objects so that another
# CPython version counts its own sizes (sys.getsizeof includes the garbage collector's header).
_ENTRY = allocated(sys.getsizeof(Entry(200, (), b"", 0.0, 0.0)))
_FLOAT = allocated(sys.getsizeof(0.5))  # stored_at, ttl, and fetch_seconds when measured
_INT = allocated(sys.getsizeof(1 << 20))
_PAIR = allocated(sys.getsizeof(("", "")))
_LIMITS_COST = allocated(sys.getsizeof((0.5, 0.5))) + 2 * _FLOAT


def encode(entry: Entry) -> bytes:
    """The envelope bytes for ``entry``."""
    parts: list[bytes] = [b""]
    for name, value in entry.headers:
        raw_name = name.encode("utf-8", "surrogateescape")
        raw_value = value.encode("utf-8", "surrogateescape")
        if len(raw_name) > _MAX_FIELD or len(raw_value) > _MAX_FIELD:
            raise ValueError(f"header {name!r} is longer than {_MAX_FIELD} bytes")
        parts.append(_FIELD.pack(len(raw_name), len(raw_value)))
        parts.append(raw_name)
        parts.append(raw_value)
    head = _HEAD.pack(
        MAGIC,
        VERSION,
        (_HAS_FETCH if entry.fetch_seconds else 0)
        | (_MUST_REVALIDATE if entry.must_revalidate else 0)
        | (_HAS_LIMITS if entry.stale_limits is not None else 0),
        entry.status,
        entry.stored_at,
        entry.ttl,
        len(entry.headers),
        len(entry.body),
    )
    if entry.fetch_seconds:
        head += _FETCH.pack(entry.fetch_seconds)
    if entry.stale_limits is not None:
        head += _LIMITS.pack(*entry.stale_limits)
    parts[0] = head
    parts.append(entry.body)
    return b"".join(parts)


def decode(data: bytes) -> Entry:
    """The entry in ``data``; ``CorruptEntry`` if the bytes are not a valid envelope."""
    if len(data) < _HEAD.size:
        raise CorruptEntry(f"{len(data)} bytes is shorter than an envelope header")
    magic, version, flags, status, stored_at, ttl, count, body_len = _HEAD.unpack_from(data)
    if magic != MAGIC:
        raise CorruptEntry(f"not an entry envelope (magic {magic!r})")
    if version != VERSION:
        raise CorruptEntry(f"envelope version {version} is not supported (this build reads 1)")
    if flags & ~(_HAS_FETCH | _MUST_REVALIDATE | _HAS_LIMITS):
        raise CorruptEntry(f"unknown envelope flags {flags:#x}")
    if not 100 <= status <= 599:
        raise CorruptEntry(f"status {status} is not an HTTP status")
    if not (math.isfinite(stored_at) and math.isfinite(ttl)) or ttl < 0:
        raise CorruptEntry(f"stored_at {stored_at} / ttl {ttl} are not times")
    offset = _HEAD.size
    fetch_seconds = 0.0
    if flags & _HAS_FETCH:
        if len(data) < offset + _FETCH.size:
            raise CorruptEntry("the fetch time is truncated")
        (fetch_seconds,) = _FETCH.unpack_from(data, offset)
        offset += _FETCH.size
        if not (math.isfinite(fetch_seconds) and fetch_seconds > 0):
            raise CorruptEntry(f"fetch time {fetch_seconds} is not a duration")
    stale_limits = None
    if flags & _HAS_LIMITS:
        if len(data) < offset + _LIMITS.size:
            raise CorruptEntry("the stale limits are truncated")
        stale_limits = _LIMITS.unpack_from(data, offset)
        offset += _LIMITS.size
        if not all(limit >= 0 for limit in stale_limits):  # NaN is not >= 0
            raise CorruptEntry(f"stale limits {stale_limits} are not durations")
    view = memoryview(data)
    headers: list[tuple[str, str]] = []
    try:
        for _ in range(count):
            name_len, value_len = _FIELD.unpack_from(data, offset)
            offset += _FIELD.size
            name_end = offset + name_len
            value_end = name_end + value_len
            if value_end > len(data):
                raise CorruptEntry("a header runs past the end of the envelope")
            headers.append(
                (
                    # Interned, so that entries read from L2 share their header names as
                    # entries from the origin do (what ``Entry.size`` counts on).
                    sys.intern(str(view[offset:name_end], "utf-8", "surrogateescape")),
                    str(view[name_end:value_end], "utf-8", "surrogateescape"),
                )
            )
            offset = value_end
    except struct.error as exc:
        raise CorruptEntry("the header table is truncated") from exc
    if offset + body_len != len(data):
        raise CorruptEntry(
            f"body length {body_len} does not match the {len(data) - offset} bytes left"
        )
    return Entry(
        status=status,
        headers=tuple(headers),
        body=data[offset:],
        stored_at=stored_at,
        ttl=ttl,
        fetch_seconds=fetch_seconds,
        must_revalidate=bool(flags & _MUST_REVALIDATE),
        stale_limits=stale_limits,
    )
