"""Fuzzing the parsers that take bytes or text from outside: what each may raise, and nothing else.

    config text   -> proxy.config.parse_settings -> Settings | ConfigError
    request target -> normalize_path -> Router.match -> key_for / variant_for / tags_for
                                     -> a key | BadPath
    stored bytes  -> cache.entry.decode / cache.write_behind.records.load -> Entry / QueuedWrite | CorruptEntry

Bounded (a few hundred examples per property, no deadline) so the file runs in seconds.
"""

from __future__ import annotations

import re
import string
import struct
import tempfile
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy
from pydantic import BaseModel

from cache.entry import Entry, decode, encode
from cache.errors import CorruptEntry
from cache.write_behind.records import QueuedWrite, dump, load
from proxy.config import ConfigError, load_settings, parse_settings
from proxy.paths import BadPath, normalize_path, sorted_query
from proxy.routes import Route, Router
from proxy.settings import Settings

fuzz = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# -- a) the config loader ------------------------------------------------------------------------

SCALARS = [
    *[
        "30s",
        "250ms",
        "10m",
        "1h",
        "0",
        "-1s",
        "1e400",
        "10MiB",
        "1GiB",
        "127.0.0.1:8080",
        "[::1]:99999",
        ":80",
    ],
    *[
        "http://127.0.0.1:9000",
        "https://x/y?z=1",
        "ftp://x",
        "http://[::1",
        "redis://127.0.0.1:6379/0",
    ],
    *[
        "memory://",
        "rediss://:pw@h:1/2",
        "redis://x:99999",
        "/users/{id}",
        "/a/{id}/{id}",
        "/{",
        "users:{id}",
    ],
    *[
        "{id!r}",
        "{0}",
        "{}",
        "{id.x}",
        "{nope}",
        "cache-aside",
        "write-behind",
        "write-through",
        "bypass",
        "cluster",
    ],
    *[
        "local",
        "Accept",
        "Set-Cookie",
        "Authorization",
        "Connection",
        "${HOME}",
        "${MISSING}",
        "${SET:-5s}",
    ],
    *["$${X}", "${"],
    "12 parsecs",
    "not a header",
    "",
]
scalars = st.one_of(
    st.sampled_from(SCALARS),
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**20),
    st.floats(),
    st.text(max_size=16),
)
values = st.one_of(scalars, st.lists(scalars, max_size=3))


def _model(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    """The settings model a field holds, and whether it holds a list of them."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    if typing.get_origin(annotation) is tuple:
        args = typing.get_args(annotation)
        if args and isinstance(args[0], type) and issubclass(args[0], BaseModel):
            return args[0], True
    return None, False


def mappings(model: type[BaseModel], depth: int = 0) -> st.SearchStrategy[dict[str, Any]]:
    """Dicts of ``model``'s keys (and unknown ones), each with a plausible or random value."""

    @st.composite
    def build(draw: st.DrawFn) -> dict[str, Any]:
        known = list(model.model_fields)
        names = draw(st.lists(st.sampled_from([*known, "bogus", known[0].upper()]), unique=True))
        out: dict[str, Any] = {}
        for name in names:
            field = model.model_fields.get(name)
            nested, many = _model(field.annotation) if field is not None else (None, False)
            if nested is not None and depth < 3:
                inner = mappings(nested, depth + 1)
                out[name] = draw(st.one_of(st.lists(inner, max_size=3), values) if many else inner)
            else:
                out[name] = draw(values)
        return out

    return build()


@st.composite
def config_documents(draw: st.DrawFn) -> dict[str, Any]:
    doc = draw(mappings(Settings))
    if draw(st.booleans()):
        doc.setdefault("upstream", {"url": "http://127.0.0.1:9000"})
    return doc


def config_texts() -> st.SearchStrategy[str]:
    dumped = config_documents().map(lambda doc: yaml.safe_dump(doc, allow_unicode=True))
    mutated = st.tuples(dumped, st.integers(0, 400), st.text(max_size=4)).map(
        lambda t: t[0][: t[1]] + t[2] + t[0][t[1] :]
    )
    truncated = st.tuples(dumped, st.integers(0, 400)).map(lambda t: t[0][: t[1]])
    yamlish = st.text(st.sampled_from(":-[]{}?&*!|>'\"#%@`,\n\t ab0$<"), max_size=60)
    return st.one_of(dumped, mutated, truncated, yamlish, st.text(max_size=80))


def assert_settings_or_config_error(text: str) -> None:
    try:
        loaded = parse_settings(text, env={"HOME": "/root", "SET": "1s"})
    except ConfigError as exc:
        problems = exc.problems
    else:
        assert isinstance(loaded, Settings)
        return
    assert problems
    assert all(problems)


@fuzz
@given(config_texts())
def test_any_config_text_loads_or_is_a_config_error(text: str) -> None:
    assert_settings_or_config_error(text)


# Found by the fuzzing above; each is the smallest text that escapes as another exception.
# [a] a mapping key that is a list or a mapping: _construct_mapping's duplicate check hashes it
#     (TypeError: unhashable type: 'list') before PyYAML's own check could say "unhashable key".
# [b] an alias that refers to its own node: _expand recurses without end (RecursionError).
# [c] nesting deeper than Python's recursion limit: PyYAML's composer (RecursionError).
CONFIG_CRASHERS = {
    "list key": "{[a]: 1}",
    "mapping key": "? {a: 1}\n: 1\n",
    "self-referencing alias": "routes: &r [*r]\n",
    "deep nesting": "a: " + "[" * 1000 + "]" * 1000 + "\n",
}


@pytest.mark.parametrize("name", sorted(CONFIG_CRASHERS))
def test_hostile_yaml_is_a_config_error(name: str) -> None:
    assert_settings_or_config_error(CONFIG_CRASHERS[name])


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=200))
def test_any_config_file_loads_or_is_a_config_error(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "cachecar.yaml"
        path.write_bytes(data)
        try:
            load_settings(path, env={})
        except ConfigError as exc:
            problems = exc.problems
        else:
            return
    assert problems
    assert all(problems)


# -- b) request targets, routes and keys ---------------------------------------------------------

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "config" / "cachecar.yaml"
DEFAULT_ROUTER = Router.from_settings(
    parse_settings(DEFAULT_CONFIG.read_text(encoding="utf-8"), env={})
)
# Templates with separators, as users write them (orders:{user}:{order}).
SEPARATED_ROUTER = Router.from_settings(
    Settings.model_validate(
        {
            "upstream": {"url": "http://127.0.0.1:9000"},
            "routes": [
                {"path": "/users/{id}", "key": "users:{id}"},
                {"path": "/users/{id}/posts", "key": "users:{id}:posts"},
                {"path": "/users/{user}/orders/{order}", "key": "orders:{user}:{order}"},
                {"path": "/users/{id}/posts/{post}", "key": "users:{id}"},
                {"path": "/products"},
                {"path": "/files/{a}/{b}"},
            ],
        }
    )
)
ROUTERS = {"default config": DEFAULT_ROUTER, "separated templates": SEPARATED_ROUTER}

segment_pieces = st.sampled_from(
    [
        "users",
        "products",
        "carts",
        "files",
        "posts",
        "orders",
        "1",
        "2",
        "a",
        ":",
        "-",
        ";",
        "=",
        "@",
        ".",
        "..",
        "%2e",
        "%2F",
        "%5c",
        "\\\\",
        "%00",
        "%25",
        "%3A",
        "%3a",
        "%31",
        "é",
        "|",
        "#",
        "?",
        "{",
        "}",
        "%zz",
        "%",
        "*",
        "users:1",
    ]
)
segments = st.lists(segment_pieces, min_size=0, max_size=3).map("".join)
paths = st.lists(segments, min_size=1, max_size=5).map(lambda parts: "/" + "/".join(parts))
queries = st.one_of(st.just(""), st.text(st.sampled_from("ab=&1%;"), max_size=8))
targets = st.one_of(
    st.tuples(paths, queries).map(lambda t: f"{t[0]}?{t[1]}" if t[1] else t[0]),
    st.text(max_size=40).map(lambda text: "/" + text),
)
header_values = st.lists(st.text(max_size=10), max_size=2)


def request_headers(accept: list[str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict([("Accept", value) for value in accept]))


Resolved = tuple[Route, dict[str, str], str, str]


def resolve(router: Router, target: str) -> Resolved | None:
    """What the handler does with a target: normalized path, route, params; None if refused."""
    path, _, query = target.partition("?")
    try:
        path = normalize_path(path)
    except BadPath:
        return None
    found = router.match(path)
    if found is None:
        return None
    route, params = found
    return route, params, path, query


@fuzz
@given(st.sampled_from(sorted(ROUTERS)), targets, header_values)
def test_a_target_is_refused_or_keyed_without_any_other_error(
    router: str, target: str, accept: list[str]
) -> None:
    resolved = resolve(ROUTERS[router], target)
    if resolved is None:
        return
    route, params, path, query = resolved
    key = route.key_for(params, path, query)
    variant = route.variant_for(request_headers(accept), query, params)
    assert isinstance(key, str)
    assert key
    assert variant == "" or re.fullmatch("[0-9a-f]{32}", variant)
    for tag in route.tags_for(params):
        assert isinstance(tag, str)


def identity(path: str, query: str) -> tuple[str, str]:
    """What names a resource's representation, Accept aside: its path and its sorted query."""
    return path, sorted_query(query)


@fuzz
@given(st.lists(targets, min_size=2, max_size=12))
def test_on_the_default_config_distinct_resources_never_share_an_entry(
    batch: list[str],
) -> None:
    seen: dict[tuple[str, str], tuple[str, str]] = {}
    for target in batch:
        resolved = resolve(DEFAULT_ROUTER, target)
        if resolved is None or not resolved[0].cached:
            continue
        route, params, path, query = resolved
        entry = (
            route.key_for(params, path, query),
            route.variant_for(request_headers([]), query, params),
        )
        assert seen.setdefault(entry, identity(path, query)) == identity(path, query), entry


def key_shape(route: Route) -> re.Pattern[str]:
    """The route's key template with each field as a run of characters its literals do not use.

    ``orders:{user}:{order}`` -> ``orders:([^:]+):([^:]+)``: a key read back this way gives back
    the parameters it was rendered from, and cannot be read as another template's key.
    """
    assert route.key is not None
    parsed = list(string.Formatter().parse(route.key.template))
    literals = "".join(literal for literal, _, _, _ in parsed)
    separators = {char for char in literals if not char.isalnum()}
    field = "([^" + re.escape("".join(sorted(separators))) + "]+)" if separators else "(.+)"
    return re.compile(
        "".join(
            re.escape(literal) + (field if name is not None else "")
            for literal, name, _, _ in parsed
        )
    )


@fuzz
@given(st.sampled_from(sorted(ROUTERS)), targets)
# /users/1:posts on /users/{id} renders users:1:posts, the key of /users/1/posts: a request for one
# resource fills (or purges) another's entry.
@example("separated templates", "/users/1:posts")
def test_a_path_parameter_cannot_change_the_shape_of_the_key(router: str, target: str) -> None:
    resolved = resolve(ROUTERS[router], target)
    if resolved is None or resolved[0].key is None:
        return
    route, params, path, query = resolved
    key = route.key_for(params, path, query)
    assert key_shape(route).fullmatch(key), (target, route.name, key)


# -- c) the stored envelopes ---------------------------------------------------------------------

header_text = st.text(max_size=12)  # no lone surrogates: aiohttp's headers never hold them
entries = st.builds(
    Entry,
    status=st.integers(100, 599),
    headers=st.lists(st.tuples(header_text, header_text), max_size=4).map(tuple),
    body=st.binary(max_size=64),
    stored_at=st.floats(allow_nan=False, allow_infinity=False),
    ttl=st.floats(min_value=0, allow_nan=False, allow_infinity=False),
)


@st.composite
def mutated(draw: st.DrawFn, valid: st.SearchStrategy[bytes]) -> bytes:
    """A valid encoding with bit flips, a truncation or an extension."""
    data = bytearray(draw(valid))
    for _ in range(draw(st.integers(0, 4))):
        if data:
            at = draw(st.integers(0, len(data) - 1))
            data[at] ^= 1 << draw(st.integers(0, 7))
    cut = draw(st.one_of(st.none(), st.integers(0, len(data))))
    if cut is not None:
        del data[cut:]
    data += draw(st.binary(max_size=8))
    return bytes(data)


def assert_entry_or_corrupt(data: bytes) -> None:
    try:
        entry = decode(data)
    except CorruptEntry:
        return
    assert isinstance(entry, Entry)
    assert encode(entry) == data  # what decodes is exactly one envelope, read back whole


@fuzz
@given(entries)
def test_an_entry_survives_its_envelope(entry: Entry) -> None:
    assert decode(encode(entry)) == entry


@fuzz
@given(st.one_of(st.binary(max_size=96), mutated(entries.map(encode))))
def test_any_bytes_decode_to_an_entry_or_corrupt_entry(data: bytes) -> None:
    assert_entry_or_corrupt(data)


writes = st.builds(
    QueuedWrite,
    key=st.just("carts:1"),
    method=st.sampled_from(["PUT", "DELETE"]),
    target=st.text(max_size=16),
    entry=entries,
)
_RECORD_HEAD = struct.pack(">2sBHH", b"CW", 1, 1, 0)


@fuzz
@given(st.one_of(st.binary(max_size=96), mutated(writes.map(dump))))
# A record whose method is not UTF-8: _load's .decode() raises UnicodeDecodeError.
@example(_RECORD_HEAD + b"\xff")
def test_any_bytes_load_as_a_queued_write_or_corrupt_entry(data: bytes) -> None:
    try:
        write = load("carts:1", data)
    except CorruptEntry:
        return
    assert isinstance(write, QueuedWrite)


@fuzz
@given(writes)
def test_a_queued_write_survives_its_record(write: QueuedWrite) -> None:
    assert load(write.key, dump(write)) == write
