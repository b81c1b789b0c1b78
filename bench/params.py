"""The side-by-side benchmark's parameters: one ``Params`` per run, from ``FULL`` or ``QUICK``
(``--quick``) and the command line."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Params:
    seconds: float  # each measured run
    connections: int
    warm_keys: int  # (b) and (c)
    zipf_keys: int  # (d)
    zipf_fill: int  # (d): requests before the measured run, to bring every cache to its
    # steady state (with few, every key the measured run reads for the first time is a miss
    # whatever a cache keeps: 236 per 1,000 of a 30,000 after 30,000, more than the policies
    # differ by)
    zipf_requests: int  # (d): requests of the measured run
    fresh_keys: int  # (h): keys after the warm ones that the mix and the misses read once each
    stampede: int  # (e): connections per cold key
    rounds: int  # (e): cold keys per target
    unloaded: float  # seconds of wrk -c1
    write_keys: int  # (f)
    distinct: int  # (f): writes piled up for the flush
    memory: int  # (g): l1.max_bytes
    latency: str  # the origin's
    targets: tuple[str, ...]
    quick: bool
    workloads: tuple[str, ...] = ("hits", "l2", "zipf", "mix", "writes", "memory")


FULL: dict[str, Any] = {
    "seconds": 5.0,
    "connections": 64,
    "warm_keys": 10_000,
    "zipf_keys": 100_000,
    "zipf_fill": 200_000,
    "zipf_requests": 50_000,
    "fresh_keys": 200_000,
    "stampede": 500,
    "rounds": 5,
    "unloaded": 2.0,
    "write_keys": 100,
    "distinct": 20_000,
    "memory": 32 << 20,
}
QUICK: dict[str, Any] = {
    **FULL,
    "seconds": 0.3,
    "connections": 16,
    "warm_keys": 500,
    "zipf_keys": 2_000,
    "zipf_fill": 1_000,
    "zipf_requests": 1_000,
    # Not read twice even at a fast target's rate: a key read again would be a hit in (i).
    "fresh_keys": 20_000,
    "stampede": 50,
    "rounds": 2,
    "unloaded": 0.3,
    "distinct": 300,
    "memory": 2 << 20,
}
