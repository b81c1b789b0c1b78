"""One spelling per resource: the path normalization that keys and forwarding both use.

    /users/%31/../%7Ealice//x  ->  /users/~alice/x

The normalized path is both the cache key's source and what cachecar forwards to the origin, so a
key can never hold the answer for another spelling's resource. What is left to guard against is a
back end that reads the forwarded path differently from us; every spelling on which two readings
can differ is refused (``BadPath``, answered 400):

- ``%2F`` and ``%5C``: an encoded slash or backslash. We would route ``/a%2Fb`` as one segment;
  a back end that decodes it first (Apache with AllowEncodedSlashes, many frameworks) routes
  ``/a/b`` — or ``/a%2F..%2Fadmin`` as ``/admin``.
- A raw backslash: Windows servers (IIS, ASP.NET) and some frameworks read it as ``/``.
- Control characters, raw (0x00-0x1F, 0x7F) or encoded (``%00``-``%1F``, ``%7F``): a NUL cuts a C
  string short, an encoded CR/LF splits a header line in a back end that decodes into one.
- Double encoding, ``%25`` followed by two hex digits (``%252e%252e%252f``), also when the escape
  only appears once ``%25%32%65`` is decoded: a back end that decodes twice reads ``../``.
- A dot-segment with a path parameter (``..;x``, ``.;``, ``..%3B``): Tomcat, Jetty and Spring
  strip ``;parameters`` and then read ``/static/..;/admin`` as ``/admin``.
- A malformed escape (``%zz``, a ``%`` at the end) and a target that is not a path.

Everything else is canonicalized, so that the spellings of one resource share one entry:

- Escapes of unreserved characters (``%41``, ``%7e``, ``%2e``) are decoded (RFC 3986 §6.2.2.2),
  the other escapes upper-cased (``%c3%a9`` -> ``%C3%A9``).
- Characters not allowed raw in a path are percent-encoded as UTF-8: non-ASCII (``/café`` ->
  ``/caf%C3%A9``; a non-UTF-8 byte, which aiohttp hands over surrogate-escaped, becomes its own
  ``%XX``) and the ASCII ``"#<>[]^`{|}`` and space. So ``/a|b`` and ``/a%7cb`` are one entry, and
  a raw ``#`` can no longer be read as a fragment by the origin client.
- Runs of slashes are merged, then dot-segments removed (§5.2.4), escaped ones included.

Path parameters (``/users/1;v=2``) are kept as data: ``;`` is a legal path character that APIs
use (matrix parameters), and the origin receives exactly the path we keyed on. An origin that
strips them serves ``/users/1;v=2`` as ``/users/1``: a second entry for one resource, never the
answer of another one (the only way it could, ``..;``, is refused above). Escapes of reserved
characters (``%3B``, ``%3F``) are not decoded: RFC 3986 lets them mean something else than the
raw character.

Most paths are already canonical: one regular-expression match and two substring checks.
"""

from __future__ import annotations

import re

from proxy.errors import ProxyError

_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# pchar (RFC 3986 §3.3) and "/", the characters a canonical path holds besides escapes.
_CANONICAL = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@/]*")
# An escape (well-formed or not), or a character that is not allowed raw in a path.
_SUSPECT = re.compile(r"%(.{0,2})|[^A-Za-z0-9\-._~!$&'()*+,;=:@/%]", re.DOTALL)
_DOUBLE = re.compile(r"%25[0-9A-Fa-f]{2}")
_HEX = frozenset("0123456789abcdefABCDEF")
_ENCODED_SEPARATORS = {"2F": "an encoded slash", "5C": "an encoded backslash"}
_DOUBLE_HINT = "a back end that decodes twice would read another path (%252e%252e%252f is ../)"


class BadPath(ProxyError, ValueError):
    """A request target that cannot be normalized; answered 400."""


def is_canonical(path: str) -> bool:
    """Whether ``normalize_path`` would give ``path`` back unchanged (the common case)."""
    return (
        path.startswith("/")
        and _CANONICAL.fullmatch(path) is not None
        and "/." not in path
        and "//" not in path
    )


def normalize_path(path: str) -> str:
    """The canonical form of a request path (without its query); ``BadPath`` if ambiguous."""
    if not path.startswith("/"):
        raise BadPath(f"{path[:60]!r} is not an origin-form path (it must start with /)")
    if _CANONICAL.fullmatch(path) is not None and "/." not in path and "//" not in path:
        return path
    path = _SUSPECT.sub(_canonical_escape, path)
    if "%25" in path:
        double = _DOUBLE.search(path)
        if double is not None:
            raise BadPath(f"double percent-encoding {double.group(0)!r}: {_DOUBLE_HINT}")
    if "//" in path:
        path = re.sub("/{2,}", "/", path)
    if "/." in path:
        path = _remove_dot_segments(path)
    return path


def _canonical_escape(match: re.Match[str]) -> str:
    """The canonical spelling of one escape or one character not allowed raw."""
    text = match.group(0)
    if text[0] != "%":
        return _encode_raw(text)
    digits = match.group(1)
    if len(digits) != 2 or digits[0] not in _HEX or digits[1] not in _HEX:
        raise BadPath(f"malformed percent-encoding {text!r}")
    digits = digits.upper()
    code = int(digits, 16)
    char = chr(code)
    if char in _UNRESERVED:
        return char
    if digits in _ENCODED_SEPARATORS:
        raise BadPath(
            f"{text!r} is {_ENCODED_SEPARATORS[digits]}: a back end that decodes it would "
            "route another path than the one cachecar keyed"
        )
    if code < 0x20 or code == 0x7F:
        raise BadPath(f"{text!r} is an encoded control character")
    return "%" + digits


def _encode_raw(char: str) -> str:
    code = ord(char)
    if code < 0x20 or code == 0x7F:
        raise BadPath(f"{char!r} is a control character")
    if char == "\\":
        raise BadPath("'\\\\' (a backslash) is refused: some back ends read it as '/'")
    try:
        # aiohttp's pure-Python parser hands a byte that is not UTF-8 over as a lone surrogate.
        raw = char.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise BadPath(f"{char!r} is not a character a request target can carry") from None
    return "".join(f"%{byte:02X}" for byte in raw)


def _remove_dot_segments(path: str) -> str:
    out: list[str] = []
    segments = path.split("/")
    for segment in segments[1:]:
        if segment == "..":
            if out:
                out.pop()
        elif segment == ".":
            continue
        else:
            if segment.startswith(".") and _is_dot_with_parameter(segment):
                raise BadPath(
                    f"{segment[:60]!r} is a dot-segment with a path parameter: back ends that "
                    "strip ;parameters read it as a dot-segment"
                )
            out.append(segment)
    # "/a/b/." and "/a/b/.." name a directory: keep the trailing slash they imply.
    trailing = segments[-1] in {".", ".."}
    return "/" + "/".join(out) + ("/" if trailing and out else "")


def _is_dot_with_parameter(segment: str) -> bool:
    head = segment.split(";", 1)[0].split("%3B", 1)[0]
    return head in {".", ".."}


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
