"""Reading the config file: YAML, ``${VAR}``, and problems worded by key path.

    load_settings(path)
      -> YAML (safe loader; a key given twice is an error)
      -> ${VAR} / ${VAR:-default} replaced inside string values ($${ is a literal ${)
      -> proxy.settings.Settings: unknown keys and wrong types are errors naming the dotted
         key path and the bad value
      -> ConfigError(problems) listing every problem, or Settings

What the keys mean and which values they take is ``proxy.settings``'s business.
"""

from __future__ import annotations

import difflib
import os
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Union

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from proxy.errors import ProxyError
from proxy.settings import Settings
from proxy.units import format_duration


class ConfigError(ProxyError):
    """An invalid config; ``problems`` holds one ``key.path: reason`` line per problem."""

    def __init__(self, source: str, problems: list[str]) -> None:
        super().__init__(f"{source}: " + "; ".join(problems))
        self.source = source
        self.problems = problems


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
    except RecursionError:
        raise ConfigError(source, [_TOO_DEEP]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            source, ["the file must be a mapping of sections (server:, routes:, ...)"]
        )
    problems: list[str] = []
    try:
        data = _expand(data, env, (), problems, [MAX_VALUES])
    except RecursionError:  # an alias that contains itself
        raise ConfigError(source, [_TOO_DEEP]) from None
    except _TooMany:  # aliases of aliases ("billion laughs"): tiny text, huge document
        raise ConfigError(
            source, [f"the document has more than {MAX_VALUES} values once aliases are expanded"]
        ) from None
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


_TOO_DEEP = "the document nests too deeply, or an alias (*name) refers to itself"
MAX_VALUES = 100_000  # a config is a few hundred; aliases could make a few bytes billions


class _TooMany(ProxyError):
    """The budget of values is spent: ``parse_settings`` turns it into a ``ConfigError``."""


_VARIABLE = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand(
    value: Any,
    env: Mapping[str, str],
    path: tuple[str | int, ...],
    problems: list[str],
    budget: list[int],
) -> Any:
    """``value`` with ``${VAR}`` replaced; ``budget[0]``: how many more values it may hold."""
    budget[0] -= 1
    if budget[0] < 0:
        raise _TooMany
    if isinstance(value, dict):
        return {
            key: _expand(item, env, (*path, key), problems, budget) for key, item in value.items()
        }
    if isinstance(value, list):
        return [
            _expand(item, env, (*path, index), problems, budget) for index, item in enumerate(value)
        ]
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
        if key_node.tag == _MERGE:
            continue  # ``<<: *base``: merged by construct_mapping, its keys may be overridden
        key = loader.construct_object(key_node)
        try:
            hash(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                "a key must be a plain value, not a list or mapping",
                key_node.start_mark,
            ) from None
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} appears twice in one mapping", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node)


_MERGE = "tag:yaml.org,2002:merge"
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
        message = error["msg"].removeprefix("Value error, ")
        # A check across sections (at the top level) names its own key path.
        return f"{path}: {message}" if loc else message
    if kind == "enum":
        return f"{path}: {value!r} is not one of {ctx.get('expected')}"
    if kind in {"greater_than_equal", "greater_than"}:
        bound = ctx.get("ge", ctx.get("gt"))
        relation = "at least" if kind == "greater_than_equal" else "more than"
        return f"{path}: {value!r} must be {relation} {bound}"
    if kind in {"less_than_equal", "less_than"}:
        bound = ctx.get("le", ctx.get("lt"))
        relation = "at most" if kind == "less_than_equal" else "less than"
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
