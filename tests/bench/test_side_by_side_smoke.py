"""The side-by-side benchmark runs end to end: ``python -m bench.side_by_side --quick``.

No timing is asserted: a smoke run measures nothing worth comparing. What is checked is that the
report comes out with a row for every target and workload, and that every figure in it parses.
cachecar and the two bare aiohttp handlers are always in it; nginx and Varnish when they are
installed (the command installs wrk, nginx and varnish itself when it runs as root). In CI
(CI=true) a missing tool is a failure, not a skip.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from bench import peers
from bench.results import BEGIN, END

REPO = Path(__file__).resolve().parents[2]
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
_NUMBER = re.compile(r"^[\d,]+(\.\d+)?$")
_LATENCY = re.compile(r"^[\d,]+(\.\d+)? (µs|ms)$")
_PERCENT = re.compile(r"^\d+\.\d%")
_RATIO = re.compile(r"^\d+\.\d\dx$")


def _rows(report: str, heading: str) -> dict[str, list[str]]:
    """The table under ``heading``: its rows by their first cell that is not a workload title."""
    section = report.split(heading, 1)[1].split("\n####", 1)[0]
    rows: dict[str, list[str]] = {}
    lines = [line for line in section.splitlines() if line.startswith("| ")]
    for line in lines[2:]:  # past the header and the alignment row
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[" / ".join(cells[:2]) if cells[0].startswith("(") else cells[0]] = cells
    return rows


def _expect(cell: str, pattern: re.Pattern[str], where: str) -> None:
    assert pattern.match(cell), f"{where}: {cell!r} does not parse"


@pytest.mark.redis
@pytest.mark.timeout(240)
def test_the_quick_run_reports_every_target_and_workload(redis_url: str, tmp_path: Path) -> None:
    if peers.find("wrk") is None and os.geteuid() != 0:
        message = "wrk is not installed and cannot be installed without root: apt-get install wrk"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message + "; CI fails here")
    doc = tmp_path / "benchmarks.md"
    doc.write_text(
        f"# Benchmarks\n\nbefore\n\n{BEGIN}\nold figures\n{END}\n\n## Write-behind\n\nkept\n"
    )

    done = subprocess.run(
        [sys.executable, "-m", "bench.side_by_side", "--quick", "--write", str(doc)],
        cwd=REPO,
        env={**os.environ, "REDIS_URL": redis_url},
        capture_output=True,
        text=True,
        timeout=200,
        check=False,
    )

    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    report = done.stdout
    # Looked for after the run: the command may have installed them.
    nginx_in = IN_CI or peers.find("nginx") is not None
    varnish_in = IN_CI or peers.find("varnishd") is not None
    if IN_CI:
        assert "- skipped:" not in report, report
    elif not (nginx_in and varnish_in):
        assert "- skipped:" in report, f"a missing peer must be named in the report:\n{report}"
    caches = ["cachecar", *(["nginx"] if nginx_in else []), *(["varnish"] if varnish_in else [])]

    table = _rows(report, "#### Throughput and latency")
    expected = [
        *(f"(a) L1 hit, one hot key / {t}" for t in [*caches, "aiohttp dict"]),
        *(f"(b) L1 hit, warm keys / {t}" for t in [*caches, "aiohttp dict"]),
        "(c) L2 hit / cachecar, L1 off",
        "(c) L2 hit / aiohttp + Redis GET",
        "(d) Zipf(0.99), cache = 10% of keys / cachecar, L1 only",
        "(d) Zipf(0.99), cache = 10% of keys / cachecar, L1 + L2",
        *(
            f"(d) Zipf(0.99), cache = 10% of keys / {t}"
            for t in [
                *(["nginx", "nginx, same entry count"] if nginx_in else []),
                *(["varnish", "varnish, same entry count"] if varnish_in else []),
            ]
        ),
        *(
            f"{workload} / {t}"
            for workload in (
                "(h) 75% warm keys, 25% keys not read before",
                "(i) every read a key not read before",
            )
            for t in [
                "cachecar, L1 only",
                "cachecar, L1 + L2",
                *(["nginx"] if nginx_in else []),
                *(["varnish"] if varnish_in else []),
            ]
        ),
    ]
    assert sorted(table) == sorted(expected), report
    # (i) reads each key once: a hit there would be a key read twice, not a miss measured.
    for tiers in ("L1 only", "L1 + L2"):
        misses = table[f"(i) every read a key not read before / cachecar, {tiers}"]
        assert misses[5].startswith("0.0% "), misses
    for name, cells in table.items():
        _expect(cells[2], _NUMBER, f"{name} req/s")
        _expect(cells[3], _LATENCY, f"{name} p50")
        _expect(cells[4], _LATENCY, f"{name} p99")
        if "aiohttp" not in name:
            _expect(cells[5], _PERCENT, f"{name} hit ratio")
            _expect(cells[6], _NUMBER, f"{name} origin requests")
        assert cells[7] == "0", f"{name}: {cells[7]} wrk errors\n{report}"

    unloaded = _rows(report, "#### Unloaded latency")
    assert sorted(unloaded) == sorted([*caches, "aiohttp dict"]), report
    for name, cells in unloaded.items():
        _expect(cells[2], _LATENCY, f"unloaded {name} p50")
        _expect(cells[4], _RATIO, f"unloaded {name} ratio")

    stampede = _rows(report, "#### Stampede")
    assert sorted(stampede) == sorted(caches), report
    for cells in stampede.values():
        per_key = [int(n) for n in cells[2].split(", ")]
        assert len(per_key) == int(cells[1]), cells
        assert min(per_key) >= 1, cells

    writes = _rows(report, "#### Writes")
    assert sorted(writes) == ["write-behind", "write-through"], report
    for name, cells in writes.items():
        _expect(cells[1], _NUMBER, f"{name} PUTs")
        _expect(cells[5], _NUMBER, f"{name} origin writes")
    assert "flushed by the stop" in report, report

    memory = _rows(report, "#### L1 memory")
    assert len(memory) == 1, report
    _expect(next(iter(memory.values()))[7], re.compile(r"^-?\d+\.\d\d$"), "memory ratio")

    ratios = report.split("#### cachecar as a ratio to each peer", 1)[1].split("\n####", 1)[0]
    assert re.search(
        r"\(a\) L1 hit, one hot key, cachecar: req/s = .*\d\.\d\dx aiohttp dict", ratios
    )
    assert re.search(
        r"\(c\) L2 hit, cachecar, L1 off: req/s = \d+\.\d\dx aiohttp \+ Redis GET", ratios
    )
    verdicts = _rows(report, "#### The issue's targets")
    assert len(verdicts) >= 8, report

    # --write replaced what was between the markers and kept the rest of the file.
    written = doc.read_text()
    assert "old figures" not in written
    assert written.startswith("# Benchmarks\n\nbefore\n\n" + BEGIN), written[:300]
    assert written.endswith(f"{END}\n\n## Write-behind\n\nkept\n"), written[-300:]
    assert "#### Throughput and latency" in written

    # The run's Redis keys are gone.
    prefix = re.search(r"deleted [\d,]+ Redis keys under '([^']+)'", done.stderr)
    assert prefix is not None, done.stderr
    with redis.Redis.from_url(redis_url) as client:
        assert list(client.scan_iter(match=prefix[1] + "*", count=1000)) == []


def test_some_workloads_can_be_run_but_not_written_to_the_docs(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from bench.side_by_side import parse_args

    params, _, _ = parse_args(["--workloads", "memory, l2", "--quick"])
    assert params.workloads == ("l2", "memory")  # in the order of a whole run
    for argv, message in (
        (["--workloads", "l2,nothing"], "unknown workloads nothing"),
        (["--workloads", ","], "unknown workloads (none)"),
        (["--workloads", "l2", "--write", "docs/benchmarks.md"], "--write needs every workload"),
    ):
        with pytest.raises(SystemExit):
            parse_args(argv)
        assert message in capsys.readouterr().err
