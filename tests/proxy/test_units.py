from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.units import format_duration, format_size, parse_duration, parse_size


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("30s", 30),
        ("1.5s", 1.5),
        ("10m", 600),
        ("1h", 3600),
        ("2d", 172800),
        (" 5s ", 5),
    ],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["30", "30 seconds", "-1s", "1w", "", "s", 30, None, True])
def test_what_is_not_a_duration(bad: object) -> None:
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration(bad)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("64MiB", 64 << 20),
        ("512KiB", 512 << 10),
        ("1GiB", 1 << 30),
        ("10MB", 10**7),
        ("100", 100),
        (4096, 4096),
    ],
)
def test_sizes(text: object, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["lots", "-1", "1TB", -5, True, 1.5])
def test_what_is_not_a_size(bad: object) -> None:
    with pytest.raises(ValueError, match="is not a size"):
        parse_size(bad)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.25, "250ms"),
        (90, "90s"),
        (600, "10m"),
        (1032.849, "1032849ms"),
        (0.0015, "1.5ms"),
    ],
)
def test_durations_print_exactly(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@given(st.integers(0, 10**7))
def test_formatted_durations_parse_back(milliseconds: int) -> None:
    seconds = milliseconds / 1000
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds)


@given(st.integers(0, 1 << 40))
def test_formatted_sizes_parse_back(size: int) -> None:
    assert parse_size(format_size(size)) == size
