"""The one YAML file: read, expand ``${VAR}``, validate into immutable settings.

    load_settings(path)
      -> YAML (safe loader; a key given twice is an error)
      -> ${VAR} / ${VAR:-default} replaced inside string values ($${ is a literal ${)
      -> validated models: unknown keys and wrong types are errors naming the dotted key path and
         the bad value; durations and sizes become seconds and bytes here, once
      -> ConfigError(problems) listing every problem, or Settings

Keys of the documented contract that this version does not implement yet are refused by name
rather than accepted and ignored: a config must never look as if it did something it does not.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Union

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_core import ErrorDetails
from yarl import URL

from proxy.headers import CREDENTIALS, HOP_BY_HOP
from proxy.routes import KeyTemplate, Mode, PathTemplate, TemplateError
from proxy.units import format_duration, format_size, parse_duration, parse_size


class ConfigError(Exception):
    """An invalid config; ``problems`` holds one ``key.path: reason`` line per problem."""

    def __init__(self, source: str, problems: list[str]) -> None:
        super().__init__(f"{source}: " + "; ".join(problems))
        self.source = source
        self.problems = problems


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


def _not_yet(value: object) -> object:
    raise ValueError("is in the documented contract but not implemented in this version yet")


Duration = Annotated[float, BeforeValidator(parse_duration), PlainSerializer(format_duration)]
PositiveDuration = Annotated[Duration, Field(gt=0)]
Size = Annotated[int, BeforeValidator(parse_size), PlainSerializer(format_size)]
AddressField = Annotated[Address, BeforeValidator(_parse_address), PlainSerializer(str)]
HeaderName = Annotated[str, AfterValidator(_check_header_name)]
NotYet = Annotated[Any, AfterValidator(_not_yet), Field(default=None, exclude=True)]


# -- the models ----------------------------------------------------------------------------------


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerSettings(_Section):
    listen: AddressField = Address("127.0.0.1", 8080)
    workers: int = Field(1, ge=1)
    max_body: Size = 10 << 20
    shutdown_grace: Duration = 10.0

    @field_validator("workers")
    @classmethod
    def _one_worker(cls, value: int) -> int:
        if value != 1:
            raise ValueError(f"{value} workers: only 1 is implemented in this version yet")
        return value


class AdminSettings(_Section):
    listen: AddressField = Address("127.0.0.1", 8081)
    token: str = ""


class UpstreamSettings(_Section):
    url: str
    timeout: PositiveDuration = 5.0
    max_connections: int = Field(100, ge=1)
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
    ttl: Duration = 30.0


class BreakerSettings(_Section):
    failures: int = Field(5, ge=1)
    reset_after: PositiveDuration = 10.0


class L2Settings(_Section):
    url: str | None = None
    ttl: Duration = 600.0
    key_prefix: str = "cachecar:"
    timeout: PositiveDuration = 0.05
    breaker: BreakerSettings = BreakerSettings()

    @field_validator("url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        scheme = value.partition("://")[0] if "://" in value else ""
        if scheme in {"redis+cluster", "redis+sentinel"}:
            raise ValueError(f"{scheme}:// is not implemented in this version yet")
        if scheme not in {"memory", "redis", "rediss", "unix"}:
            raise ValueError(
                f"{value!r} is not a Redis URL (use memory://, redis://host:port/db, "
                "rediss:// or unix://)"
            )
        return value


class RouteTTL(_Section):
    l1: Duration | None = None
    l2: Duration | None = None


class RouteSettings(_Section):
    path: str
    mode: Mode = Mode.CACHE_ASIDE
    key: str | None = None
    ttl: RouteTTL = RouteTTL()
    negative_ttl: Duration = 0.0
    vary: tuple[HeaderName, ...] = ()
    forward_headers: tuple[HeaderName, ...] = ()
    stale_while_revalidate: NotYet
    stale_if_error: NotYet
    tags: NotYet

    @field_validator("path")
    @classmethod
    def _path_template(cls, value: str) -> str:
        try:
            PathTemplate.compile(value)
        except TemplateError as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("mode")
    @classmethod
    def _implemented_mode(cls, value: Mode) -> Mode:
        if value in {Mode.WRITE_THROUGH, Mode.WRITE_BEHIND}:
            raise ValueError(
                f"{value.value!r} is not implemented in this version yet "
                "(use cache-aside or bypass)"
            )
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


class Settings(_Section):
    server: ServerSettings = ServerSettings()
    admin: AdminSettings = AdminSettings()
    upstream: UpstreamSettings
    l1: L1Settings = L1Settings()
    l2: L2Settings = L2Settings()
    routes: tuple[RouteSettings, ...] = ()
    coherence: NotYet
    write_behind: NotYet

    def route_ttls(self, route: RouteSettings) -> tuple[float, float]:
        """A route's effective (L1, L2) TTLs: its own, else the tiers'.

        With an L2, the L1 TTL is cut to the L2 one: an L1 entry never outlives its L2 entry.
        """
        l1_ttl = route.ttl.l1 if route.ttl.l1 is not None else self.l1.ttl
        l2_ttl = route.ttl.l2 if route.ttl.l2 is not None else self.l2.ttl
        if self.l2.url is not None:
            l1_ttl = min(l1_ttl, l2_ttl)
        return l1_ttl, l2_ttl


# -- loading -------------------------------------------------------------------------------------


def load_settings(path: str | Path, env: Mapping[str, str] | None = None) -> Settings:
    """The validated settings in ``path``; ``ConfigError`` naming every problem otherwise."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(source, [f"cannot read the file: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError:
        raise ConfigError(source, ["the file is not UTF-8 text"]) from None
    return parse_settings(text, source=source, env=os.environ if env is None else env)


def parse_settings(text: str, *, source: str = "<config>", env: Mapping[str, str]) -> Settings:
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader: plain data, never objects
    except yaml.YAMLError as exc:
        raise ConfigError(source, [_describe_yaml_error(exc)]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            source, ["the file must be a mapping of sections (server:, routes:, ...)"]
        )
    problems: list[str] = []
    data = _expand(data, env, (), problems)
    if problems:
        raise ConfigError(source, problems)
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, [_describe(error) for error in exc.errors()]) from None


def effective_yaml(settings: Settings) -> str:
    """The settings as YAML, every default filled in, the admin token redacted."""
    data = settings.model_dump(mode="json")
    for route, dumped in zip(settings.routes, data["routes"], strict=True):
        l1_ttl, l2_ttl = settings.route_ttls(route)
        dumped["ttl"] = {"l1": format_duration(l1_ttl), "l2": format_duration(l2_ttl)}
    if data["admin"]["token"]:
        data["admin"]["token"] = "<redacted>"
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


_VARIABLE = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand(
    value: Any, env: Mapping[str, str], path: tuple[str | int, ...], problems: list[str]
) -> Any:
    if isinstance(value, dict):
        return {key: _expand(item, env, (*path, key), problems) for key, item in value.items()}
    if isinstance(value, list):
        return [_expand(item, env, (*path, index), problems) for index, item in enumerate(value)]
    if not isinstance(value, str) or "$" not in value:
        return value

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name is None:
            return "${"
        if name in env:
            return env[name]
        if default is not None:
            return default
        problems.append(
            f"{_dotted(path)}: environment variable {name} is not set "
            f"(set it, or give a default: ${{{name}:-default}})"
        )
        return ""

    return _VARIABLE.sub(substitute, value)


class _StrictLoader(yaml.SafeLoader):
    """The safe loader, refusing a key given twice in one mapping (YAML keeps the last)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _value in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} appears twice in one mapping", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _describe_yaml_error(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    if mark is not None:
        return f"line {mark.line + 1}, column {mark.column + 1}: {problem} (not valid YAML)"
    return f"not valid YAML: {problem}"


def _dotted(loc: tuple[str | int, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


_TYPE_NAMES = {
    "int": "a whole number",
    "float": "a number",
    "bool": "true or false",
    "string": "a string",
    "dict": "a mapping of keys",
    "model": "a mapping of keys",
    "model_attributes": "a mapping of keys",
    "tuple": "a list",
    "list": "a list",
}


def _describe(error: ErrorDetails) -> str:
    loc = tuple(error["loc"])
    path = _dotted(loc)
    kind = error["type"]
    value = error.get("input")
    ctx = error.get("ctx") or {}
    if kind == "extra_forbidden":
        known = _fields_at(loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(known)}"
        return f"{path}: unknown key ({hint})"
    if kind == "missing":
        return f"{path}: required"
    if kind == "value_error":
        return f"{path}: " + error["msg"].removeprefix("Value error, ")
    if kind == "enum":
        return f"{path}: {value!r} is not one of {ctx.get('expected')}"
    if kind in {"greater_than_equal", "greater_than"}:
        bound = ctx.get("ge", ctx.get("gt"))
        relation = "at least" if kind == "greater_than_equal" else "more than"
        return f"{path}: {value!r} must be {relation} {bound}"
    base = kind.split("_")[0] if not kind.startswith("model_attributes") else "model_attributes"
    if base in _TYPE_NAMES:
        return f"{path}: expected {_TYPE_NAMES[base]}, got {value!r}"
    return f"{path}: {error['msg']} (got {value!r})"


def _fields_at(loc: tuple[str | int, ...]) -> list[str]:
    """The keys allowed at ``loc``, for an unknown key's suggestion."""
    model: type[BaseModel] | None = Settings
    for part in loc:
        if model is None:
            return []
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        model = _model_in(field.annotation) if field is not None else None
    if model is None:
        return []
    return [name for name, field in model.model_fields.items() if not field.exclude]


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin in {tuple, list, Union, types.UnionType, Annotated}:
        for arg in typing.get_args(annotation):
            found = _model_in(arg)
            if found is not None:
                return found
    return None
