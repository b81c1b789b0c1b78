"""What the write-behind queue holds and answers, and a queued write's bytes in Redis.

    QueuedWrite  a write the origin has not seen yet      dump/load: its record, as stored
    Queued       enqueue's answer                         Claim: a write leased to a flusher
    DeadLetter   a write given up on                      QueueStats: depth, oldest age, dead
    describe     the admin API's view of them

A record is ``>2sBHH`` (magic ``CW``, version, method and target lengths), the method, the
target, then the entry as ``cache.entry.encode`` writes it; anything else is ``CorruptEntry``.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Any, NamedTuple

from cache.entry import Entry, decode, encode
from cache.errors import CorruptEntry


@dataclasses.dataclass(frozen=True, slots=True)
class QueuedWrite:
    """A write the origin has not seen yet.

    ``method`` is what the flusher sends (``PUT`` with ``entry``'s body and Content-Type, or
    ``DELETE``); ``entry`` is also what reads of the key answer until it is flushed (a DELETE's
    entry is a 404 tombstone).
    """

    key: str
    method: str
    target: str  # the path (and query) the client wrote to
    entry: Entry


class Queued(NamedTuple):
    seq: int  # orders the writes of a key, across replicas
    coalesced: bool  # it replaced a write of the key the origin had not been sent yet


@dataclasses.dataclass(frozen=True, slots=True)
class Claim:
    """A write leased to this flusher: send it, then ``ack`` or ``fail`` it with ``seq``."""

    write: QueuedWrite
    seq: int
    tries: int  # failed attempts of the key's pending write before this one
    lease: int  # the lease's end (ms): also its token, which ack and fail must show
    unsettled: bool = False  # the tiers may hold an older value than this write's


@dataclasses.dataclass(frozen=True, slots=True)
class DeadLetter:
    key: str
    method: str
    path: str
    attempts: int
    last_error: str
    failed_at: float


@dataclasses.dataclass(frozen=True, slots=True)
class QueueStats:
    depth: int  # keys with an unflushed write
    oldest_age: float  # seconds since the oldest unflushed write was acknowledged (0: none)
    dead: int  # dead letters


_RECORD = struct.Struct(">2sBHH")  # magic, version, method length, target length
_MAGIC = b"CW"
_VERSION = 1


def dump(write: QueuedWrite) -> bytes:
    method, target = write.method.encode(), write.target.encode()
    return (
        _RECORD.pack(_MAGIC, _VERSION, len(method), len(target))
        + method
        + target
        + encode(write.entry)
    )


def load(key: str, data: bytes) -> QueuedWrite:
    try:
        magic, version, method_len, target_len = _RECORD.unpack_from(data)
    except struct.error as exc:
        raise CorruptEntry("a queued write is truncated") from exc
    if magic != _MAGIC or version != _VERSION:
        raise CorruptEntry(f"not a queued write (magic {magic!r}, version {version})")
    start = _RECORD.size
    try:
        method = data[start : start + method_len].decode()
        target = data[start + method_len : start + method_len + target_len].decode()
    except UnicodeDecodeError as exc:
        raise CorruptEntry(f"a queued write's method or target is not UTF-8: {exc}") from exc
    entry = decode(data[start + method_len + target_len :])
    return QueuedWrite(key, method, target, entry)


def describe(stats: QueueStats, letters: list[DeadLetter]) -> dict[str, Any]:
    """The admin API's view of the queue (every shard's)."""
    return {
        "queue_depth": stats.depth,
        "oldest_pending_age_seconds": round(stats.oldest_age, 3),
        "dead_letter_count": stats.dead,
        "dead_letters": [dataclasses.asdict(letter) for letter in letters],
    }
