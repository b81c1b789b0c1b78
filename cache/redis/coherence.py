"""Coherence: every replica's L1 drops a key soon after any replica writes or purges it.

    replica A: write users:1 -> L1 (own) -> L2 replaced -> PUBLISH channel {"r": A, "k": [...]}
    replica B: subscribed on its own connection -> message from A -> drop users:1 from L1
                                                -> message from B itself -> ignored

Redis pub/sub, not RESP3 client tracking: one message per write reaches every replica whatever
keys it holds (tracking would need every L1 key registered with Redis and a connection per
replica per node), it works on Redis Cluster the same way (a PUBLISH reaches the subscribers of
every node), and invalidation traffic is one message per write, never per read: fills are
never announced.

Pub/sub delivers at most once: a replica that is not subscribed misses messages for good. So a
replica trusts its L1 fully only while it is subscribed:

    start, or the subscription lost -> L1 cleared; then, with coherence.degraded_ttl > 0, used
                                       with every entry living at most degraded_ttl (a missed
                                       change is served that long at most); with 0, not used
                                       (reads go to L2 and the origin)
    SUBSCRIBE confirmed             -> L1 cleared once more, then used with full TTLs

The subscription's connection has no retries of its own: a reconnect that redis-py made quietly
would hide the gap in which messages were lost.

Announcements are calls like any other: they go through the process's L2 ``guard``, so while
the breaker is open they are kept (and sent again once Redis takes them) without asking Redis.
The subscription is not a call: a connection that waits as long as nobody writes, with its own
reconnect loop and backoff. It neither asks the breaker nor reports to it. Asking would keep L1
unused until some other call happened to probe; reporting would let a SUBSCRIBE that works
close a breaker that slow calls opened (a connection that works says nothing of whether calls
are answered within ``l2.timeout``), and count the loss of an idle connection as a failed call.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError

from cache.breaker import Guard
from cache.clock import Clock
from cache.errors import TierUnavailable
from cache.observer import CacheObserver, NullObserver
from cache.redis.client import check_client, subscriber_factory
from cache.redis.tier import RedisClient, bounded, close_quietly

logger = logging.getLogger("cachecar.coherence")

# Waits between attempts to subscribe again: from RETRY_FIRST doubling to RETRY_MAX.
RETRY_FIRST = 0.05
RETRY_MAX = 2.0
BATCH = 500  # keys per message
MAX_UNSENT = 100_000  # keys remembered for announcing again; past it, "drop everything"


class Local(Protocol):
    """What coherence does to this replica's caches (``TieredCache`` is one)."""

    async def forget(self, keys: Sequence[str]) -> None:
        """Drop ``keys`` from L1 (another replica changed them)."""

    async def forget_prefix(self, prefix: str) -> int:
        """Drop every key starting with ``prefix`` from L1."""

    async def distrust_l1(self) -> None:
        """Clear L1 and stop trusting it (degraded mode, or unused): messages may be missed
        from now on."""

    async def trust_l1(self) -> None:
        """Clear L1 (it may hold what a missed message dropped) and trust it again."""


def replica_name() -> str:
    """This process among the replicas: host, pid, and a random part (pids are reused)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Coherence:
    """Publishes this replica's changes and applies the others'."""

    def __init__(
        self,
        client: RedisClient,
        listener: Callable[[], Redis],
        channel: str,
        *,
        local: Local,
        clock: Clock,
        timeout: float,
        replica: str | None = None,
        observer: CacheObserver | None = None,
        guard: Guard | None = None,
        degraded_ttl: float = 0.0,
    ) -> None:
        """``client`` publishes; ``listener()`` makes the subscription's client (one per try).
        ``guard``: the process's L2 breaker, for the announcements (counts their failures).
        ``degraded_ttl``: what ``local`` does with L1 meanwhile, for the log."""
        check_client(client, "announcements'")
        self._client = client
        self._listener = listener
        self._channel = channel
        self._local = local
        self._clock = clock
        self._timeout = timeout
        self.replica = replica or replica_name()
        self._observer: CacheObserver = observer or NullObserver()
        self._guard = guard or Guard(observer=self._observer)
        self._task: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()
        self._tried = asyncio.Event()  # the first subscription attempt succeeded or failed
        self._published_ok = True
        # Changes that could not be announced, sent again until Redis takes them: a replica
        # that stays subscribed would otherwise keep serving what they replaced.
        self._unsent_keys: set[str] = set()
        self._unsent_prefixes: set[str] = set()
        self._resending: asyncio.Task[None] | None = None
        self._degraded_note = (
            f"its entries live at most {degraded_ttl:g}s (degraded mode)"
            if degraded_ttl > 0
            else "unused"
        )

    @property
    def subscribed(self) -> bool:
        return self._subscribed.is_set()

    async def wait_subscribed(self) -> None:
        await self._subscribed.wait()

    async def first_attempt(self) -> bool:
        """Wait for the first try to subscribe to end; True when it worked."""
        await self._tried.wait()
        return self.subscribed

    # -- announcing ---------------------------------------------------------------------------

    async def publish(self, keys: Sequence[str]) -> None:
        """Tell the other replicas that ``keys`` changed (never raises; a change that cannot
        be announced now is announced again until it is)."""
        for start in range(0, len(keys), BATCH):
            batch = list(keys[start : start + BATCH])
            if not await self._send({"k": batch}):
                self._keep(keys=list(keys[start:]))
                return

    async def publish_prefix(self, prefix: str) -> None:
        if not await self._send({"p": prefix}):
            self._keep(prefixes=[prefix])

    @property
    def unsent(self) -> int:
        """Changes waiting to be announced again."""
        return len(self._unsent_keys) + len(self._unsent_prefixes)

    def _keep(self, *, keys: Sequence[str] = (), prefixes: Sequence[str] = ()) -> None:
        if len(self._unsent_keys) + len(keys) > MAX_UNSENT:
            # Too many to remember: the others are told to drop everything instead.
            self._unsent_keys.clear()
            self._unsent_prefixes = {""}
        else:
            self._unsent_keys.update(keys)
            self._unsent_prefixes.update(prefixes)
        if self._resending is None or self._resending.done():
            self._resending = asyncio.create_task(self._resend(), name="coherence-resend")

    async def _resend(self) -> None:
        wait = RETRY_FIRST
        while self._unsent_keys or self._unsent_prefixes:
            await asyncio.sleep(wait)
            wait = min(wait * 2, RETRY_MAX)
            prefixes, self._unsent_prefixes = self._unsent_prefixes, set()
            keys, self._unsent_keys = list(self._unsent_keys), set()
            for prefix in prefixes:
                if not await self._send({"p": prefix}):
                    self._unsent_prefixes.add(prefix)
            for start in range(0, len(keys), BATCH):
                if not await self._send({"k": keys[start : start + BATCH]}):
                    self._unsent_keys.update(keys[start:])
                    break

    async def _send(self, change: dict[str, Any]) -> bool:
        message = json.dumps({"r": self.replica, "t": self._clock.time(), **change})
        try:
            async with bounded("publish", self._timeout, self._guard):
                await self._client.publish(self._channel, message)
        except TierUnavailable as exc:  # counted by the guard; CircuitOpen: not even tried
            if self._published_ok:
                logger.warning(
                    "cannot announce changes to other replicas (%s); announcing them again "
                    "until Redis takes them",
                    exc.reason,
                )
            self._published_ok = False
            return False
        if not self._published_ok:
            logger.info("announcing changes to other replicas again")
        self._published_ok = True
        return True

    # -- listening ----------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._listen(), name="coherence")

    async def aclose(self) -> None:
        for task in (self._task, self._resending):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._task = self._resending = None
        await close_quietly(self._client)

    async def _listen(self) -> None:
        wait = RETRY_FIRST
        first = True
        while True:
            client = self._listener()
            pubsub = client.pubsub()
            try:
                await pubsub.subscribe(self._channel)
                async for message in pubsub.listen():
                    if message["type"] == "subscribe":
                        await self._local.trust_l1()
                        self._subscribed.set()
                        self._tried.set()
                        self._observer.coherence_changed(True)
                        wait = RETRY_FIRST
                        (logger.info if first else logger.warning)(
                            "listening for other replicas' changes on %r; L1 in use",
                            self._channel,
                        )
                        first = False
                    elif message["type"] == "message":
                        await self._apply(message["data"])
            except Exception as exc:  # anything but a cancel: listen again, never give up
                if self._subscribed.is_set() or first:
                    logger.warning(
                        "not subscribed to %r (%s: %s): L1 cleared, and %s until subscribed again",
                        self._channel,
                        type(exc).__name__,
                        exc,
                        self._degraded_note,
                    )
                    first = False
            finally:
                self._tried.set()
                if self._subscribed.is_set():
                    self._subscribed.clear()
                    self._observer.coherence_changed(False)
                await self._local.distrust_l1()
                await _close(pubsub, client)
            await asyncio.sleep(wait)
            wait = min(wait * 2, RETRY_MAX)

    async def _apply(self, data: bytes | str) -> None:
        try:
            change = json.loads(data)
            if change.get("r") == self.replica:
                return  # this replica's own change: its caches made it already
            keys, prefix, sent = change.get("k"), change.get("p"), float(change["t"])
        except Exception:  # whatever anyone publishes on the channel, it is only ignored
            logger.warning("ignoring a message on %r that is not cachecar's", self._channel)
            return
        if isinstance(keys, list):
            await self._local.forget([str(key) for key in keys])
        if isinstance(prefix, str):
            await self._local.forget_prefix(prefix)
        self._observer.coherence_lag(max(0.0, self._clock.time() - sent))


async def _close(pubsub: Any, client: Redis) -> None:
    try:
        await asyncio.shield(pubsub.aclose())
        await asyncio.shield(client.aclose())
    except (RedisError, OSError):
        pass


def listener_client(url: str, *, name: str, timeout: float) -> Callable[[], Redis]:
    """Clients for the subscription: named (``CLIENT LIST`` shows whose it is), no retries,
    no read timeout (a subscription waits as long as nobody writes).

    On Redis Cluster each is a plain client of one seed node, the next seed each time: a
    PUBLISH reaches the subscribers of every node. Behind Sentinel, of the master.
    """
    return subscriber_factory(url, name=name, timeout=timeout)


Announce = Callable[[Sequence[str]], Awaitable[None]]
