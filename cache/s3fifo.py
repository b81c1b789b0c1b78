"""L1's store: S3-FIFO (Yang et al., SOSP '23) over a byte budget, with an expiry per item.

Chosen over LRU by ``bench.policy_sim`` (docs/benchmarks.md): fewer misses on a Zipf trace, with
a scan, and when popularity shifts; and a read costs a counter, where LRU moves the key.

    small   keys new to the store, first in, first out; evicted from while it holds a tenth of
            the budget or more: a key read while there moves to main, any other leaves, and
            is remembered in ghost
    main    keys read again while in small, or stored again while in ghost; evicted from when
            small is under its tenth: a key read since it was last looked at goes round once
            more (with one read less, at most 3 counted), any other leaves
    ghost   the keys small evicted last (keys only, as many as the store holds)
    expiry  a heap of (expires, generation, key): ``expire`` drops what has expired; a read of
            an expired item drops it too; one met by eviction is reported expired

A key's place in a queue is (key, generation): a key dropped and stored again has a new
generation, and its old place is skipped when the queue reaches it. Storing a key held already
changes its value in place: its queue, its place and its reads stay.

Every drop but ``pop`` and ``clear`` is told to ``on_drop`` with its reason.
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Generic, TypeVar

from cache.observer import Eviction

K = TypeVar("K")
V = TypeVar("V")

MAX_READS = 3  # reads counted per key: a key read more goes round main at most this often
SMALL_SHARE = 10  # small is evicted from while it holds 1/SMALL_SHARE of the budget


class Timer:
    """The store's clock, frozen while a ``with`` block holds it: one call sees one instant."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._depth = 0
        self._now = 0.0

    def __call__(self) -> float:
        return self._now if self._depth else self._clock()

    def __enter__(self) -> float:
        if not self._depth:
            self._now = self._clock()
        self._depth += 1
        return self._now

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._depth -= 1


class S3FIFO(Generic[K, V]):
    """At most ``maxsize`` by ``getsizeof``; ``ttu(value)``: when it expires, on ``timer``'s
    clock. A value larger than ``maxsize`` on its own is refused (``ValueError``). ``maxcount``:
    the most items its owner keeps (evicting with ``popitem``), for small's share of the store."""

    def __init__(
        self,
        maxsize: int,
        ttu: Callable[[V], float],
        timer: Callable[[], float],
        getsizeof: Callable[[V], int],
        on_drop: Callable[[V, Eviction], None],
        maxcount: int | None = None,
    ) -> None:
        self._maxsize = maxsize
        self._maxcount = maxcount
        self._ttu = ttu
        self.timer = Timer(timer)
        self._getsizeof = getsizeof
        self._on_drop = on_drop
        self._data: dict[K, V] = {}
        self._sizes: dict[K, int] = {}
        self._reads: dict[K, int] = {}
        self._generation: dict[K, int] = {}
        self._in_main: set[K] = set()
        self._small: deque[tuple[K, int]] = deque()
        self._main: deque[tuple[K, int]] = deque()
        self._ghost: OrderedDict[K, None] = OrderedDict()
        self._expiry: list[tuple[float, int, K]] = []
        self._generations = itertools.count()
        self._currsize = 0
        self._small_size = 0

    @property
    def maxsize(self) -> int:
        return self._maxsize

    @property
    def currsize(self) -> int:
        return self._currsize

    def __len__(self) -> int:
        return len(self._data)

    def __iter__(self) -> Iterator[K]:
        return iter(list(self._data))

    def __contains__(self, key: K) -> bool:
        value = self._data.get(key)
        return value is not None and self._ttu(value) > self.timer()

    def __getitem__(self, key: K) -> V:
        """The value, counted as a read; ``KeyError`` when missing or expired (then dropped)."""
        value = self._data[key]
        if self._ttu(value) <= self.timer():
            self._drop(key, Eviction.EXPIRED)
            raise KeyError(key)
        reads = self._reads[key]
        if reads < MAX_READS:
            self._reads[key] = reads + 1
        return value

    def held(self, key: K) -> V | None:
        """The value, expired or not, without counting a read."""
        return self._data.get(key)

    def __setitem__(self, key: K, value: V) -> None:
        size = self._getsizeof(value)
        if size > self._maxsize:
            raise ValueError(f"a value of {size} bytes does not fit in {self._maxsize}")
        self.expire()
        expires = self._ttu(value)
        if key in self._data:
            change = size - self._sizes[key]
            if key not in self._in_main:
                self._small_size += change
            self._currsize += change
            if self._ttu(self._data[key]) != expires:
                heapq.heappush(self._expiry, (expires, self._generation[key], key))
        else:
            generation = next(self._generations)
            self._generation[key] = generation
            self._reads[key] = 0
            if key in self._ghost:  # evicted from small lately, wanted again: main
                del self._ghost[key]
                self._main.append((key, generation))
                self._in_main.add(key)
            else:
                self._small.append((key, generation))
                self._small_size += size
            self._currsize += size
            heapq.heappush(self._expiry, (expires, generation, key))
        self._data[key] = value
        self._sizes[key] = size
        while self._currsize > self._maxsize and self._evict(protect=key) is not None:
            pass

    def pop(self, key: K, default: V | None = None) -> V | None:
        """The value taken out, quietly (no ``on_drop``)."""
        if key not in self._data:
            return default
        return self._forget(key)

    def popitem(self) -> tuple[K, V]:
        """Evict one item, as making room would."""
        evicted = self._evict()
        if evicted is None:
            raise KeyError("the store is empty")
        return evicted

    def expire(self, time: float | None = None) -> list[tuple[K, V]]:
        """Drop every item expired at ``time`` (the clock's now by default)."""
        now = self.timer() if time is None else time
        heap = self._expiry
        expired: list[tuple[K, V]] = []
        while heap and heap[0][0] <= now:
            expires, generation, key = heapq.heappop(heap)
            value = self._data.get(key)
            if (
                value is not None
                and self._generation[key] == generation
                and self._ttu(value) == expires
            ):
                expired.append((key, value))
                self._drop(key, Eviction.EXPIRED)
        if len(heap) > 2 * len(self._data) + 64:  # mostly places of items gone: rebuilt
            self._expiry = [
                (self._ttu(value), self._generation[key], key) for key, value in self._data.items()
            ]
            heapq.heapify(self._expiry)
        return expired

    def clear(self) -> None:
        for holder in (self._data, self._sizes, self._reads, self._generation, self._ghost):
            holder.clear()
        self._in_main.clear()
        self._small.clear()
        self._main.clear()
        self._expiry.clear()
        self._currsize = self._small_size = 0

    def _evict(self, protect: K | None = None) -> tuple[K, V] | None:
        """Drop one item by the policy, never ``protect``; None when only it is left."""
        small, main = self._small, self._main
        # How often ``protect`` came round in each queue since another key was put back: twice,
        # and the queue holds no other that could go. Reads only go down: this ends.
        met = {True: 0, False: 0}
        while True:
            in_small = bool(small) and met[True] < 2
            in_main = bool(main) and met[False] < 2
            if not (in_small or in_main):
                return None
            from_small = in_small and (not in_main or self._small_full())
            queue = small if from_small else main
            key, generation = queue.popleft()
            if self._generation.get(key) != generation:
                continue  # a place of a key dropped since
            if key == protect:
                queue.append((key, generation))
                met[from_small] += 1
                continue
            value = self._data[key]
            reads = self._reads[key]
            if from_small and reads:  # read while new: it stays, in main
                self._reads[key] = 0
                self._small_size -= self._sizes[key]
                self._in_main.add(key)
                main.append((key, generation))
                met[True] = met[False] = 0  # others changed: ``protect`` may not be alone
                continue
            if not from_small and reads:  # read since last looked at: once more round
                self._reads[key] = reads - 1
                main.append((key, generation))
                met[True] = met[False] = 0
                continue
            expired = self._ttu(value) <= self.timer()
            self._drop(key, Eviction.EXPIRED if expired else Eviction.SIZE)
            if from_small and not expired:
                self._ghost[key] = None
                while len(self._ghost) > max(1, len(self._data)):
                    self._ghost.popitem(last=False)
            return key, value

    def _small_full(self) -> bool:
        """Does small hold its share of the store, by bytes or by count?"""
        if self._small_size * SMALL_SHARE >= self._maxsize:
            return True
        small = len(self._data) - len(self._in_main)
        return self._maxcount is not None and small * SMALL_SHARE >= self._maxcount

    def _drop(self, key: K, reason: Eviction) -> None:
        self._on_drop(self._forget(key), reason)

    def _forget(self, key: K) -> V:
        value = self._data.pop(key)
        size = self._sizes.pop(key)
        del self._reads[key]
        del self._generation[key]
        if key in self._in_main:
            self._in_main.discard(key)
        else:
            self._small_size -= size
        self._currsize -= size
        return value
