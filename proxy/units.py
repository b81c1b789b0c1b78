"""Durations and sizes as people write them in YAML, parsed once into seconds and bytes."""

from __future__ import annotations

import re

_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*\Z")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(B|KiB|MiB|GiB|KB|MB|GB)?\s*\Z")
_SIZE_UNITS = {
    None: 1,
    "B": 1,
    "KiB": 1 << 10,
    "MiB": 1 << 20,
    "GiB": 1 << 30,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
}


def parse_duration(value: object) -> float:
    """``"250ms"`` -> 0.25; raises ValueError naming the accepted forms."""
    match = _DURATION.match(value) if isinstance(value, str) else None
    if match is None:
        raise ValueError(f"{value!r} is not a duration (use 250ms, 30s, 10m, 1h)")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def format_duration(seconds: float) -> str:
    """The shortest exact spelling: 0.25 -> "250ms", 600 -> "10m"."""
    if seconds == 0:
        return "0s"
    for unit, factor in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= factor and (seconds / factor).is_integer():
            return f"{int(seconds // factor)}{unit}"
    # Rounded to the nanosecond: what float arithmetic adds below that is noise, not duration.
    milliseconds = round(seconds * 1000, 6)
    if milliseconds.is_integer():
        return f"{int(milliseconds)}ms"
    return f"{milliseconds:.6f}".rstrip("0") + "ms"


def parse_size(value: object) -> int:
    """``"64MiB"`` -> 67108864; a bare integer is bytes."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    match = _SIZE.match(value) if isinstance(value, str) else None
    if match is None:
        raise ValueError(f"{value!r} is not a size (use 512KiB, 64MiB, 1GiB or bytes)")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])


def format_size(size: int) -> str:
    for unit in ("GiB", "MiB", "KiB"):
        factor = _SIZE_UNITS[unit]
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return f"{size}B"
