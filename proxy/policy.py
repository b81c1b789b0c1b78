"""HTTP caching rules (RFC 9111 as a shared cache applies them), apart from storage.

request  -> bypass_reason: may the cache answer it at all? (credentials, If-Range)
response -> decide: may it be stored, for how long in each tier, may waiters share it?
            (by its cache directives: a targeted field's for cachecar, else Cache-Control's)
hit      -> not_modified: does the client's validator match (304)?
         -> byte_range: which part of the entry does a Range ask for (206, 416)?
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from email.utils import parsedate_to_datetime

from multidict import CIMultiDictProxy

from cache.entry import Entry
from proxy.headers import CREDENTIALS, RANGE, SURROGATE, find, learnable
from proxy.routes import Route

CACHEABLE_STATUS = frozenset({200, 203, 204, 300, 301, 308})
NEGATIVE_STATUS = frozenset({404, 410})


@dataclasses.dataclass(frozen=True, slots=True)
class Decision:
    """How a response from the origin is kept."""

    l1_ttl: float = 0.0
    l2_ttl: float = 0.0
    shared: bool = True  # may go to other callers waiting for the same key
    detail: str = ""  # why it is not stored (Cache-Status detail), empty when stored
    learn: tuple[str, ...] = ()  # request headers the answer varies on that the route may learn

    @property
    def fresh_for(self) -> float:
        return max(self.l1_ttl, self.l2_ttl)


def bypass_reason(headers: CIMultiDictProxy[str], route: Route) -> str | None:
    """Why the cache must not answer this read, or None when it may."""
    for name in CREDENTIALS:
        if name in headers and name not in route.vary:
            return "credentials"
    if RANGE in headers and "if-range" in headers:
        return "range"  # a range of a representation the client names: the origin's to judge
    return None


UNSATISFIABLE = (-1, -1)


def byte_range(value: str, length: int) -> tuple[int, int] | None:
    """The (first, last) byte a ``Range: bytes=...`` asks of a body of ``length`` bytes;
    ``UNSATISFIABLE`` when it asks for none of them (416); None when the whole body is the
    answer: several ranges, another unit, or a malformed one, which RFC 9110 §14.2 lets a
    cache ignore."""
    unit, _, spec = value.strip().partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first_text, dash, last_text = spec.strip().partition("-")
    first_text, last_text = first_text.strip(), last_text.strip()
    if not dash or not (first_text or last_text):
        return None
    if not first_text:  # the last N bytes
        suffix = delta_seconds(last_text)  # digits only, as delta-seconds are
        if suffix is None:
            return None
        return (max(0, length - int(suffix)), length - 1) if suffix and length else UNSATISFIABLE
    first = delta_seconds(first_text)
    last = delta_seconds(last_text) if last_text else math.inf
    if first is None or last is None or last < first:
        return None
    if first >= length:
        return UNSATISFIABLE
    return int(first), int(min(last, length - 1))


def stale_allowed(status: int, headers: CIMultiDictProxy[str]) -> bool:
    """May a response be served once stale? Not when the origin says it must be revalidated
    (``must-revalidate``, ``proxy-revalidate``, and ``s-maxage``, which implies
    proxy-revalidate for a shared cache: RFC 9111 §5.2.2.2, §5.2.2.8, §5.2.2.10); not a 404
    or 410 either, which ``negative_ttl`` alone bounds."""
    if status in NEGATIVE_STATUS:
        return False
    directives = cache_directives(headers)
    return not {"must-revalidate", "proxy-revalidate", "s-maxage"} & directives.keys()


# Response fields of cache directives aimed at caches like cachecar, in the order it obeys them
# (RFC 9213's targeted fields; Surrogate-Control from the Edge Architecture): the first present
# with a directive for cachecar replaces Cache-Control for it. A Surrogate-Control directive
# with a ";target" is for the surrogate of that name only.
TARGETED = ("Surrogate-Control", "CDN-Cache-Control")


def cache_directives(headers: CIMultiDictProxy[str]) -> dict[str, str | None]:
    """The cache directives of a response that cachecar obeys: a targeted field's, else
    Cache-Control's."""
    for field in TARGETED:
        values = headers.getall(field, ())
        if values:
            found = parse_cache_control(values, target=SURROGATE)
            if found:
                return found
    return parse_cache_control(headers.getall("Cache-Control", []))


def stale_limits(headers: CIMultiDictProxy[str]) -> tuple[float, float] | None:
    """The response's own ``stale-while-revalidate`` and ``stale-if-error`` (RFC 5861), which
    narrow the route's windows: inf for one it does not give, 0 for one it gives malformed;
    None when it gives neither."""
    directives = cache_directives(headers)
    limits = []
    for name in ("stale-while-revalidate", "stale-if-error"):
        if name in directives:
            seconds = delta_seconds(directives[name])
            limits.append(0.0 if seconds is None else seconds)
        else:
            limits.append(math.inf)
    if limits == [math.inf, math.inf]:
        return None
    return limits[0], limits[1]


def parse_cache_control(values: Sequence[str], target: str = "") -> dict[str, str | None]:
    """``max-age=60, private`` -> {"max-age": "60", "private": None}; names lower-cased.

    The first of a repeated directive counts (RFC 9111 §4.2.1). A directive with spaces around
    its ``=`` has no valid argument (None). With ``target``, a directive followed by
    ``;another`` is left out, as Surrogate-Control targets it elsewhere."""
    directives: dict[str, str | None] = {}
    for value in values:
        for part in value.split(","):
            part, _, aimed = part.partition(";") if target else (part, "", "")
            if aimed and aimed.strip() != target:
                continue
            name, sep, argument = part.strip().partition("=")
            name = name.lower()
            if not name or name in directives:
                continue
            if name != name.rstrip() or argument != argument.lstrip():
                directives[name.rstrip()] = None  # "max-age = 60": no argument to trust
            else:
                directives[name] = argument.strip().strip('"') if sep else None
    return directives


def decide(
    status: int,
    headers: CIMultiDictProxy[str],
    route: Route,
    sent: frozenset[str],
    now: float,
    age: float = 0.0,
    keyed: tuple[str, ...] | None = None,
    present: frozenset[str] = frozenset(),
) -> Decision:
    """May this response to a cacheable request be stored, and for how long from now?

    ``keyed`` holds the (lower-case) request headers its variant was made of (the route's
    ``vary`` when not given), ``sent`` those that went to the origin, ``present`` those the
    client sent. A ``Vary`` on a header outside ``keyed`` that the route may learn
    (``headers.learnable``) is to be learned (``Decision.learn``); the response is then the
    requester's own if the client sent that header (the origin answered without it), and
    otherwise the one for every request without it. A ``Vary`` on a header cachecar never
    sends on a miss is the answer for every request the cache answers, unless it was sent;
    ``Vary: *`` is nobody's to share. ``age`` is the origin's ``Age``: time the answer has
    already spent fresh elsewhere, taken off its lifetime.
    """
    directives = cache_directives(headers)
    if "no-store" in directives:
        return Decision(shared=False, detail="no-store")
    if "private" in directives:
        return Decision(shared=False, detail="private")
    if "set-cookie" in headers:
        return Decision(shared=False, detail="set-cookie")
    refused, learn = _unkeyed_vary(headers, route.vary if keyed is None else keyed, sent, present)
    if refused:
        return Decision(shared=False, detail="vary", learn=learn)
    decision = _lifetime(status, directives, headers, route, now, age)
    return dataclasses.replace(decision, learn=learn) if learn else decision


def _lifetime(
    status: int,
    directives: dict[str, str | None],
    headers: CIMultiDictProxy[str],
    route: Route,
    now: float,
    age: float,
) -> Decision:
    """How long a response that may be shared is kept in each tier (0: not at all)."""
    if status in CACHEABLE_STATUS:
        l1_ttl, l2_ttl = route.l1_ttl, route.l2_ttl
    elif status in NEGATIVE_STATUS and route.negative_ttl > 0:
        l1_ttl = l2_ttl = route.negative_ttl
    else:
        return Decision(detail="status")
    if "no-cache" in directives:
        return Decision(detail="no-cache")  # stored, it would need revalidating on every use
    cap = _freshness_cap(directives, headers, now)
    if cap is not None:
        cap -= age
        if cap <= 0:
            return Decision(detail="max-age")
        l1_ttl, l2_ttl = min(l1_ttl, cap), min(l2_ttl, cap)
    elif route.ttl_default is not None:
        if route.ttl_default <= 0:
            return Decision(detail="no-freshness")  # the route keeps only what the origin says
        l1_ttl, l2_ttl = min(l1_ttl, route.ttl_default), min(l2_ttl, route.ttl_default)
    if l1_ttl <= 0 and l2_ttl <= 0:
        return Decision(detail="ttl")
    return Decision(l1_ttl=l1_ttl, l2_ttl=l2_ttl)


def _unkeyed_vary(
    headers: CIMultiDictProxy[str],
    keyed: tuple[str, ...],
    sent: frozenset[str],
    present: frozenset[str],
) -> tuple[bool, tuple[str, ...]]:
    """Whether the answer's ``Vary`` makes it the requester's own, and the headers it varies
    on that its variant does not say and the route may learn."""
    learn: dict[str, None] = {}
    refused = False
    for value in headers.getall("Vary", ()):
        for name in (part.strip().lower() for part in value.split(",")):
            if not name or name in keyed:
                continue
            if name == "*":
                refused = True
            elif learnable(name):
                learn[name] = None
                refused = refused or name in present or name in sent
            elif name in sent:
                refused = True
    return refused, tuple(learn)


def _freshness_cap(
    directives: dict[str, str | None], headers: CIMultiDictProxy[str], now: float
) -> float | None:
    """The origin's own freshness lifetime, which caps the configured TTL (s-maxage first)."""
    for name in ("s-maxage", "max-age"):
        if name in directives:
            seconds = delta_seconds(directives[name])
            # A malformed value is treated as stale, as RFC 9111 §4.2.1 asks.
            return 0.0 if seconds is None else seconds
    expires = headers.get("Expires")
    if expires is not None:
        expires_at = _http_date(expires)
        if expires_at is None:
            return 0.0  # an invalid Expires means "already expired" (RFC 9111 §5.3)
        date = _http_date(headers.get("Date", "")) or now
        return expires_at - date
    return None


def age_of(headers: CIMultiDictProxy[str]) -> float:
    """The seconds the answer already spent in caches before the origin's: the first member
    of ``Age`` (later members, and later lines, are discarded), and 0 when that is not a
    delta-seconds: an invalid Age is ignored (RFC 9111 §5.1)."""
    values = headers.getall("Age", ())
    if not values:
        return 0.0
    return delta_seconds(values[0].split(",", 1)[0].strip()) or 0.0


def delta_seconds(value: str | None) -> float | None:
    """An RFC 9111 delta-seconds (ASCII digits only), or None when it is not one."""
    if value is None or not (value.isascii() and value.isdigit()):
        return None
    return float(value)


def _http_date(value: str) -> float | None:
    try:
        return parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError):
        return None


def not_modified(headers: CIMultiDictProxy[str], entry: Entry) -> bool:
    """True when the client's validators say it already has ``entry`` (RFC 9110 §13.2.2)."""
    if entry.status != 200:
        return False
    if_none_match = headers.get("If-None-Match")
    if if_none_match is not None:
        etag = find(entry.headers, "etag")
        if if_none_match.strip() == "*":
            return True
        if etag is None:
            return False
        wanted = _weak(etag)
        return any(_weak(tag) == wanted for tag in if_none_match.split(","))
    if_modified_since = headers.get("If-Modified-Since")
    if if_modified_since is not None:
        last_modified = find(entry.headers, "last-modified")
        since = _http_date(if_modified_since)
        modified = _http_date(last_modified) if last_modified is not None else None
        return since is not None and modified is not None and modified <= since
    return False


def _weak(tag: str) -> str:
    """The opaque part of an entity tag, for the weak comparison GET uses."""
    return tag.strip().removeprefix("W/")
