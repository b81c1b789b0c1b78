"""Time, injected: the engine never calls ``time`` directly so tests can drive it."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def time(self) -> float:
        """Wall-clock seconds since the epoch: when an entry was stored, its Age."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never jumps: in-process expiry and breaker timing."""
        ...


class SystemClock:
    """The real clocks."""

    __slots__ = ()

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()
