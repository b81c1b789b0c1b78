from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.paths import BadPath, normalize_path, sorted_query

UNRESERVED = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"
SUB_DELIMS_AND_COLON_AT = "!$&'()*+,;=:@"
# Printable ASCII a path cannot hold raw; cachecar percent-encodes it (the backslash is refused).
NOT_ALLOWED_RAW = ' "#<>[]^`{|}'


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("/users/1", "/users/1"),
        ("/users/%31", "/users/1"),
        ("/%7Ealice/%2d", "/~alice/-"),
        ("/a/./b/../c", "/a/c"),
        ("/a/%2e%2E/b", "/b"),  # dot-segments spelled with escapes are still dot-segments
        ("/a/.%2e/b", "/b"),
        ("/a/%2E/b", "/a/b"),
        ("//a///b", "/a/b"),
        ("/..", "/"),
        ("/a/b/..", "/a/"),
        ("/a/.", "/a/"),
        ("/a/.well-known/..x", "/a/.well-known/..x"),  # dots inside a name are data
        ("/caf%c3%a9", "/caf%C3%A9"),
        ("/café", "/caf%C3%A9"),  # raw non-ASCII (aiohttp's Python parser passes it on)
        ("/bad\udcff", "/bad%FF"),  # a byte that is not UTF-8, surrogate-escaped by aiohttp
        ("/a|b", "/a%7Cb"),
        ("/a%7cb", "/a%7Cb"),
        ("/a#b", "/a%23b"),  # never a fragment the origin client would cut off
        ('/a b"<>[]^`{}', "/a%20b%22%3C%3E%5B%5D%5E%60%7B%7D"),
        ("/100%25", "/100%25"),  # an encoded percent sign is data
        ("/100%25zz", "/100%25zz"),
        ("/a%3bb/c;d=1", "/a%3Bb/c;d=1"),  # reserved escapes are not decoded
        ("/users/1;v=2", "/users/1;v=2"),  # path parameters are data
        ("/x/1;/../2", "/x/2"),
        ("/a:b@c!$&'()*+,=", "/a:b@c!$&'()*+,="),
    ],
)
def test_spellings_become_one_canonical_path(raw: str, canonical: str) -> None:
    assert normalize_path(raw) == canonical


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("/a%zz", "malformed percent-encoding '%zz'"),
        ("/a%4", "malformed percent-encoding '%4'"),
        ("/%", "malformed percent-encoding '%'"),
        ("users/1", "is not an origin-form path"),
        ("http://evil/x", "is not an origin-form path"),
        ("*", "is not an origin-form path"),
        ("", "is not an origin-form path"),
        ("/a%2fb", "'%2f' is an encoded slash"),
        ("/a%2Fb/../c", "'%2F' is an encoded slash"),
        ("/..%2f..%2fetc/passwd", "'%2f' is an encoded slash"),
        ("/a%5cb", "'%5c' is an encoded backslash"),
        ("/a%5C..%5Cadmin", "'%5C' is an encoded backslash"),
        ("/a\\b", "a backslash"),
        ("/..\\admin", "a backslash"),
        ("/a%00.json", "'%00' is an encoded control character"),
        ("/a%0d%0aX-Injected:%201", "'%0d' is an encoded control character"),
        ("/a%7F", "'%7F' is an encoded control character"),
        ("/a\x00b", "'\\x00' is a control character"),
        ("/a\nb", "'\\n' is a control character"),
        ("/a\x7fb", "'\\x7f' is a control character"),
        ("/%252e%252e%252f", "double percent-encoding '%252e'"),
        ("/%252F", "double percent-encoding '%252F'"),
        ("/a%2541", "double percent-encoding '%2541'"),
        ("/%25%32%65", "double percent-encoding '%252e'"),  # appears once %32%65 is decoded
        ("/static/..;/admin", "'..;' is a dot-segment with a path parameter"),
        ("/static/..;x=1/admin", "'..;x=1' is a dot-segment with a path parameter"),
        ("/static/.;/admin", "'.;' is a dot-segment with a path parameter"),
        ("/static/%2e%2e;/admin", "'..;' is a dot-segment with a path parameter"),
        ("/static/..%3b/admin", "'..%3B' is a dot-segment with a path parameter"),
        ("/a\ud800", "is not a character a request target can carry"),
    ],
)
def test_ambiguous_targets_are_refused_naming_the_sequence(raw: str, reason: str) -> None:
    with pytest.raises(BadPath) as refused:
        normalize_path(raw)
    assert reason in str(refused.value)


# -- properties ----------------------------------------------------------------------------------

pieces = st.sampled_from(
    [
        *[
            "a",
            "B",
            "0",
            ".",
            "..",
            "/",
            "//",
            "~",
            "-",
            ";",
            "=",
            ":",
            "%",
            "|",
            "#",
            "é",
            "%2e",
            "%2E",
            "%2f",
            "%2F",
            "%5c",
            "%41",
            "%7e",
            "%3b",
            "%3B",
            "%25",
        ],
        *["%32", "%65", "%c3%a9", "%7c", "%00", "%0a", "%zz", "%4"],
        *[" ", "\\", "\x00", "\n", "\udcff"],
    ]
)
targets = st.lists(pieces, max_size=24).map(lambda parts: "/" + "".join(parts))
any_text = st.text(max_size=40).map(lambda text: "/" + text)


def canonical_or_none(path: str) -> str | None:
    try:
        return normalize_path(path)
    except BadPath:
        return None


@given(st.one_of(targets, any_text))
def test_normalizing_twice_changes_nothing(path: str) -> None:
    once = canonical_or_none(path)
    if once is not None:
        assert normalize_path(once) == once


_ESCAPE = re.compile(r"%(..)")
_CANONICAL_RAW = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@/%]*")


@given(st.one_of(targets, any_text))
def test_a_canonical_path_is_unambiguous(path: str) -> None:
    canonical = canonical_or_none(path)
    if canonical is None:
        return
    assert canonical.startswith("/")
    segments = canonical.split("/")[1:]
    assert "." not in segments
    assert ".." not in segments
    assert "//" not in canonical
    assert _CANONICAL_RAW.fullmatch(canonical), canonical  # only pchars, "/" and escapes
    assert canonical.count("%") == len(_ESCAPE.findall(canonical))
    for digits in _ESCAPE.findall(canonical):
        assert re.fullmatch("[0-9A-F]{2}", digits), canonical
        code = int(digits, 16)
        assert chr(code) not in UNRESERVED
        assert digits not in {"2F", "5C"}
        assert code >= 0x20
        assert code != 0x7F
    assert not re.search("%25[0-9A-Fa-f]{2}", canonical)
    for segment in segments:
        head = segment.split(";")[0].split("%3B")[0]
        assert head not in {".", ".."}


@given(st.text(max_size=60))
def test_any_target_is_normalized_or_refused_with_bad_path(path: str) -> None:
    try:
        normalize_path(path)
    except BadPath as exc:
        message = str(exc)
    else:
        return
    assert message


# Characters whose escape means the same as the character: unreserved ones (decoded back) and
# the ones a path cannot hold raw (encoded forward). Not the sub-delims: %3B is not ";".
equivalent = st.sampled_from(UNRESERVED + NOT_ALLOWED_RAW + "éü€\U0001f600")
segment_chars = st.one_of(equivalent, st.sampled_from(SUB_DELIMS_AND_COLON_AT))
names = st.text(segment_chars, min_size=1, max_size=8).filter(
    lambda name: name.split(";")[0] not in {".", ".."}
)


def spell(char: str, how: int) -> str:
    """One of the spellings of ``char``: raw, or escaped with lower- or upper-case digits."""
    if char in SUB_DELIMS_AND_COLON_AT or how == 0:
        return char
    escape = "".join(f"%{byte:02X}" for byte in char.encode())
    return escape.lower() if how == 1 else escape


@given(st.lists(names, min_size=1, max_size=5), st.data())
def test_two_spellings_of_one_path_are_one_entry(segments: list[str], data: st.DataObject) -> None:
    path = "/" + "/".join(segments)
    spelled = "".join(
        spell(char, data.draw(st.integers(0, 2), label=repr(char))) if char != "/" else "/"
        for char in path
    )
    assert normalize_path(spelled) == normalize_path(path)


@given(st.lists(names, min_size=1, max_size=5), st.sampled_from(["/.", "/..", "/%2e", "/%2E%2e"]))
def test_escaped_dot_segments_go_where_literal_ones_do(segments: list[str], dots: str) -> None:
    path = "/" + "/".join(segments)
    literal = dots.replace("%2e", ".").replace("%2E", ".")
    assert normalize_path(path + dots + "/x") == normalize_path(path + literal + "/x")


@given(
    st.lists(names, min_size=1, max_size=4),
    st.sampled_from(["%2F", "%2f", "%5C", "\\", "%00", "\x00", "%252e", "..;"]),
)
def test_an_ambiguous_sequence_anywhere_is_refused(segments: list[str], bad: str) -> None:
    at = len(segments) // 2
    path = "/" + "/".join([*segments[:at], bad, *segments[at:]])
    with pytest.raises(BadPath):
        normalize_path(path)


def test_query_parameters_are_sorted_and_empty_ones_dropped() -> None:
    assert sorted_query("b=2&a=1&&c") == "a=1&b=2&c"
    # By name only: the values of a repeated parameter keep their order (they may mean it).
    assert sorted_query("id=2&x=0&id=1") == "id=2&id=1&x=0"
    assert sorted_query("id=1&id=2") != sorted_query("id=2&id=1")
    assert sorted_query("") == ""
    assert sorted_query("only=1") == "only=1"
