"""The write-behind queue's gauges, read from Redis when asked for.

The queue lives in Redis and every replica sees all of it, so its depth, the age of its oldest
pending write and its dead letters are not counted here: they are read (``refresh``, before each
scrape or snapshot, bounded by the queue's own timeout), summed over the queue's shards (the
oldest write of them all) in one pipeline. A read that fails keeps the last figures,
sets ``cachecar_write_behind_queue_readable`` to 0, and is logged once per outage.
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Gauge

from cache.errors import TierError
from cache.write_behind.queue import WriteQueue
from cache.write_behind.records import QueueStats

logger = logging.getLogger("cachecar.metrics")


class QueueGauges:
    """The queue's gauges in ``registry``, and the last figures read for ``/admin/stats``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

        def gauge(name: str, documentation: str) -> Gauge:
            return Gauge(name, documentation, registry=registry)

        self._depth = gauge(
            "cachecar_write_behind_queue_depth",
            "Keys with a write not yet at the origin (the shared queue, as every replica sees it).",
        )
        self._age = gauge(
            "cachecar_write_behind_oldest_age_seconds",
            "Seconds since the oldest write not yet at the origin was acknowledged.",
        )
        self._dead_letters = gauge(
            "cachecar_write_behind_dead_letters", "Writes the origin refused for good."
        )
        self.queue: WriteQueue | None = None
        self.stats: QueueStats | None = None  # the last figures read
        self.failing = False  # the last read failed (logged once per outage)
        self._readable: Gauge | None = None  # exported with a write-behind queue only

    def watch(self, queue: WriteQueue | None) -> None:
        """Read the gauges from ``queue`` from now on (None: there is none)."""
        self.queue = queue
        if queue is not None and self._readable is None:
            self._readable = Gauge(
                "cachecar_write_behind_queue_readable",
                "1 when the last read of the write-behind queue's figures succeeded; while 0 "
                "the queue gauges hold the last figures read.",
                registry=self._registry,
            )

    @property
    def available(self) -> bool:
        """Figures were read, and the last read succeeded."""
        return self.stats is not None and not self.failing

    async def refresh(self) -> None:
        """Read the queue's figures from Redis; on failure keep the last ones."""
        if self.queue is None:
            return
        try:
            stats = await self.queue.stats()
        except TierError as exc:
            if not self.failing:
                logger.warning("write-behind queue figures unavailable: %s", exc)
            self.failing = True
            self._set_readable(False)
            return
        if self.failing:
            logger.info("write-behind queue figures available again")
        self.failing = False
        self._set_readable(True)
        self.stats = stats
        self._depth.set(stats.depth)
        self._age.set(stats.oldest_age)
        self._dead_letters.set(stats.dead)

    def _set_readable(self, readable: bool) -> None:
        if self._readable is not None:
            self._readable.set(1 if readable else 0)
