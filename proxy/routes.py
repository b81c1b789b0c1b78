"""Routes: which paths are cached, under which key, in which mode.

Templates are compiled once, at start: ``/users/{id}`` becomes a regular expression, and the key
template ``users:{id}`` a format string checked against the path's parameters. A request then
costs one ``match`` per route until the first hit (first match wins).

A key names a resource (what a write or purge drops); a *variant* names one representation of
it: the values of the route's ``vary`` headers and, on a route with a key template, what the
template leaves out (path parameters it does not name, the sorted query string). Variants are
hashed so that a header value (a token, say) never appears in Redis.
"""

from __future__ import annotations

import enum
import hashlib
import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

from multidict import CIMultiDictProxy

from cache.stale import NEVER, Staleness
from proxy.paths import sorted_query

if TYPE_CHECKING:
    from proxy.settings import RouteSettings, Settings

_PARAM = re.compile(r"\{([^{}]*)\}")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


# The route name of a path no route matches (in metrics and logs); route paths start with /.
UNMATCHED = "unmatched"


class Coalesce(enum.StrEnum):
    LOCAL = "local"  # concurrent misses of a key in one process make one origin fetch
    CLUSTER = "cluster"  # ... across every replica too: a lease in Redis (``cache.lease``)


class Mode(enum.StrEnum):
    CACHE_ASIDE = "cache-aside"  # reads cached; writes go to the origin, then drop the key
    WRITE_THROUGH = "write-through"  # reads cached; a written value becomes the cached one
    WRITE_BEHIND = "write-behind"  # writes land in the cache and a durable queue at once
    BYPASS = "bypass"  # proxied, never cached


class TemplateError(ValueError):
    """A path or key template that cannot be compiled."""


@dataclass(frozen=True, slots=True)
class PathTemplate:
    """``/users/{id}``: literal text, and ``{name}`` for one path segment."""

    template: str
    pattern: re.Pattern[str]
    params: tuple[str, ...]

    @classmethod
    def compile(cls, template: str) -> PathTemplate:
        if not template.startswith("/"):
            raise TemplateError(f"{template!r} must start with /")
        leftover = _PARAM.sub("", template)
        if "{" in leftover or "}" in leftover:
            raise TemplateError(f"{template!r} has an unbalanced brace")
        params: list[str] = []
        parts: list[str] = []
        position = 0
        for match in _PARAM.finditer(template):
            name = match.group(1)
            if not _IDENTIFIER.match(name):
                raise TemplateError(f"{{{name}}} in {template!r} is not a parameter name")
            if name in params:
                raise TemplateError(f"{{{name}}} appears twice in {template!r}")
            params.append(name)
            parts.append(re.escape(template[position : match.start()]))
            parts.append(f"(?P<{name}>[^/]+)")
            position = match.end()
        parts.append(re.escape(template[position:]))
        return cls(template, re.compile("".join(parts) + r"\Z"), tuple(params))

    def match(self, path: str) -> dict[str, str] | None:
        found = self.pattern.match(path)
        return found.groupdict() if found is not None else None


@dataclass(frozen=True, slots=True)
class KeyTemplate:
    """``users:{id}``: a format string over the path's parameters.

    A parameter's value never contains the template's separators: every punctuation character
    of the template's literal text (other than the unreserved ``-._~``), and ``%``, is
    percent-encoded in it (``/users/1:posts`` renders ``users:1%3Aposts``), while letters,
    digits and ``-._~`` stay as they are (``users:alice``, so a purge by the logical key finds
    it). Between two parameters the template must have such a separator. So no request can make
    its key look like the key of another resource (``users:{id}:posts`` of ``/users/1/posts``).
    """

    template: str
    fields: frozenset[str]
    escapes: dict[int, str]  # str.translate table for parameter values
    # The common template with one parameter, as (text before, its name, text after): rendered
    # by concatenation, without a format call (keys are rendered on every hit).
    single: tuple[str, str, str] | None = None

    @classmethod
    def compile(cls, template: str, params: Sequence[str]) -> KeyTemplate:
        if not template:
            raise TemplateError("a key template cannot be empty")
        try:
            fields = list(string.Formatter().parse(template))
        except ValueError as exc:
            raise TemplateError(f"{template!r}: {exc}") from None
        escaped = {char for literal, _, _, _ in fields for char in literal if _separates(char)}
        previous_was_field = False
        for literal, name, spec, conversion in fields:
            if name is None:
                continue
            if previous_was_field and not escaped.intersection(literal):
                raise TemplateError(
                    f"{template!r}: put a separator such as ':' or '/' before {{{name}}} "
                    "(letters, digits and -._~ do not separate), so that two requests cannot "
                    "render one key"
                )
            previous_was_field = True
            if name not in params:
                known = ", ".join(f"{{{p}}}" for p in params) or "none"
                raise TemplateError(
                    f"{{{name}}} is not a parameter of the route's path (it has {known})"
                )
            if spec or conversion:
                raise TemplateError(f"{{{name}}} takes no format spec or conversion")
        escapes = {ord(char): _percent(char) for char in escaped | {"%"}}
        names = frozenset(name for _, name, _, _ in fields if name is not None)
        single = None
        if sum(name is not None for _, name, _, _ in fields) == 1:
            # The parser's literal text is the template's with "{{" and "}}" undone; each
            # literal comes with the field that follows it, if any.
            at = next(i for i, (_, name, _, _) in enumerate(fields) if name is not None)
            before = "".join(literal for literal, _, _, _ in fields[: at + 1])
            after = "".join(literal for literal, _, _, _ in fields[at + 1 :])
            single = (before, cast(str, fields[at][1]), after)
        return cls(template, names, escapes, single)

    def render(self, params: Mapping[str, str]) -> str:
        single = self.single
        if single is not None:
            return single[0] + params[single[1]].translate(self.escapes) + single[2]
        return self.template.format_map(
            {name: value.translate(self.escapes) for name, value in params.items()}
        )


def _separates(char: str) -> bool:
    """Whether a character of a template's text separates parameters (and is escaped in them)."""
    return not (char.isalnum() and char.isascii()) and char not in "-._~"


def _percent(char: str) -> str:
    return "".join(f"%{byte:02X}" for byte in char.encode("utf-8", "surrogatepass"))


@dataclass(frozen=True, slots=True)
class Route:
    """One compiled entry of ``routes``."""

    name: str  # the path template: what metrics and logs call the route
    path: PathTemplate
    mode: Mode
    key: KeyTemplate | None
    l1_ttl: float
    l2_ttl: float
    negative_ttl: float
    vary: tuple[str, ...]  # lower-case request header names
    forward_headers: tuple[str, ...]  # lower-case request header names
    unkeyed: tuple[str, ...]  # path parameters the key template leaves out
    tags: tuple[KeyTemplate, ...] = ()
    coalesce: Coalesce = Coalesce.LOCAL
    stale: Staleness = NEVER
    cached: bool = field(init=False)  # mode is not bypass

    @classmethod
    def from_settings(cls, route: RouteSettings, settings: Settings) -> Route:
        path = PathTemplate.compile(route.path)
        key = KeyTemplate.compile(route.key, path.params) if route.key is not None else None
        l1_ttl, l2_ttl = settings.route_ttls(route)
        return cls(
            name=route.path,
            path=path,
            mode=route.mode,
            key=key,
            l1_ttl=l1_ttl,
            l2_ttl=l2_ttl,
            negative_ttl=route.negative_ttl,
            vary=tuple(name.lower() for name in route.vary),
            forward_headers=tuple(name.lower() for name in route.forward_headers),
            unkeyed=tuple(p for p in path.params if key is not None and p not in key.fields),
            tags=tuple(KeyTemplate.compile(tag, path.params) for tag in route.tags),
            coalesce=route.coalesce,
            stale=Staleness(
                route.stale_while_revalidate, route.stale_if_error, route.early_refresh
            ),
        )

    def __post_init__(self) -> None:
        # A field, not a property: the hit path asks on every request.
        object.__setattr__(self, "cached", self.mode is not Mode.BYPASS)

    def tags_for(self, params: Mapping[str, str]) -> tuple[str, ...]:
        """The tags an entry of this route is indexed under, for purge by tag."""
        return tuple(tag.render(params) for tag in self.tags)

    @staticmethod
    def too_long(key: str, tags: Sequence[str], limit: int) -> bool:
        """Whether ``key`` or one of ``tags`` is longer than ``limit`` (``server.max_key_length``):
        such a request is not cached."""
        return len(key) > limit or any(len(tag) > limit for tag in tags)

    def key_for(self, params: Mapping[str, str], path: str, query: str) -> str:
        """The logical key: the template's output, or the path and its sorted query string."""
        if self.key is not None:
            return self.key.render(params)
        query = sorted_query(query)
        return f"{path}?{query}" if query else path

    def variant_for(
        self, headers: CIMultiDictProxy[str], query: str, params: Mapping[str, str]
    ) -> str:
        """Which representation of the key this request asks for; "" when there is one.

        On a key template, what the template leaves out of the request (path parameters it does
        not name, the query string) selects a variant: two requests for different resources
        never share an entry, and a write of the key still drops them all.
        """
        parts = [f"{name}:{','.join(headers.getall(name, ()))}" for name in self.vary]
        parts.extend(f"{{{name}}}={params[name]}" for name in self.unkeyed)
        if self.key is not None and query:
            parts.append("?" + sorted_query(query))
        if not parts:
            return ""
        return hashlib.blake2b("\n".join(parts).encode(), digest_size=16).hexdigest()


class Router:
    def __init__(self, routes: Sequence[Route]) -> None:
        self._routes = tuple(routes)

    @classmethod
    def from_settings(cls, settings: Settings) -> Router:
        return cls([Route.from_settings(route, settings) for route in settings.routes])

    @property
    def routes(self) -> tuple[Route, ...]:
        return self._routes

    def match(self, path: str) -> tuple[Route, dict[str, str]] | None:
        """The first route whose template matches ``path``, with its parameters."""
        for route in self._routes:
            params = route.path.match(path)
            if params is not None:
                return route, params
        return None

    def name_of(self, path: str) -> str:
        """The name of the route ``path`` (normalized) takes, or ``UNMATCHED``."""
        found = self.match(path)
        return found[0].name if found is not None else UNMATCHED
