"""The settings: immutable, validated models of the one YAML file.

Durations and sizes are numbers here (seconds, bytes), parsed once at load time; templates are
checked here with ``proxy.templates`` and compiled by ``proxy.routes``. ``Mode`` and ``Coalesce``
are the words a user writes in a route. Reading the file (YAML, ``${VAR}``, error wording) is
``proxy.config``'s.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from typing import Annotated

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationInfo,
    field_validator,
    model_validator,
)
from yarl import URL

from cache.redis.client import parse_redis_url
from cache.tier import MAX_VARIANTS
from cache.write_behind.shards import DEFAULT_SHARDS, MAX_SHARDS
from proxy.headers import CREDENTIALS, HOP_BY_HOP
from proxy.templates import KeyTemplate, PathTemplate, TemplateError
from proxy.units import format_duration, format_size, parse_duration, parse_size

# -- the words of a route ------------------------------------------------------------------------


class Coalesce(enum.StrEnum):
    LOCAL = "local"  # concurrent misses of a key in one process make one origin fetch
    CLUSTER = "cluster"  # ... across every replica too: a lease in Redis (``cache.redis.lease``)


class Mode(enum.StrEnum):
    CACHE_ASIDE = "cache-aside"  # reads cached; writes go to the origin, then drop the key
    WRITE_THROUGH = "write-through"  # reads cached; a written value becomes the cached one
    WRITE_BEHIND = "write-behind"  # writes land in the cache and a durable queue at once
    BYPASS = "bypass"  # proxied, never cached


# -- value types ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Address:
    """Where a listener binds."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def _parse_address(value: object) -> Address:
    if isinstance(value, Address):
        return value
    if isinstance(value, str):
        host, sep, port = value.rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
        if sep and host and port.isdigit() and 0 < int(port) < 65536:
            return Address(host, int(port))
    raise ValueError(f"{value!r} is not an address (use host:port, e.g. 127.0.0.1:8080)")


def _check_header_name(value: str) -> str:
    if not re.fullmatch(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+", value):
        raise ValueError(f"{value!r} is not a header name")
    return value


Duration = Annotated[float, BeforeValidator(parse_duration), PlainSerializer(format_duration)]
PositiveDuration = Annotated[Duration, Field(gt=0)]
Size = Annotated[int, BeforeValidator(parse_size), PlainSerializer(format_size)]
AddressField = Annotated[Address, BeforeValidator(_parse_address), PlainSerializer(str)]
HeaderName = Annotated[str, AfterValidator(_check_header_name)]


# -- the models ----------------------------------------------------------------------------------


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


MAX_WORKERS = 64


class ServerSettings(_Section):
    listen: AddressField = Address("127.0.0.1", 8080)
    workers: int = Field(1, ge=1, le=MAX_WORKERS)
    max_body: Size = 10 << 20
    body_timeout: PositiveDuration = 30.0  # the longest pause while a request body arrives
    body_deadline: PositiveDuration = 60.0  # the longest a request body may take in all
    send_timeout: PositiveDuration = 30.0  # the longest a client may leave an answer unread
    idle_timeout: PositiveDuration = 60.0  # a connection without a whole request head: closed
    max_header_size: Size = Field(8 << 10, ge=256, le=1 << 20)  # the request line, each header
    max_headers: int = Field(100, ge=8, le=10_000)
    max_cacheable: Size = Field(8 << 20, ge=1)  # larger answers are streamed through uncached
    max_key_length: int = Field(1024, ge=16, le=64 << 10)  # keys and tags, in characters
    shutdown_grace: Duration = 10.0
    access_log: bool = False  # one JSON line per request on stdout


class AdminSettings(_Section):
    listen: AddressField = Address("127.0.0.1", 8081)
    token: str = ""


class UpstreamSettings(_Section):
    url: str
    timeout: PositiveDuration = 5.0
    max_connections: int = Field(100, ge=1)
    # Under the 5 s after which Node and Apache close an idle connection by default, so cachecar
    # closes it first; a request on one the origin closed anyway is sent again (idempotent only).
    keepalive_timeout: PositiveDuration = 4.0
    health_path: str = "/"

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        url = URL(value)
        if url.scheme not in {"http", "https"} or not url.host:
            raise ValueError(f"{value!r} is not an http:// or https:// URL with a host")
        if url.query_string or url.fragment:
            raise ValueError(f"{value!r}: the origin URL takes no query or fragment")
        return value.rstrip("/")

    @field_validator("health_path")
    @classmethod
    def _absolute_path(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError(f"{value!r} must start with /")
        return value


class L1Settings(_Section):
    max_entries: int = Field(10_000, ge=1)
    max_bytes: Size = Field(64 << 20, ge=1)
    max_variants: int = Field(MAX_VARIANTS, ge=1, le=10_000)
    ttl: Duration = 30.0


class BreakerSettings(_Section):
    failures: int = Field(5, ge=1)
    reset_after: PositiveDuration = 10.0


class L2Settings(_Section):
    url: str | None = None
    ttl: Duration = 600.0
    key_prefix: str = "cachecar:"
    timeout: PositiveDuration = 0.05
    max_variants: int = Field(MAX_VARIANTS, ge=1, le=10_000)
    breaker: BreakerSettings = BreakerSettings()

    @field_validator("url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        if value is not None:
            parse_redis_url(value)  # a ValueError names what is wrong
        return value


class BackoffSettings(_Section):
    initial: PositiveDuration = 0.1
    max: PositiveDuration = 30.0

    @model_validator(mode="after")
    def _ordered(self) -> BackoffSettings:
        if self.initial > self.max:
            raise ValueError(
                f"initial ({format_duration(self.initial)}) is longer than max "
                f"({format_duration(self.max)})"
            )
        return self


class WriteBehindSettings(_Section):
    flush_interval: PositiveDuration = 1.0
    batch_size: int = Field(100, ge=1)
    concurrency: int = Field(16, ge=1)
    max_attempts: int = Field(10, ge=1)
    backoff: BackoffSettings = BackoffSettings()
    max_pending: int = Field(1_000_000, ge=1)
    timeout: PositiveDuration = 1.0
    # The queue's slots: on a Redis Cluster they spread over the masters (see
    # cache.write_behind.shards for the default). A queue laid out already keeps its count,
    # unless reshard (one replica, started while no other runs) moves it to this one.
    shards: int = Field(DEFAULT_SHARDS, ge=1, le=MAX_SHARDS)
    reshard: bool = False


MAX_TAGS = 16  # per route: each is one more Redis set written with every fill


class RouteTTL(_Section):
    l1: Duration | None = None
    l2: Duration | None = None
    # How long an answer without freshness information of its own (no s-maxage, max-age or
    # Expires) is kept, at most; None: as long as the tier TTLs say. 0s: only what the origin
    # says is fresh is kept.
    default: Duration | None = None


class RouteSettings(_Section):
    path: str
    mode: Mode = Mode.CACHE_ASIDE
    key: str | None = None
    ttl: RouteTTL = RouteTTL()
    negative_ttl: Duration = 0.0
    vary: tuple[HeaderName, ...] = ()
    forward_headers: tuple[HeaderName, ...] = ()
    stale_while_revalidate: Duration = 0.0
    stale_if_error: Duration = 0.0
    # How long past its freshness an answer with a validator (ETag, Last-Modified) is kept, to
    # be revalidated with a conditional request instead of fetched whole; 0: never.
    revalidate_within: Duration = 600.0
    early_refresh: float = Field(1.0, ge=0, le=100)  # XFetch's beta; 0: no early refresh
    tags: tuple[str, ...] = ()
    coalesce: Coalesce = Coalesce.LOCAL

    @field_validator("path")
    @classmethod
    def _path_template(cls, value: str) -> str:
        try:
            PathTemplate.compile(value)
        except TemplateError as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("key")
    @classmethod
    def _key_template(cls, value: str | None, info: ValidationInfo) -> str | None:
        path = info.data.get("path")
        if value is None or path is None:
            return value
        try:
            KeyTemplate.compile(value, PathTemplate.compile(path).params)
        except TemplateError as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("tags")
    @classmethod
    def _tag_templates(cls, value: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        path = info.data.get("path")
        if path is None:
            return value
        if len(value) > MAX_TAGS:
            raise ValueError(f"{len(value)} tags: at most {MAX_TAGS} per route")
        for tag in value:
            try:
                KeyTemplate.compile(tag, PathTemplate.compile(path).params)
            except TemplateError as exc:
                raise ValueError(f"{tag!r}: {exc}") from None
        return value

    @field_validator("vary")
    @classmethod
    def _keyable(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for name in value:
            if name.lower() in HOP_BY_HOP:
                raise ValueError(f"{name!r} is a hop-by-hop header and cannot select a variant")
        return value

    @field_validator("forward_headers")
    @classmethod
    def _forwardable(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for name in value:
            if name.lower() in CREDENTIALS:
                raise ValueError(
                    f"{name!r} carries credentials; forwarding it unkeyed would share one "
                    "user's answer with all (name it in vary to cache per user)"
                )
            if name.lower() in HOP_BY_HOP:
                raise ValueError(f"{name!r} is a hop-by-hop header and is never forwarded")
        return value


class CoherenceSettings(_Section):
    enabled: bool = True
    channel: str = "cachecar:invalidate"
    # While not subscribed (Redis down): L1 still serves, each entry living at most this long;
    # 0: L1 unused until subscribed again.
    degraded_ttl: Duration = 1.0

    @field_validator("channel")
    @classmethod
    def _named(cls, value: str) -> str:
        if not value:
            raise ValueError("a channel name cannot be empty")
        return value


class Settings(_Section):
    server: ServerSettings = ServerSettings()
    admin: AdminSettings = AdminSettings()
    upstream: UpstreamSettings
    l1: L1Settings = L1Settings()
    l2: L2Settings = L2Settings()
    routes: tuple[RouteSettings, ...] = ()
    coherence: CoherenceSettings = CoherenceSettings()
    write_behind: WriteBehindSettings = WriteBehindSettings()

    @model_validator(mode="after")
    def _workers_are_replicas(self) -> Settings:
        if self.server.workers > 1:
            url = self.l2.url
            if url is None or url.startswith("memory://"):
                raise ValueError(
                    "server.workers: each worker has an L1 of its own; above 1 they need a shared "
                    "Redis (l2.url) to keep them coherent"
                )
            if not self.coherence.enabled:
                raise ValueError(
                    "server.workers: above 1, coherence.enabled must be true (each worker's L1 "
                    "must hear the others' writes)"
                )
        return self

    @model_validator(mode="after")
    def _redis_for_what_needs_it(self) -> Settings:
        if self.l2.url is None:
            for index, route in enumerate(self.routes):
                if route.tags:
                    raise ValueError(f"routes[{index}].tags: tags are indexed in Redis; set l2.url")
                if route.coalesce is Coalesce.CLUSTER:
                    raise ValueError(
                        f"routes[{index}].coalesce: cluster takes its leases in Redis; set l2.url"
                    )
                if route.mode is Mode.WRITE_BEHIND:
                    raise ValueError(
                        f"routes[{index}].mode: write-behind keeps its queue in Redis; set "
                        "l2.url (memory:// for an in-process queue that does not survive a "
                        "restart)"
                    )
        return self

    def route_ttls(self, route: RouteSettings) -> tuple[float, float]:
        """A route's effective (L1, L2) TTLs: its own, else the tiers'.

        With an L2, the L1 TTL is cut to the L2 one: an L1 entry never outlives its L2 entry.
        """
        l1_ttl = route.ttl.l1 if route.ttl.l1 is not None else self.l1.ttl
        l2_ttl = route.ttl.l2 if route.ttl.l2 is not None else self.l2.ttl
        if self.l2.url is not None:
            l1_ttl = min(l1_ttl, l2_ttl)
        return l1_ttl, l2_ttl
