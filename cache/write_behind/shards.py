"""The queue's shards: which one holds a key, and the names of each shard's Redis keys.

    logical key -> crc32(key) % shards -> shard i -> {prefix}{wb:i}:values, :seqs, :ready, ...

Each shard is a whole queue of its own under its own hash tag (one Redis Cluster slot), so a
script touches one shard, and on a Cluster the shards' slots spread over the masters. A key
always lands in the same shard (crc32 is the same in every process and version, unlike
``hash()``), so its writes are coalesced and ordered in one place, as long as the count stays
the same. Before sharding the queue was one slot, ``{prefix}{wb}:...``:
``cache.write_behind.migration`` drains it into the shards, and the shards of a former count
too.
"""

from __future__ import annotations

import zlib

# Enough for a Cluster's slots to spread over up to about a dozen masters (16 tags over 3
# masters land 4, 5 and 7 on each); an idle flusher asks every shard once per round, so
# thousands would cost idle Redis calls for nothing.
DEFAULT_SHARDS = 16
MAX_SHARDS = 256

NAMES = (
    "seq",
    "values",
    "seqs",
    "ready",
    "since",
    "tries",
    "dead",
    "corpses",
    "unsettled",
    "adopted",
)


def shard_of(key: str, shards: int) -> int:
    """The shard that holds ``key``'s writes: stable across processes, replicas and restarts."""
    return zlib.crc32(key.encode()) % shards


class Layout:
    """The names of one queue's Redis keys, all under one hash tag."""

    def __init__(self, key_prefix: str, tag: str) -> None:
        self.tag = tag
        self._names = {name: f"{key_prefix}{{{tag}}}:{name}" for name in NAMES}

    def __getitem__(self, name: str) -> str:
        return self._names[name]

    def keys(self, *names: str) -> list[str]:
        return [self._names[name] for name in names]


def shard_layouts(key_prefix: str, shards: int) -> list[Layout]:
    if not 1 <= shards <= MAX_SHARDS:
        raise ValueError(f"the queue needs 1 to {MAX_SHARDS} shards, not {shards}")
    return [Layout(key_prefix, f"wb:{i}") for i in range(shards)]


def single_slot(key_prefix: str) -> Layout:
    """The layout of the queue before sharding (its one hash tag ``{wb}``)."""
    return Layout(key_prefix, "wb")
