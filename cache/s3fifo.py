"""L1's store: S3-FIFO (Yang et al., SOSP '23) over a byte budget, with an expiry per item.

Chosen over LRU by ``bench.policy_sim`` (docs/benchmarks.md): fewer misses on a Zipf trace, with
a scan, and when popularity shifts; and a read costs a counter, where LRU moves the key.

    small   keys new to the store, first in, first out; evicted from while it holds a tenth of
            the budget or more: a key read while there moves to main, any other leaves, and
            is remembered in ghost
    main    keys read again while in small, or stored again while in ghost; evicted from when
            small is under its tenth: a key read since it was last looked at goes round once
            more (with one read less, at most 3 counted), any other leaves
    ghost   the keys small evicted last, by hash (as many as the store holds)
    expiry  a heap of (expires, key): ``expire`` drops what has expired; a read of an expired
            item drops it too; one met by eviction is reported expired

Each key is one node, which its queue holds: a key dropped and stored again has a new node,
and its old place is skipped when the queue reaches it, or dropped once such places outnumber
the keys. An item of the heap is taken for the key's only if the key expires then: strings and
numbers only, which the garbage collector does not walk. Storing a key held already changes its
value in place: its queue, its place and its reads stay. ``ttu`` and ``getsizeof`` are asked
when a value is stored: a value whose expiry or size changes is stored again.

Every drop but ``pop`` and ``clear`` is told to ``on_drop`` with its reason.
"""

from __future__ import annotations

import heapq
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


class _Node(Generic[K, V]):
    """A key's place in the store: its value and the store's bookkeeping of it."""

    __slots__ = ("expires", "key", "main", "reads", "size", "value")

    def __init__(self, key: K, value: V, size: int, expires: float) -> None:
        self.key = key
        self.value = value
        self.size = size
        self.expires = expires
        self.reads = 0
        self.main = False  # in main (else in small)


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
        self._data: dict[K, _Node[K, V]] = {}
        self._small: deque[_Node[K, V]] = deque()
        self._main: deque[_Node[K, V]] = deque()
        self._ghost: OrderedDict[int, None] = OrderedDict()
        self._expiry: list[tuple[float, K]] = []
        self._currsize = 0
        self._small_size = 0
        self._main_count = 0
        self._dead = 0  # places in the queues of keys dropped since (compacted past a bound)

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
        node = self._data.get(key)
        return node is not None and node.expires > self.timer()

    def __getitem__(self, key: K) -> V:
        """The value, counted as a read; ``KeyError`` when missing or expired (then dropped)."""
        value = self.read(key, self.timer())
        if value is None:
            raise KeyError(key)
        return value

    def read(self, key: K, now: float) -> V | None:
        """``self[key]`` at ``now`` (a time the caller just read from the clock), without the
        timer: None when missing or expired (then dropped). What a hit calls."""
        node = self._data.get(key)
        if node is None:
            return None
        if node.expires <= now:
            self._drop(node, Eviction.EXPIRED)
            return None
        if node.reads < MAX_READS:
            node.reads += 1
        return node.value

    def held(self, key: K) -> V | None:
        """The value, expired or not, without counting a read."""
        node = self._data.get(key)
        return None if node is None else node.value

    def __setitem__(self, key: K, value: V) -> None:
        size = self._getsizeof(value)
        if size > self._maxsize:
            raise ValueError(f"a value of {size} bytes does not fit in {self._maxsize}")
        self.expire()
        expires = self._ttu(value)
        node = self._data.get(key)
        if node is not None:
            change = size - node.size
            if not node.main:
                self._small_size += change
            self._currsize += change
            node.value = value
            node.size = size
            if node.expires != expires:
                node.expires = expires
                heapq.heappush(self._expiry, (expires, key))
        else:
            node = self._data[key] = _Node(key, value, size, expires)
            ghost = hash(key)
            if ghost in self._ghost:  # evicted from small lately, wanted again: main
                del self._ghost[ghost]
                node.main = True
                self._main_count += 1
                self._main.append(node)
            else:
                self._small.append(node)
                self._small_size += size
            self._currsize += size
            heapq.heappush(self._expiry, (expires, key))
        while self._currsize > self._maxsize and self._evict(protect=node) is not None:
            pass

    def pop(self, key: K, default: V | None = None) -> V | None:
        """The value taken out, quietly (no ``on_drop``)."""
        node = self._data.get(key)
        if node is None:
            return default
        return self._forget(node)

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
        data = self._data
        expired: list[tuple[K, V]] = []
        while heap and heap[0][0] <= now:
            expires, key = heapq.heappop(heap)
            node = data.get(key)
            if node is not None and node.expires == expires:
                expired.append((key, node.value))
                self._drop(node, Eviction.EXPIRED)
        if len(heap) > 2 * len(data) + 64:  # mostly places of items gone: rebuilt
            self._expiry = [(node.expires, key) for key, node in data.items()]
            heapq.heapify(self._expiry)
        return expired

    def clear(self) -> None:
        self._data.clear()
        self._ghost.clear()
        self._small.clear()
        self._main.clear()
        self._expiry.clear()
        self._currsize = self._small_size = self._main_count = self._dead = 0

    def _evict(self, protect: _Node[K, V] | None = None) -> tuple[K, V] | None:
        """Drop one item by the policy, never ``protect``; None when only it is left."""
        small, main, data = self._small, self._main, self._data
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
            node = queue.popleft()
            if data.get(node.key) is not node:
                self._dead -= 1
                continue  # the place of a key dropped since
            if node is protect:
                queue.append(node)
                met[from_small] += 1
                continue
            reads = node.reads
            if from_small and reads:  # read while new: it stays, in main
                node.reads = 0
                node.main = True
                self._small_size -= node.size
                self._main_count += 1
                main.append(node)
                met[True] = met[False] = 0  # others changed: ``protect`` may not be alone
                continue
            if not from_small and reads:  # read since last looked at: once more round
                node.reads = reads - 1
                main.append(node)
                met[True] = met[False] = 0
                continue
            expired = node.expires <= self.timer()
            value = node.value
            self._drop(node, Eviction.EXPIRED if expired else Eviction.SIZE, placed=False)
            if from_small and not expired:
                self._ghost[hash(node.key)] = None
                while len(self._ghost) > max(1, len(data)):
                    self._ghost.popitem(last=False)
            return node.key, value

    def _small_full(self) -> bool:
        """Does small hold its share of the store, by bytes or by count?"""
        if self._small_size * SMALL_SHARE >= self._maxsize:
            return True
        small = len(self._data) - self._main_count
        return self._maxcount is not None and small * SMALL_SHARE >= self._maxcount

    def _drop(self, node: _Node[K, V], reason: Eviction, *, placed: bool = True) -> None:
        self._on_drop(self._forget(node, placed=placed), reason)

    def _forget(self, node: _Node[K, V], *, placed: bool = True) -> V:
        """Take ``node`` out; ``placed``: its place is still in a queue (not being evicted)."""
        data = self._data
        del data[node.key]
        value = node.value
        # Its places in the queues and the heap outlive it until they are passed: they must not
        # keep its value alive (a dead place is one whose node is no longer the key's).
        del node.value
        if node.main:
            self._main_count -= 1
        else:
            self._small_size -= node.size
        self._currsize -= node.size
        if placed:
            self._dead += 1
            # A store under its budget evicts nothing, and nothing else passes the queues:
            # keys dropped and stored again (invalidated, rewritten) would grow them for ever.
            if self._dead > len(data) + 64:
                self._small = deque(n for n in self._small if data.get(n.key) is n)
                self._main = deque(n for n in self._main if data.get(n.key) is n)
                self._dead = 0
        return value
