"""One request model, built by both doors: which route a request takes, the key and the variant
it is cached under. ``proxy.fastpath`` builds it from a head's bytes, ``proxy.handler`` from
aiohttp's request; neither renders a key or a variant another way.

    locate(router, path, query, max_key_length)     (path normalized, or checked canonical)
      -> None                no route matches             -> passed through, route "unmatched"
      -> Route               a route with ``bypass: true`` -> passed through
      -> CacheRequest        a cached route: route, params, path, query, key, tags,
                             too_long (the key or a tag past ``server.max_key_length``: never
                             cached), variant(headers)

Before a read is located, its headers decide whether the hit path may answer it at all: a
request header of ``proxy.headers.FULL_PATH`` (credentials, Range, validators, ...) sends it to
the full handler, whose ``policy.bypass_reason`` then passes it through, or answers it from the
cache when the route keys on that header.
"""

from __future__ import annotations

from multidict import CIMultiDictProxy

from proxy.routes import Route, Router


class CacheRequest:
    """A request on a cached route, as the cache knows it."""

    __slots__ = ("key", "params", "path", "query", "route", "too_long")

    def __init__(
        self, route: Route, params: dict[str, str], path: str, query: str, key: str, limit: int
    ) -> None:
        self.route = route
        self.params = params
        self.path = path
        self.query = query
        self.key = key
        self.too_long = len(key) > limit or (
            bool(route.tags) and route.too_long(key, route.tags_for(params), limit)
        )

    @property
    def tags(self) -> tuple[str, ...]:
        """What L2 indexes the key under, for purge by tag."""
        return self.route.tags_for(self.params)

    @property
    def target(self) -> str:
        """The path and query, as the origin is sent them."""
        return f"{self.path}?{self.query}" if self.query else self.path

    @property
    def varies(self) -> bool:
        """Whether the variant depends on more than the key: when it does not, it is ""."""
        route = self.route
        return bool(
            route.vary
            or route.learned.names
            or route.unkeyed
            or (route.key is not None and self.query)
        )

    def variant(self, headers: CIMultiDictProxy[str], keyed: tuple[str, ...] | None = None) -> str:
        """Which representation of the key the request asks for ("" when there is one);
        ``keyed``: the request headers it is made of (the route's, as they are now)."""
        if not self.varies:
            return ""
        return self.route.variant_for(headers, self.query, self.params, keyed)


def locate(
    router: Router, path: str, query: str, max_key_length: int
) -> CacheRequest | Route | None:
    """The route ``path`` takes and, on a cached route, the request as the cache knows it."""
    found = router.match(path)
    if found is None:
        return None
    route, params = found
    if not route.cached:
        return route
    return CacheRequest(
        route, params, path, query, route.key_for(params, path, query), max_key_length
    )
