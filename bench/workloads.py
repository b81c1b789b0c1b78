"""The side-by-side workloads, each a function of the ``Harness``.

hits    (a) L1 hit, one hot key (and unloaded, wrk -c1); (b) L1 hit, warm keys; (e) the
        stampede: cachecar, nginx, varnish, aiohttp dict, each started once
l2      (c) L2 hit: cachecar with nothing stored in L1 on the route; aiohttp + Redis GET
zipf    (d) Zipf(0.99) with a cache of 10% of the keys, one byte budget for all
mix     (h) 75% reads of warm keys, 25% of keys not read before; (i) every read a key not read
        before: what a miss costs, with no L2 and with Redis
writes  (f) write-behind beside write-through on 100 hot keys; the flush rate
memory  (g) cachecar's RSS before and after filling L1
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from pathlib import Path
from typing import Any

from bench import peers, results, wrk
from bench import stampede as stampede_client
from bench import write_behind as write_behind_bench
from bench.harness import HOT, WAIT_LIMIT, Harness, progress
from bench.processes import until
from bench.results import Memory, Stampede, Writes
from bench.targets import COLD, ITEMS, ITEMS_L2_ONLY, WRITES, Target

ZIPF_EXPONENT = 0.99
CACHED_SHARE = 0.10  # (d): the share of the keys that the cache budget holds
NGINX_TRIM_LIMIT = 30.0  # seconds nginx's cache manager gets to bring a cache to max_size
CACHE_HEADER = {"cachecar": "X-Cache", "nginx": "X-Cache-Status", "varnish": "X-Cache"}


async def hits(h: Harness) -> None:
    """(a), the unloaded latency, (b) and (e): each target started once, measured in turn."""
    launch = h.launch()
    wanted = h.params.targets
    starting: list[Any] = []
    if "cachecar" in wanted:
        starting.append(launch.cachecar("cachecar", routes=ITEMS + COLD))
    if "nginx" in wanted and peers.NGINX.program in h.tools:
        starting.append(launch.nginx("nginx", 1 << 30))
    if "varnish" in wanted and peers.VARNISH.program in h.tools:
        starting.append(launch.varnish("varnish", 256 << 20))
    if "aiohttp" in wanted:
        starting.append(launch.bare_dict("aiohttp dict", h.params.warm_keys))
    targets: list[Target] = list(await asyncio.gather(*starting))
    for target in targets:
        progress(f"(a) L1 hit, one hot key: {target.name}")
        await h.probe(target, HOT, "hot")
        await h.measure(target, "l1-hot", h.script("one", wrk.one_path()), path=HOT)
        await h.measure(
            target,
            "unloaded",
            h.script("one", wrk.one_path()),
            path=HOT,
            connections=1,
            seconds=h.params.unloaded,
        )
        progress(f"(b) L1 hit, {h.params.warm_keys:,} warm keys: {target.name}")
        if target.kind != "bare":
            await h.fill(target, h.params.warm_keys)
        await h.measure(
            target, "l1-warm", h.script("warm", wrk.uniform("/items/", h.params.warm_keys))
        )
        if target.kind == "cachecar":
            entries, held = await h.l1(target)
            h.entry_size = held // entries if entries else 0
        if target.kind == "nginx" and target.directory is not None:
            h.nginx_file = _nginx_file_bytes(target.directory)
        if target.kind in CACHE_HEADER:
            await stampede(h, target)
    await h.stop(targets)


async def stampede(h: Harness, target: Target) -> None:
    """(e): one burst per cold key; the origin's count for that key after each."""
    p = h.params
    progress(f"(e) stampede, {p.stampede} connections x {p.rounds} cold keys: {target.name}")
    result = Stampede(target.name, p.stampede)
    for n in range(p.rounds):
        path = h.cold(target.kind, n)
        await h.reset_origin()
        burst = await asyncio.to_thread(
            _pinned_burst,
            h.client_cpu,
            target.port,
            path,
            p.stampede,
            CACHE_HEADER[target.kind],
        )
        stats = await h.origin_stats()
        result.bursts.append((burst, int(stats["by_request"].get(f"GET {path}", 0))))
    h.report.stampedes.append(result)


async def l2(h: Harness) -> None:
    """(c): cachecar's L2 hit (filled through it first) beside one Redis GET in bare aiohttp."""
    launch = h.launch()
    starting: list[Any] = []
    if "cachecar" in h.params.targets:
        starting.append(launch.cachecar("cachecar, L1 off", routes=ITEMS_L2_ONLY))
    if "aiohttp" in h.params.targets:
        starting.append(launch.bare_redis("aiohttp + Redis GET", h.run_prefix + "bare:"))
    targets: list[Target] = list(await asyncio.gather(*starting))
    script = h.script("warm", wrk.uniform("/items/", h.params.warm_keys))
    for target in targets:
        progress(f"(c) L2 hit: {target.name}")
        if target.kind == "cachecar":
            await h.fill(target, h.params.warm_keys)
        else:
            await h.probe(target, HOT, "hot")
        await h.measure(target, "l2", script)
    await h.stop(targets)


async def zipf(h: Harness) -> None:
    """(d): every cache at one byte budget, the same requests; origin requests counted."""
    p = h.params
    cached = max(1, round(CACHED_SHARE * p.zipf_keys))
    entry = h.entry_size or wrk.BODY_SIZE + 2400  # about what L1 counts, when (b) did not run
    budget = cached * entry
    h.report.budget = results.Budget(p.zipf_keys, cached, entry, budget, h.nginx_file)
    launch = h.launch()
    starting: list[Any] = []
    nginx_sizes: dict[str, int] = {}  # max_size of each nginx
    if "cachecar" in p.targets:
        for name, l2 in (("cachecar, L1 only", False), ("cachecar, L1 + L2", True)):
            starting.append(
                launch.cachecar(name, routes=ITEMS, max_entries=cached, max_bytes=budget, l2=l2)
            )
    if "nginx" in p.targets and peers.NGINX.program in h.tools:
        nginx_sizes["nginx"] = budget
        if h.nginx_file:
            nginx_sizes["nginx, same entry count"] = cached * h.nginx_file
        starting.extend(launch.nginx(name, size) for name, size in nginx_sizes.items())
    if "varnish" in p.targets and peers.VARNISH.program in h.tools:
        starting.append(launch.varnish("varnish", budget))
    targets: list[Target] = list(await asyncio.gather(*starting))
    for target in targets:
        await _zipf_run(h, target, nginx_sizes.get(target.name))
    await h.stop(targets)
    # Varnish's -s malloc bounds the storage of bodies and headers, not its per-object
    # structures: at the budget it holds more entries than the budget's memory would. It runs
    # again with room for as many entries as cachecar's L1, by its own count of bytes an entry.
    varnish = h.report.find("zipf", "varnish")
    if varnish is not None and varnish.held:
        # By the storage it really had (varnishd refuses less than its smallest).
        had = max(budget, peers.VARNISH_SMALLEST)
        storage = max(cached * (had // varnish.held), peers.VARNISH_SMALLEST)
        again = await launch.varnish("varnish, same entry count", storage)
        await _zipf_run(h, again, None)
        await h.stop([again])


async def _zipf_run(h: Harness, target: Target, nginx_size: int | None) -> None:
    """(d) on one target: the fill, then the measured requests (``nginx_size``: an nginx's
    ``max_size``, waited for after the fill)."""
    p = h.params
    progress(f"(d) Zipf({ZIPF_EXPONENT}) over {p.zipf_keys:,} keys: {target.name}")
    # The same requests for every target, a fill and then the measured run, each a fixed
    # count: a faster target does not see more of the distribution.
    fill, fill_marker = _zipf_script(h, target, 1, p.zipf_fill)
    _, before = target.process.usage()
    await asyncio.to_thread(
        h.wrk.run,
        target.url + "/",
        fill,
        connections=p.connections,
        seconds=WAIT_LIMIT,
        log=h.directory / f"wrk-zipf-fill-{target.process.name}.log",
        stop_when=fill_marker,
    )
    note = ""
    # A smoke run does not wait the up to 10 s this takes.
    if nginx_size is not None and h.nginx_file and not p.quick:
        note = await _nginx_trimmed(h, target, nginx_size)
    script, marker = _zipf_script(h, target, 2, p.zipf_requests)
    found = await h.measure(target, "zipf", script, seconds=WAIT_LIMIT, stop_when=marker)
    found.held = await h.held(target)
    found.grown = target.process.usage()[1] - before
    found.sent = p.zipf_requests
    found.note = note


FRESH_SHARE = 0.25  # (h): the share of reads of keys not read before


async def mix(h: Harness) -> None:
    """(h) and (i): the warm keys read once through each target, then the mix, then misses
    only. The keys after the warm ones are split: the first quarter for the mix, the rest for
    the misses, so no target reads one of them twice (the hit ratio shows it if one did)."""
    p = h.params
    launch = h.launch()
    starting: list[Any] = []
    if "cachecar" in p.targets:
        for name, l2 in (("cachecar, L1 only", False), ("cachecar, L1 + L2", True)):
            starting.append(launch.cachecar(name, routes=ITEMS, l2=l2))
    if "nginx" in p.targets and peers.NGINX.program in h.tools:
        starting.append(launch.nginx("nginx", 1 << 30))
    if "varnish" in p.targets and peers.VARNISH.program in h.tools:
        starting.append(launch.varnish("varnish", 1 << 30))
    targets: list[Target] = list(await asyncio.gather(*starting))
    first, split, last = p.warm_keys, p.warm_keys + p.fresh_keys // 4, p.warm_keys + p.fresh_keys
    mixed = h.script("mix", wrk.fresh_mix("/items/", p.warm_keys, first, split, FRESH_SHARE))
    fresh = h.script("misses", wrk.fresh_mix("/items/", 0, split, last, 1.0))
    for target in targets:
        progress(f"(h) {1 - FRESH_SHARE:.0%} warm, {FRESH_SHARE:.0%} new keys: {target.name}")
        await h.fill(target, p.warm_keys)
        await h.measure(target, "mix", mixed)
        progress(f"(i) every read a key not read before: {target.name}")
        await h.measure(target, "misses", fresh)
    await h.stop(targets)


def _zipf_script(h: Harness, target: Target, seed: int, requests: int) -> tuple[Path, Path]:
    p = h.params
    marker = h.directory / f"zipf-{target.process.name}-{seed}"
    script = h.script(
        f"zipf-{seed}",
        wrk.zipf("/items/", p.zipf_keys, ZIPF_EXPONENT, seed, requests, marker),
    )
    return script, marker


async def _nginx_trimmed(h: Harness, target: Target, max_size: int) -> str:
    """Wait until nginx's cache manager has brought the cache back to ``max_size``: it looks
    every 10 s at most, so right after a fill nginx can hold far more than its budget."""
    if target.directory is None:
        return ""
    directory, limit = target.directory, max_size // h.nginx_file
    held = peers.nginx_entries(directory)
    started = time.monotonic()

    async def trimmed() -> bool:
        return peers.nginx_entries(directory) <= limit

    await until(
        trimmed,
        f"{target.name}'s cache manager to trim to max_size ({limit:,} files)",
        within=NGINX_TRIM_LIMIT,
        every=0.2,
        process=target.process,
    )
    return (
        f"{held:,} entries after the fill; measured once its cache manager had trimmed "
        f"them to {peers.nginx_entries(directory):,} ({time.monotonic() - started:.1f} s later)"
    )


async def writes(h: Harness) -> None:
    """(f): the same PUTs through a write-behind and a write-through route; then the flush rate
    of a piled-up queue, as bench.write_behind measures it (its own origin and proxy)."""
    if "cachecar" not in h.params.targets:
        return
    p = h.params
    target = await h.launch().cachecar("cachecar, writes", routes=WRITES)
    for mode, prefix in (("write-behind", "/wb/"), ("write-through", "/wt/")):
        progress(f"(f) {mode}, PUTs over {p.write_keys} keys")
        await h.reset_origin()
        before = await h.outcomes(target) or {}
        script = h.script(f"put-{mode}", wrk.puts_round_robin(prefix, p.write_keys))
        result = await asyncio.to_thread(
            h.wrk.run,
            target.url + "/",
            script,
            connections=p.connections,
            seconds=p.seconds,
            log=h.directory / f"wrk-{mode}.log",
        )
        started = time.monotonic()
        if mode == "write-behind":
            await h.queue_empties(target)
        drained = time.monotonic() - started
        stats = await h.origin_stats()
        origin_puts = sum(
            n for request, n in stats["by_request"].items() if request.startswith("PUT " + prefix)
        )
        # cachecar's count, not wrk's: a PUT still in flight when wrk stopped is taken too.
        taken = (await h.outcomes(target) or {}).get("write", 0) - before.get("write", 0)
        h.report.writes.append(Writes(mode, result, taken, origin_puts, drained))
    await h.stop([target])
    progress(f"(f) flush throughput: {p.distinct:,} writes to distinct keys (bench.write_behind)")
    workload = write_behind_bench.Bench(
        write_behind_bench.Params(1, 1, 1.0, p.distinct, p.latency),
        h.processes,
        h.directory,
        h.session,
    )
    await workload.start_origin()
    proxy = await workload.start_proxy(
        "flush-serve",
        h.redis_url,
        h.run_prefix + "flush:",
        write_behind_bench.PILE_UP_INTERVAL,
        write_behind_bench.PILE_UP_GRACE,
    )
    h.report.flush = await workload.flush_throughput(proxy, h.report.problems)


async def memory(h: Harness) -> None:
    """(g): RSS growth of cachecar while L1 fills to max_bytes, and of the same traffic through
    an L1 of max_bytes / 32 (what grows besides L1)."""
    if "cachecar" not in h.params.targets:
        return
    p = h.params
    fill = min(h.populated_keys(), math.ceil(1.25 * p.memory / max(1, h.entry_size or 3400)))
    # The same traffic through an L1 of 1/32 the size: what the process grows by besides L1.
    launch = h.launch()
    measured, small = await asyncio.gather(
        *(
            launch.cachecar(name, routes=ITEMS, max_entries=10_000_000, max_bytes=size, l2=False)
            for name, size in (
                ("cachecar, memory", p.memory),
                ("cachecar, small L1", p.memory // 32),
            )
        )
    )
    progress(f"(g) L1 memory: filling l1.max_bytes = {p.memory:,} bytes")
    grown = await _rss_growth(h, measured, fill)
    progress("(g) L1 memory: the same traffic, l1.max_bytes / 32")
    baseline = await _rss_growth(h, small, fill)
    h.report.memory = Memory(p.memory, fill, *grown, baseline=baseline[3] - baseline[2])


async def _rss_growth(h: Harness, target: Target, fill: int) -> tuple[int, int, int, int]:
    """L1 entries and bytes, and the RSS before and after reading ``fill`` keys once."""
    # Warm the code paths and the connection buffers first: they are not L1's.
    await asyncio.to_thread(
        h.wrk.run,
        target.url + HOT,
        h.script("one", wrk.one_path()),
        connections=h.params.connections,
        seconds=min(1.0, h.params.seconds),
        log=h.directory / f"wrk-memory-warm-{target.process.name}.log",
    )
    _, before = target.process.usage()
    await h.fill(target, fill)
    await asyncio.sleep(0.5)
    _, after = target.process.usage()
    entries, held = await h.l1(target)
    await h.stop([target])
    return entries, held, before, after


def _pinned_burst(
    cpu: int | None, port: int, path: str, connections: int, header: str
) -> stampede_client.Burst:
    """The stampede from this thread pinned to the client CPU (the servers have the other)."""
    if cpu is None or not hasattr(os, "sched_setaffinity"):
        return stampede_client.burst("127.0.0.1", port, path, connections, header, WAIT_LIMIT)
    allowed = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})  # 0: this thread only, a worker thread of asyncio's pool
    try:
        return stampede_client.burst("127.0.0.1", port, path, connections, header, WAIT_LIMIT)
    finally:
        os.sched_setaffinity(0, allowed)


def _nginx_file_bytes(directory: Path) -> int:
    """What nginx counts against max_size for one cached file: its size in whole blocks."""
    sizes = [
        (Path(root) / name).stat().st_blocks * 512
        for root, _, files in os.walk(directory / "cache")
        for name in files
    ]
    return round(sum(sizes) / len(sizes)) if sizes else 0
