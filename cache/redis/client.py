"""Redis URLs, and the clients they make: every one bounded by a timeout, and retried only once,
on a new connection, after a broken one.

    memory://                                     fakeredis in this process, a server per client
    redis://host:port/db   rediss://...  unix://  one Redis (rediss: TLS)
    redis+cluster://host:port[,host:port...]      Redis Cluster: seed nodes, the rest is found
    rediss+cluster://...                          the same over TLS
    redis+sentinel://host:port[,host:port...]/service[/db]
                                                  the master of ``service``, as the sentinels
                                                  say (asked again on every new connection)

User and password (``redis+cluster://user:secret@host:port``) and query options
(``?ssl_ca_certs=/path/ca.pem``) go to every Redis connection, as redis-py reads them; the
sentinels themselves are asked without credentials.

The subscription of coherence is never a cluster client: a ``PUBLISH`` anywhere in a cluster
reaches the subscribers of every node, so a plain connection to one node hears every replica.
Each new subscription takes the next seed node, so with several seeds it survives the loss of
one. Behind Sentinel it subscribes on the master.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
import socket
from collections.abc import Callable
from importlib.metadata import version
from typing import Any, cast
from urllib.parse import urlsplit

from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.driver_info import DriverInfo
from redis.exceptions import ConnectionError as RedisConnectionError

MEMORY_URL = "memory://"
# What a tier, the write-behind queue and coherence are given.
RedisClient = Redis | RedisCluster


def check_client(client: RedisClient, role: str) -> None:
    """Refuse a client that cannot serve ``role`` (``"L2"``, ``"the queue's"``...): every
    caller of Redis here reads bytes (entries, records, tokens), so the client must not decode
    them to str."""
    if client.get_encoder().decode_responses:
        raise ValueError(f"the {role} client must be built with decode_responses=False")


FORMS = (
    "use memory://, redis://host:port/db, rediss://, unix://, redis+cluster://host:port "
    "or redis+sentinel://host:port/service"
)
CLUSTER_PORT = 6379
SENTINEL_PORT = 26379


class Kind(enum.Enum):
    MEMORY = "memory"  # fakeredis, in this process
    SINGLE = "single"  # one Redis (redis://, rediss://, unix://)
    CLUSTER = "cluster"  # Redis Cluster, from seed nodes
    SENTINEL = "sentinel"  # the master of a Sentinel service


@dataclasses.dataclass(frozen=True, slots=True)
class RedisUrl:
    """A checked Redis URL; ``seeds`` are the cluster's nodes or the sentinels."""

    kind: Kind
    tls: bool = False
    userinfo: str = ""  # "user:password@" as written, or ""
    seeds: tuple[tuple[str, int], ...] = ()
    query: str = ""
    service: str = ""  # Sentinel's name of the master
    db: int = 0

    def node_url(self, host: str, port: int, db: int = 0) -> str:
        """A plain URL for one node, with this URL's credentials and options."""
        scheme = "rediss" if self.tls else "redis"
        where = f"[{host}]" if ":" in host else host
        query = f"?{self.query}" if self.query else ""
        return f"{scheme}://{self.userinfo}{where}:{port}/{db}{query}"


def parse_redis_url(url: str) -> RedisUrl:
    """Check ``url``; a ``ValueError`` says what is wrong with it in the user's words."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError(f"{url!r} is not a Redis URL ({FORMS})")
    if scheme == "memory":
        return RedisUrl(Kind.MEMORY)
    if scheme in {"redis", "rediss", "unix"}:
        _redis_py_reads(url)
        return RedisUrl(Kind.SINGLE, tls=scheme == "rediss")
    if scheme in {"redis+cluster", "rediss+cluster"}:
        parsed = _with_seeds(url, rest, Kind.CLUSTER, CLUSTER_PORT, tls=scheme == "rediss+cluster")
        if parsed.service or parsed.db:
            raise ValueError(f"{url!r}: Redis Cluster has database 0 only; give no path")
        return parsed
    if scheme == "redis+sentinel":
        parsed = _with_seeds(url, rest, Kind.SENTINEL, SENTINEL_PORT, tls=False)
        if not parsed.service:
            raise ValueError(
                f"{url!r}: name the master's service, "
                "as in redis+sentinel://host:26379/mymaster (or /mymaster/0 for a database)"
            )
        return parsed
    raise ValueError(f"{url!r} is not a Redis URL ({FORMS})")


def _with_seeds(url: str, rest: str, kind: Kind, port: int, *, tls: bool) -> RedisUrl:
    where, _, query = rest.partition("?")
    hosts, slash, path = where.partition("/")
    userinfo, at, hosts = hosts.rpartition("@")
    seeds = []
    for part in hosts.split(","):
        try:
            split = urlsplit(f"//{part}")
            host, seed_port = split.hostname, split.port
        except ValueError as exc:
            raise ValueError(f"{url!r}: {part!r} is not host:port ({exc})") from None
        if not host:
            raise ValueError(f"{url!r}: {part!r} is not host:port")
        seeds.append((host, seed_port or port))
    segments = [segment for segment in path.split("/") if segment] if slash else []
    service = segments[0] if kind is Kind.SENTINEL and segments else ""
    numbers = segments[1:] if kind is Kind.SENTINEL else segments
    if len(numbers) > 1 or (numbers and not numbers[0].isdigit()):
        raise ValueError(f"{url!r}: {'/' + '/'.join(numbers)!r} is not a database number")
    parsed = RedisUrl(
        kind,
        tls=tls,
        userinfo=userinfo + at,
        seeds=tuple(seeds),
        query=query,
        service=service,
        db=int(numbers[0]) if numbers else 0,
    )
    _redis_py_reads(parsed.node_url(*seeds[0]))
    return parsed


def _redis_py_reads(url: str) -> None:
    """Refuse what redis-py would refuse when it connects (a bad option value, say)."""
    try:
        parse_url(url)
    except ValueError as exc:
        raise ValueError(f"{url!r}: {exc}") from None


# -- clients -------------------------------------------------------------------------------------


class SentinelClient(Redis):
    """A client of the master that ``sentinels`` name; closing it closes theirs too."""

    sentinels_asked: Sentinel | None = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        try:
            await super().aclose(close_connection_pool)
        finally:
            if self.sentinels_asked is not None:
                await self.sentinels_asked.aclose()


# What each connection tells Redis of its client (CLIENT SETINFO), made once: redis-py otherwise
# looks its own version up in the package metadata for every connection it opens, about a
# millisecond of the event loop each, which a burst that grows the pool pays a hundred times.
_DRIVER = DriverInfo(name="redis-py", lib_version=version("redis"))


def _reconnect_once() -> Retry:
    """One more try, on a new connection, after a connection error; never after a timeout.

    A pooled connection whose server went away (a Redis restart, a failover) fails its next
    call: redis-py does not notice the close before it uses the connection. Without this, every
    idle connection of the pool fails once after a restart, each failure counting towards the
    breaker, and a probe landing on one costs another ``reset_after``. A Redis that is down
    refuses the new connection at once; a slow one is not asked twice (the caller's bound holds
    anyway). A call whose answer was lost to a broken connection may run twice: every call
    cachecar makes is a read, a write of a whole value, or a script whose second run changes
    nothing the first did not (a lease taken twice is seen as another's: waited for, then
    fetched without).
    """
    return Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))


def _no_retries() -> Retry:
    return Retry(NoBackoff(), 0)


def client_from_url(url: str, *, timeout: float) -> RedisClient:
    """A client for ``url`` set up for a bounded tier: no retries, connect and read timeouts.

    ``memory://`` is an in-process Redis (fakeredis): one per call, shared by nobody.
    """
    parsed = parse_redis_url(url)
    if parsed.kind is Kind.MEMORY:
        import fakeredis

        # A server of its own: two apps in one process (tests) must not share a "memory" L2.
        client: Redis = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
        return client
    # The tier bounds each call itself; redis-py retrying underneath would only spend the budget
    # reconnecting to a server that is down: one new connection after a broken one, no more.
    bounded: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": _reconnect_once(),
        "health_check_interval": 30,
        "driver_info": _DRIVER,
    }
    if parsed.kind is Kind.CLUSTER:
        first, *others = parsed.seeds
        return RedisCluster.from_url(
            parsed.node_url(*first),
            startup_nodes=[ClusterNode(host, port) for host, port in others] or None,
            **bounded,
        )
    if parsed.kind is Kind.SENTINEL:
        return _sentinel_master(parsed, timeout, bounded)
    return Redis.from_url(url, **bounded)


def _sentinel_master(parsed: RedisUrl, timeout: float, options: dict[str, Any]) -> SentinelClient:
    """A client of the master; the sentinels are asked within ``timeout``, without retries."""
    # redis-py before 8.2 leaves Sentinel.__init__ unannotated; 8.2 annotates it.
    sentinel = Sentinel(  # type: ignore[no-untyped-call, unused-ignore]
        list(parsed.seeds),
        sentinel_kwargs={
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "retry": _no_retries(),
        },
    )
    # The URL's credentials, database and options; the master's address is the sentinels' say.
    found: dict[str, Any] = dict(parse_url(parsed.node_url(*parsed.seeds[0], db=parsed.db)))
    del found["host"], found["port"]
    client = cast(
        SentinelClient,
        sentinel.master_for(parsed.service, redis_class=SentinelClient, **{**options, **found}),
    )
    client.sentinels_asked = sentinel
    return client


_KEEPALIVE = {
    option: value
    for option, value in (
        (getattr(socket, "TCP_KEEPIDLE", None), 10),
        (getattr(socket, "TCP_KEEPINTVL", None), 5),
        (getattr(socket, "TCP_KEEPCNT", None), 3),
    )
    if option is not None
}


def subscriber_factory(url: str, *, name: str, timeout: float) -> Callable[[], Redis]:
    """Clients for a subscription: named (``CLIENT LIST`` shows whose it is), no retries,
    no read timeout (a subscription waits as long as nobody writes); see the module docstring
    for clusters."""
    parsed = parse_redis_url(url)
    options: dict[str, Any] = {
        "client_name": name,
        "socket_connect_timeout": timeout,
        "socket_keepalive": True,
        # A connection cut without a reset (a dead host, a partition) is noticed in about
        # 10 + 3 x 5 seconds, not the kernel's default two hours: until then the replica
        # trusts an L1 it may no longer be told about.
        "socket_keepalive_options": _KEEPALIVE,
        "retry": _no_retries(),  # a lost subscription is coherence's to handle
        "driver_info": _DRIVER,
    }
    if parsed.kind is Kind.SENTINEL:
        return lambda: _sentinel_master(parsed, timeout, options)
    if parsed.kind is Kind.CLUSTER:
        seeds = itertools.cycle(parsed.seeds)
        return lambda: Redis.from_url(parsed.node_url(*next(seeds)), **options)
    return lambda: Redis.from_url(url, **options)
