from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.paths import BadPath, normalize_path, sorted_query


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("/users/1", "/users/1"),
        ("/users/%31", "/users/1"),
        ("/%7Ealice/%2d", "/~alice/-"),
        ("/a%2fb", "/a%2Fb"),  # an encoded slash is data, not a separator
        ("/a%2Fb/../c", "/c"),
        ("/a/./b/../c", "/a/c"),
        ("/a/%2e%2E/b", "/b"),  # dot-segments spelled with escapes are still dot-segments
        ("//a///b", "/a/b"),
        ("/..", "/"),
        ("/a/b/..", "/a/"),
        ("/a/.", "/a/"),
        ("/%252F", "/%252F"),  # double encoding stays what it is
        ("/caf%c3%a9", "/caf%C3%A9"),
    ],
)
def test_spellings_become_one_canonical_path(raw: str, canonical: str) -> None:
    assert normalize_path(raw) == canonical


@pytest.mark.parametrize("raw", ["/a%zz", "/a%4", "/%", "users/1", "http://evil/x", "*"])
def test_targets_that_cannot_be_normalized_are_refused(raw: str) -> None:
    with pytest.raises(BadPath):
        normalize_path(raw)


path_chars = st.sampled_from(["a", "b", ".", "/", "%2e", "%2F", "%41", "%7e", "~", "-"])
paths = st.lists(path_chars, max_size=20).map(lambda parts: "/" + "".join(parts))


@given(paths)
def test_normalizing_twice_changes_nothing(path: str) -> None:
    once = normalize_path(path)
    assert normalize_path(once) == once


@given(paths)
def test_a_canonical_path_has_no_dot_segments_empty_segments_or_lowercase_escapes(
    path: str,
) -> None:
    canonical = normalize_path(path)
    segments = canonical.split("/")[1:]
    assert "." not in segments
    assert ".." not in segments
    assert "" not in segments[:-1]
    assert "%2e" not in canonical.lower()
    assert "%2f" not in canonical


def test_query_parameters_are_sorted_and_empty_ones_dropped() -> None:
    assert sorted_query("b=2&a=1&&c") == "a=1&b=2&c"
    # By name only: the values of a repeated parameter keep their order (they may mean it).
    assert sorted_query("id=2&x=0&id=1") == "id=2&id=1&x=0"
    assert sorted_query("id=1&id=2") != sorted_query("id=2&id=1")
    assert sorted_query("") == ""
    assert sorted_query("only=1") == "only=1"
