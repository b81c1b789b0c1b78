"""The side-by-side report in markdown: the targets, then a table per workload, every cachecar
figure also a ratio to each peer of the same run."""

from __future__ import annotations

from collections import Counter

from bench import verdicts
from bench.machine import machine
from bench.peers import VARNISH_SMALLEST
from bench.results import WORKLOADS, Report, count, mib, misses, ms, per, ratio, write_saving
from bench.wrk import BODY_SIZE

SHOWN = 5  # log lines quoted


def render(report: Report) -> str:
    p = report.params
    versions = ", ".join(f"{name} {found}" for name, found in report.versions.items())
    lines = [
        f"Run of {report.started:%Y-%m-%d %H:%M} UTC, {report.seconds:.0f} s in all"
        f"{' (--quick: a smoke run, not a measurement)' if p.quick else ''}.",
        "",
        f"- machine: {machine()}",
        f"- pinning: {report.pinned}",
        f"- software: {versions}",
        f"- parameters: {p.seconds:g} s per measured run, {p.connections} connections (wrk -t1), "
        f"{BODY_SIZE}-byte JSON values, origin latency {p.latency}; {p.warm_keys:,} warm keys; "
        f"Zipf: {p.zipf_keys:,} keys, {p.zipf_fill:,} requests to fill and "
        f"{p.zipf_requests:,} measured; stampede {p.stampede} connections x {p.rounds} cold keys",
    ]
    lines += [f"- skipped: {line}" for line in report.skipped]
    lines += ["", *verdicts.table(report), "", *_throughput(report), "", *_ratios(report)]
    lines += ["", *_unloaded(report), "", *_zipf(report), "", *_stampedes(report)]
    lines += ["", *_writes(report), "", *_memory(report), ""]
    if report.troubles:
        shown = "; ".join(
            f"{line} ({n}x)" if n > 1 else line for line, n in report.troubles.most_common(SHOWN)
        )
        lines += [
            f"Logged by the processes: {report.troubles.total():,} warnings or errors, "
            f"e.g. {shown}",
            "",
        ]
    if report.problems:
        lines += ["**FAILED**:", *(f"- {problem}" for problem in report.problems), ""]
    return "\n".join(lines)


def _throughput(report: Report) -> list[str]:
    lines = [
        "#### Throughput and latency",
        "",
        "| workload | target | req/s | p50 | p99 | hit ratio | origin requests | errors "
        "| target CPU | wrk CPU | rest CPU |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for workload, title in WORKLOADS.items():
        for run in report.of(workload):
            hit = "—" if run.hit_ratio is None else f"{run.hit_ratio:.1%}"
            if run.hit_detail:
                hit += f" ({run.hit_detail})"
            lines.append(
                f"| {title} | {run.target} | {run.wrk.rate:,.0f} | {ms(run.wrk.p50_ms)} "
                f"| {ms(run.wrk.p99_ms)} | {hit} | {count(run.origin)} | {run.wrk.errors:,} "
                f"| {run.server_cpu:.0%} | {run.wrk.cpu:.0%} | {run.rest_cpu:.0%} |"
            )
    lines += [
        "",
        "Hit ratio: cachecar's from its `/admin/stats` (L1 and L2 hits over reads); nginx's and "
        "Varnish's as 1 - origin GETs ÷ requests. CPU, in CPU seconds per second of the run: "
        "the target's (all its processes), wrk's, and the rest of the machine's (the origin, "
        "Redis, and anything else running). A target well below 100% with wrk near 100% was "
        "bound by the load generator; a large rest CPU on an L1 workload means something else "
        "took CPU time from the run.",
    ]
    return lines


def _ratios(report: Report) -> list[str]:
    lines = ["#### cachecar as a ratio to each peer, same run", ""]
    for workload, title in WORKLOADS.items():
        runs = report.of(workload)
        peers = [run for run in runs if run.kind != "cachecar"]
        for mine in (run for run in runs if run.kind == "cachecar"):
            if not peers:
                continue
            rates = ", ".join(
                f"{ratio(mine.wrk.rate, peer.wrk.rate)} {peer.target}" for peer in peers
            )
            p50 = ", ".join(
                f"{ratio(mine.wrk.p50_ms, peer.wrk.p50_ms)} {peer.target}" for peer in peers
            )
            p99 = ", ".join(
                f"{ratio(mine.wrk.p99_ms, peer.wrk.p99_ms)} {peer.target}" for peer in peers
            )
            lines.append(f"- {title}, {mine.target}: req/s = {rates}; p50 = {p50}; p99 = {p99}")
    if len(lines) == 2:
        lines.append("- no peer was measured beside cachecar")
    return lines


def _unloaded(report: Report) -> list[str]:
    runs = report.of("unloaded")
    if not runs:
        return []
    mine = next((run for run in runs if run.kind == "cachecar"), None)
    lines = [
        "#### Unloaded latency, L1 hit (one hot key, wrk -t1 -c1)",
        "",
        "| target | req/s | p50 | p99 | cachecar p50 ÷ this |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for run in runs:
        against = ratio(mine.wrk.p50_ms, run.wrk.p50_ms) if mine is not None else "—"
        lines.append(
            f"| {run.target} | {run.wrk.rate:,.0f} | {ms(run.wrk.p50_ms)} | {ms(run.wrk.p99_ms)} "
            f"| {against} |"
        )
    return lines


def _zipf(report: Report) -> list[str]:
    budget, runs = report.budget, report.of("zipf")
    if budget is None or not runs:
        return []
    fit = (
        f"; nginx counts each cached file in whole filesystem blocks ({budget.nginx_file_bytes:,} "
        f"bytes here), so that budget is about {budget.bytes // budget.nginx_file_bytes:,} "
        'entries to it, and the row "nginx, same entry count" gives it '
        f"{budget.entries:,} x {budget.nginx_file_bytes:,} bytes instead"
        if budget.nginx_file_bytes
        else ""
    )
    small = " (its smallest)" if budget.bytes < VARNISH_SMALLEST else ""
    base = next((run for run in runs if run.target == "cachecar, L1 only"), None)
    fill, requests = report.params.zipf_fill, report.params.zipf_requests
    lines = [
        f"#### Zipf(0.99) over {budget.keys:,} keys at one memory budget",
        "",
        f"Budget: {budget.entries:,} entries (10% of the keys) x {budget.entry_bytes:,} bytes "
        f"(what cachecar's L1 counts for one of these entries: the memory it takes, its body, "
        f"header values and objects, the rendered response head and L1's bookkeeping) = "
        f"**{budget.bytes:,} bytes**: cachecar `l1.max_bytes` = that and "
        f"`l1.max_entries` = {budget.entries:,}; nginx `max_size` = that; Varnish "
        f"`-s malloc,{max(budget.bytes, VARNISH_SMALLEST)}`{small}{fit}. Every target gets the "
        f"same {fill:,} requests to fill (enough for every cache's steady state: after "
        "30,000, a quarter of the next requests would be keys never read before, a miss in any "
        f"cache), then the same {requests:,} others, measured; the origin's `/_stats` counts "
        "what reached it during the measured run. Each counts the budget its own way: "
        "cachecar every byte its L1 takes, Varnish the storage of bodies and headers (its "
        "per-object structures come on top), nginx the cache files on disk. The memory column "
        "is what each target's processes grew by from before the fill to after the run (nginx's "
        "files live in the kernel's page cache, and cachecar L1 + L2's Redis in its own "
        'process, which it does not include). "varnish, same entry count" is Varnish again, '
        f"its storage {budget.entries:,} times the bytes an entry took it at the budget.",
        "",
        "| target | entries held after | requests sent | origin requests | per 1,000 requests "
        "| req/s | memory grown | cachecar L1 only ÷ this, per 1,000 |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for run in runs:
        per = misses(run)
        lines.append(
            f"| {run.target} | {count(run.held)} | {count(run.sent)} | {count(run.origin)} "
            f"| {'—' if per is None else f'{per:.1f}'} | {run.wrk.rate:,.0f} "
            f"| {'—' if run.grown is None else mib(run.grown)} "
            f"| {ratio(misses(base), per)} |"
        )
    notes = [f"{run.target}: {run.note}" for run in runs if run.note]
    if notes:
        lines += [
            "",
            "nginx enforces max_size from its cache manager process, which looks at the cache "
            "every 10 s at most (nginx's defaults, kept): a cache that grew past it stays larger "
            "until then, which the entries held after the run show. " + "; ".join(notes) + ".",
        ]
    return lines


def _stampedes(report: Report) -> list[str]:
    if not report.stampedes:
        return []
    lines = [
        f"#### Stampede: {report.params.stampede} connections ask for one cold key at once",
        "",
        "| target | cold keys | origin requests per key | answers by cache status "
        "| non-200 answers | writes took | all answered in |",
        "| --- | ---: | --- | --- | ---: | ---: | ---: |",
    ]
    for found in report.stampedes:
        per_key = [origin for _, origin in found.bursts]
        statuses: Counter[str] = Counter()
        errors = 0
        for burst, _ in found.bursts:
            statuses.update(burst.cache)
            errors += sum(n for status, n in burst.statuses.items() if status != 200)
        shown = ", ".join(f"{name} {n:,}" for name, n in statuses.most_common())
        writes = max((burst.write_seconds for burst, _ in found.bursts), default=0.0)
        slowest = max((burst.seconds for burst, _ in found.bursts), default=0.0)
        lines.append(
            f"| {found.target} | {len(per_key)} | {', '.join(str(n) for n in per_key)} | {shown} "
            f"| {errors:,} | {ms(writes * 1000)} | {ms(slowest * 1000)} |"
        )
    lines += [
        "",
        '"writes took": from the first request written to the last, all connections already '
        "open: the window in which the requests arrive.",
    ]
    return lines


def _writes(report: Report) -> list[str]:
    if not report.writes:
        return []
    lines = [
        f"#### Writes: PUTs round-robin over {report.params.write_keys} hot keys (cachecar only)",
        "",
        "| mode | PUTs taken | req/s | p50 | p99 | origin writes | origin writes per PUT |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for found in report.writes:
        lines.append(
            f"| {found.mode} | {found.taken:,} | {found.wrk.rate:,.0f} "
            f"| {ms(found.wrk.p50_ms)} | {ms(found.wrk.p99_ms)} | {found.origin_writes:,} "
            f"| {per(found.origin_writes, found.taken)} |"
        )
    saving = write_saving(report)
    if saving is not None:
        lines += [
            "",
            f"Write-behind sends **{saving:,.1f}x fewer** origin writes per PUT than "
            "write-through.",
        ]
    if report.flush is not None:
        f = report.flush
        lines += [
            "",
            f"Flush throughput (bench.write_behind's workload B, its own origin and proxy, not "
            f"pinned): {f.writes:,} writes to distinct keys queued, then flushed by the stop in "
            f"{f.drain_seconds:.2f} s: **{f.writes / f.drain_seconds:,.0f} writes/s** "
            f"(batch_size {f.batch_size}, concurrency {f.concurrency}).",
        ]
    return lines


def _memory(report: Report) -> list[str]:
    m = report.memory
    if m is None:
        return []
    per_entry = f"{m.growth / m.entries:,.0f} bytes" if m.entries else "—"
    return [
        "#### L1 memory (cachecar, L1 only)",
        "",
        "| l1.max_bytes | keys read | L1 entries | L1 bytes (its count) | RSS before | RSS after "
        "| RSS growth | growth ÷ max_bytes | growth per entry |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| {mib(m.max_bytes)} | {m.filled:,} | {m.entries:,} | {mib(m.l1_bytes)} "
        f"| {mib(m.rss_before)} | {mib(m.rss_after)} | {mib(m.growth)} "
        f"| {m.growth / m.max_bytes:.2f} | {per_entry} |",
        "",
        "RSS before: after start and 1 s of hot-key traffic; after: every key read once (L1 "
        "full, then evicting), half a second later. The same traffic through an L1 of "
        f"max_bytes / 32 grew the process by {mib(m.baseline)}: about that much of the growth "
        "is not L1's.",
    ]
