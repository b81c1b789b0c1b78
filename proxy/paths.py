"""One spelling per resource: the path normalization that keys and forwarding both use.

    /users/%31/../%7Ealice//x  ->  /users/~alice/x

Percent-encodings of unreserved characters are decoded (RFC 3986 §6.2.2.2), the remaining ones
upper-cased, dot-segments removed (§5.2.4) and runs of slashes merged. Encoded slashes (%2F) stay
encoded: they are data inside a segment, not separators. The normalized path is what cachecar
forwards to the origin, so a key can never hold the answer for another spelling's resource.
"""

from __future__ import annotations

import re

_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_PERCENT = re.compile(r"%(..)?", re.DOTALL)
_HEX = frozenset("0123456789abcdefABCDEF")


class BadPath(ValueError):
    """A request target that cannot be normalized; answered 400."""


def normalize_path(path: str) -> str:
    """The canonical form of a request path (without its query)."""
    if not path.startswith("/"):
        raise BadPath(f"{path[:60]!r} is not an origin-form path (it must start with /)")
    # Most paths are already canonical; keep the hot path to three substring checks.
    if "%" not in path and "/." not in path and "//" not in path:
        return path
    if "%" in path:
        path = _PERCENT.sub(_decode_unreserved, path)
    if "//" in path:
        path = re.sub("/{2,}", "/", path)
    if "/." in path:
        path = _remove_dot_segments(path)
    return path


def _decode_unreserved(match: re.Match[str]) -> str:
    digits = match.group(1)
    if digits is None or digits[0] not in _HEX or digits[1] not in _HEX:
        raise BadPath(f"malformed percent-encoding {match.group(0)!r}")
    char = chr(int(digits, 16))
    return char if char in _UNRESERVED else "%" + digits.upper()


def _remove_dot_segments(path: str) -> str:
    out: list[str] = []
    segments = path.split("/")
    for segment in segments[1:]:
        if segment == "..":
            if out:
                out.pop()
        elif segment != ".":
            out.append(segment)
    # "/a/b/." and "/a/b/.." name a directory: keep the trailing slash they imply.
    trailing = segments[-1] in {".", ".."}
    return "/" + "/".join(out) + ("/" if trailing and out else "")


def sorted_query(query: str) -> str:
    """The query string ordered by parameter name, for keys; empty pairs dropped.

    The sort is by name only and stable, so a repeated parameter keeps the order of its values:
    ``id=1&id=2`` and ``id=2&id=1`` can be different requests and stay different keys.
    """
    if not query:
        return ""
    if "&" not in query:
        return query
    pairs = [pair for pair in query.split("&") if pair]
    return "&".join(sorted(pairs, key=lambda pair: pair.partition("=")[0]))
