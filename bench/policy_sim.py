"""Which eviction policy L1 should have, chosen by simulation: the hit ratio of LRU (L1's today,
through cachetools), SIEVE (NSDI '24), S3-FIFO (SOSP '23) and W-TinyLFU (Caffeine's) at one cache
size, beside the optimum, on three shapes of trace:

    zipf    Zipf(0.99) over K keys, independent requests (the side-by-side run's workload (d))
    scan    the same Zipf, with one request in four the next key of a sweep over keys read
            once each (a batch job or a crawler walking past the hot set)
    shift   Zipf(0.99) whose popularity is dealt anew every fifth of the trace (what is hot
            changes: a new day, a new release)

The cache holds ``share`` of the Zipf's keys; every entry counts one (the benchmark's values are
all one size, and L1 bounds bytes and entries alike). The optimum is Belady's MIN, which evicts
the key used furthest in the future: no policy that does not know the future does better.
On ``zipf`` the static optimum for independent requests (the ``share`` most popular keys kept,
nothing else ever admitted) is given too.

python -m bench.policy_sim [--keys 100000] [--requests 1000000] [--share 0.1] [--seed 1]
"""

from __future__ import annotations

import argparse
import bisect
import heapq
import itertools
import random
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

ZIPF_EXPONENT = 0.99
SCAN_SHARE = 0.25
SHIFTS = 5


class Policy:
    """A cache of ``size`` entries: ``access(key)`` is True on a hit; a miss admits the key
    (or, for an admission policy, may not)."""

    name = ""

    def __init__(self, size: int) -> None:
        self.size = size

    def access(self, key: int) -> bool:
        raise NotImplementedError


class LRU(Policy):
    name = "LRU"

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self._held: OrderedDict[int, None] = OrderedDict()

    def access(self, key: int) -> bool:
        held = self._held
        if key in held:
            held.move_to_end(key)
            return True
        if len(held) >= self.size:
            held.popitem(last=False)
        held[key] = None
        return False


class Sieve(Policy):
    """One FIFO queue and a visited bit; the hand walks from the oldest towards the newest,
    clearing bits, and evicts the first key it finds unvisited (Zhang et al., NSDI '24)."""

    name = "SIEVE"

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self._visited: dict[int, bool] = {}  # insertion order: oldest first
        self._order: list[int | None] = []  # the queue, oldest first; None: gone
        self._hand = 0

    def access(self, key: int) -> bool:
        if key in self._visited:
            self._visited[key] = True
            return True
        if len(self._visited) >= self.size:
            self._evict()
        self._visited[key] = False
        self._order.append(key)
        return False

    def _evict(self) -> None:
        while True:
            if self._hand >= len(self._order):
                # Past the newest: survivors keep their order, the hand starts at the oldest.
                self._order = [key for key in self._order if key is not None]
                self._hand = 0
            order = self._order
            key = order[self._hand]
            if key is None:
                self._hand += 1
                continue
            if self._visited[key]:
                self._visited[key] = False
                self._hand += 1
                continue
            del self._visited[key]
            order[self._hand] = None
            self._hand += 1
            return


class S3FIFO(Policy):
    """A small FIFO (10 %) for new keys, a main FIFO for keys seen again, and a ghost FIFO of
    keys recently evicted from the small one (Yang et al., SOSP '23)."""

    name = "S3-FIFO"

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self._small_size = max(1, size // 10)
        self._small: deque[int] = deque()
        self._main: deque[int] = deque()
        self._ghost: OrderedDict[int, None] = OrderedDict()
        self._freq: dict[int, int] = {}  # keys held, in small or main
        self._in_main: set[int] = set()

    def access(self, key: int) -> bool:
        freq = self._freq
        if key in freq:
            freq[key] = min(3, freq[key] + 1)
            return True
        if len(freq) >= self.size:
            self._evict()
        freq[key] = 0
        if key in self._ghost:
            del self._ghost[key]
            self._main.append(key)
            self._in_main.add(key)
        else:
            self._small.append(key)
        return False

    def _evict(self) -> None:
        if len(self._small) >= self._small_size or not self._main:
            self._evict_small()
        else:
            self._evict_main()

    def _evict_small(self) -> None:
        while self._small:
            key = self._small.popleft()
            if self._freq[key] > 0:  # seen again while in small: it goes to main
                self._freq[key] = 0
                self._main.append(key)
                self._in_main.add(key)
                if len(self._main) > self.size - self._small_size:
                    self._evict_main()
                    return
                continue
            del self._freq[key]
            self._ghost[key] = None
            if len(self._ghost) > self.size - self._small_size:
                self._ghost.popitem(last=False)
            return
        self._evict_main()

    def _evict_main(self) -> None:
        while self._main:
            key = self._main.popleft()
            if self._freq[key] > 0:
                self._freq[key] -= 1
                self._main.append(key)
                continue
            del self._freq[key]
            self._in_main.discard(key)
            return


class WTinyLFU(Policy):
    """A window LRU (1 %) in front of a segmented LRU (probation 20 %, protected 80 %); a key
    leaving the window enters only if a count-min sketch of recent frequencies says it is
    used more than the key it would evict (Einziger et al., TOS '17; Caffeine)."""

    name = "W-TinyLFU"

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self._window_size = max(1, size // 100)
        main = size - self._window_size
        self._protected_size = max(1, main * 8 // 10)
        self._window: OrderedDict[int, None] = OrderedDict()
        self._probation: OrderedDict[int, None] = OrderedDict()
        self._protected: OrderedDict[int, None] = OrderedDict()
        width = 1
        while width < size * 4:
            width *= 2
        self._mask = width - 1
        self._rows = [[0] * width for _ in range(4)]
        self._seeds = (0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D, 0x27D4EB2F)
        self._added = 0
        self._reset_at = size * 10

    def access(self, key: int) -> bool:
        self._count(key)
        if key in self._window:
            self._window.move_to_end(key)
            return True
        if key in self._protected:
            self._protected.move_to_end(key)
            return True
        if key in self._probation:
            del self._probation[key]
            self._protected[key] = None
            if len(self._protected) > self._protected_size:
                demoted, _ = self._protected.popitem(last=False)
                self._probation[demoted] = None
            return True
        self._window[key] = None
        if len(self._window) > self._window_size:
            candidate, _ = self._window.popitem(last=False)
            self._admit(candidate)
        return False

    def _admit(self, candidate: int) -> None:
        held = len(self._probation) + len(self._protected)
        if held < self.size - self._window_size:
            self._probation[candidate] = None
            return
        victim = next(iter(self._probation)) if self._probation else None
        if victim is None:
            return
        if self._estimate(candidate) > self._estimate(victim):
            del self._probation[victim]
            self._probation[candidate] = None

    def _slots(self, key: int) -> Iterator[tuple[list[int], int]]:
        for row, seed in zip(self._rows, self._seeds, strict=True):
            yield row, ((key * seed) >> 7 ^ key * 0x2545F491) & self._mask

    def _count(self, key: int) -> None:
        for row, slot in self._slots(key):
            if row[slot] < 15:
                row[slot] += 1
        self._added += 1
        if self._added >= self._reset_at:  # ageing: every count halved
            self._added //= 2
            for row in self._rows:
                row[:] = [count >> 1 for count in row]

    def _estimate(self, key: int) -> int:
        return min(row[slot] for row, slot in self._slots(key))


POLICIES: tuple[Callable[[int], Policy], ...] = (LRU, Sieve, S3FIFO, WTinyLFU)


def belady_hits(trace: Sequence[int], size: int) -> int:
    """Hits of Belady's MIN: on a miss with the cache full, evict the key used furthest ahead."""
    never = len(trace)
    following = [never] * len(trace)
    seen: dict[int, int] = {}
    for i in range(len(trace) - 1, -1, -1):
        following[i] = seen.get(trace[i], never)
        seen[trace[i]] = i
    held: dict[int, int] = {}  # key -> the index of its next use
    heap: list[tuple[int, int]] = []  # (-next use, key), stale rows skipped
    hits = 0
    for i, key in enumerate(trace):
        upcoming = following[i]
        if key in held:
            hits += 1
        elif len(held) >= size:
            while True:
                negative, victim = heapq.heappop(heap)
                if held.get(victim) == -negative:
                    del held[victim]
                    break
        held[key] = upcoming
        heapq.heappush(heap, (-upcoming, key))
    return hits


def zipf_sampler(keys: int, rng: random.Random) -> Callable[[], int]:
    weights = list(itertools.accumulate(1 / (rank + 1) ** ZIPF_EXPONENT for rank in range(keys)))
    total = weights[-1]
    return lambda: bisect.bisect_left(weights, rng.random() * total)


def traces(keys: int, requests: int, seed: int) -> dict[str, list[int]]:
    rng = random.Random(seed)
    draw = zipf_sampler(keys, rng)
    zipf = [draw() for _ in range(requests)]
    sweep = itertools.count(keys)  # keys past the Zipf's, each read once
    scan = [next(sweep) if rng.random() < SCAN_SHARE else draw() for _ in range(requests)]
    shift: list[int] = []
    span = requests // SHIFTS
    for _ in range(SHIFTS):
        ranking = list(range(keys))
        rng.shuffle(ranking)
        shift += (ranking[draw()] for _ in range(span))
    return {"zipf": zipf, "scan": scan, "shift": shift}


@dataclass(frozen=True)
class Row:
    trace: str
    requests: int
    hits: dict[str, int]  # by policy, the optimum's as "optimum"
    static: int | None = None  # the most popular keys kept (zipf only)


def simulate(keys: int, requests: int, share: float, seed: int) -> list[Row]:
    size = max(1, round(keys * share))
    rows = []
    for name, trace in traces(keys, requests, seed).items():
        hits = {}
        for make in POLICIES:
            policy = make(size)
            hits[policy.name] = sum(policy.access(key) for key in trace)
        hits["optimum"] = belady_hits(trace, size)
        static = None
        if name == "zipf":
            counts = Counter(trace)
            # Kept from the start, never evicted: each of their requests but the first hits.
            static = sum(n - 1 for _, n in counts.most_common(size))
        rows.append(Row(name, len(trace), hits, static))
    return rows


def render(rows: list[Row], keys: int, share: float) -> str:
    names = [make(1).name for make in POLICIES]
    lines = [
        f"#### Eviction policies: hit ratio with room for {share:.0%} of {keys:,} keys "
        f"(origin requests per 1,000 reads in brackets)",
        "",
        "| trace | " + " | ".join(names) + " | optimum (Belady) |",
        "| --- |" + " ---: |" * (len(names) + 1),
    ]
    for row in rows:
        ratios = [row.hits[name] / row.requests for name in (*names, "optimum")]
        cells = [f"{ratio:.1%} ({1000 * (1 - ratio):.0f})" for ratio in ratios]
        lines.append(f"| {row.trace} | " + " | ".join(cells) + " |")
    static = next((row for row in rows if row.static is not None), None)
    if static is not None and static.static is not None:
        lines += [
            "",
            f"On zipf, keeping the {share:.0%} most popular keys from the start (the optimum for "
            f"independent requests) hits {static.static / static.requests:.1%}.",
        ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.policy_sim", description=__doc__)
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=1_000_000)
    parser.add_argument("--share", type=float, default=0.1, help="of the keys the cache holds")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    rows = simulate(args.keys, args.requests, args.share, args.seed)
    print(render(rows, args.keys, args.share))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
