"""The cache engine: entries, tiers, the tiered read, the breaker. Nothing here knows HTTP."""

from cache.breaker import Breaker, breaker_logger
from cache.clock import Clock, SystemClock
from cache.entry import Entry, decode, encode
from cache.errors import CacheError, CorruptEntry, TierUnavailable
from cache.memory import MemoryTier
from cache.observer import CacheObserver, Eviction, Invalidation, NullObserver
from cache.redis_tier import MEMORY_URL, RedisTier, client_from_url
from cache.tier import Stored, Tier
from cache.tiered import Loaded, Lookup, Source, TieredCache

__all__ = [
    "MEMORY_URL",
    "Breaker",
    "CacheError",
    "CacheObserver",
    "Clock",
    "CorruptEntry",
    "Entry",
    "Eviction",
    "Invalidation",
    "Loaded",
    "Lookup",
    "MemoryTier",
    "NullObserver",
    "RedisTier",
    "Source",
    "Stored",
    "SystemClock",
    "Tier",
    "TierUnavailable",
    "TieredCache",
    "breaker_logger",
    "client_from_url",
    "decode",
    "encode",
]
