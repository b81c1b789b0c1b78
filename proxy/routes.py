"""Routes: which paths are cached, under which key, in which mode.

Templates are compiled once, at start (``proxy.templates``). A request then costs one ``match``
per route until the first hit (first match wins).

A key names a resource (what a write or purge drops); a *variant* names one representation of
it: the values of the route's ``vary`` headers, and of those the origin's answers on the route
have named in their own ``Vary`` (``LearnedVary``), and, on a route with a key template, what
the template leaves out (path parameters it does not name, the sorted query string). Variants
are hashed so that a header value (a token, say) never appears in Redis.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from multidict import CIMultiDictProxy

from cache.stale import NEVER, Staleness
from proxy.paths import sorted_query
from proxy.settings import Coalesce, Mode, RouteSettings, Settings
from proxy.templates import KeyTemplate, PathTemplate

# The route name of a path no route matches (in metrics and logs); route paths start with /.
UNMATCHED = "unmatched"


MAX_LEARNED = 8  # request headers one route may learn to vary on from its origin's answers


class LearnedVary:
    """The request headers the origin's answers on one route have named in ``Vary`` (lower
    case, sorted): each is sent to the origin on a miss, and selects a variant when a request
    has it, as if the route's ``vary`` named it. Learned in this process, from the first answer
    that names it.

    A learned header adds to a variant only when the request has it: a request without it
    keeps the variant it had before the route learned it, so learning does not turn the
    route's entries into misses, and replicas that learned different headers still agree on
    the entries of requests without them."""

    __slots__ = ("names",)

    def __init__(self) -> None:
        self.names: tuple[str, ...] = ()

    def learn(self, names: Iterable[str]) -> tuple[str, ...]:
        """Take ``names`` on, up to ``MAX_LEARNED`` in all; the ones it could not take."""
        new = [name for name in dict.fromkeys(names) if name not in self.names]
        room = max(0, MAX_LEARNED - len(self.names))
        self.names = tuple(sorted(self.names + tuple(new[:room])))
        return tuple(new[room:])


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
    revalidate_within: float = 0.0  # seconds past freshness an entry with a validator is kept
    ttl_default: float | None = None  # cap on an answer without freshness information
    learned: LearnedVary = field(default_factory=LearnedVary, compare=False)
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
            revalidate_within=route.revalidate_within,
            ttl_default=route.ttl.default,
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
        self,
        headers: CIMultiDictProxy[str],
        query: str,
        params: Mapping[str, str],
        learned: tuple[str, ...] | None = None,
    ) -> str:
        """Which representation of the key this request asks for; "" when there is one.
        ``learned``: the learned headers to make it of (the route's, now, when not given).

        On a key template, what the template leaves out of the request (path parameters it does
        not name, the query string) selects a variant: two requests for different resources
        never share an entry, and a write of the key still drops them all.
        """
        parts = [f"{name}:{','.join(headers.getall(name, ()))}" for name in self.vary]
        for name in self.learned.names if learned is None else learned:
            values = headers.getall(name, ())
            if values:  # absent: the variant it had before the route learned the header
                parts.append(f"~{name}:{','.join(values)}")
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
