"""The queue-on-masters benchmark runs end to end: ``python -m bench.queue_masters --quick``
starts its own clusters (one master, then three), so it needs redis-server, as CI has."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import IN_CI
from tests.redis_servers import binary

REPO = Path(__file__).resolve().parents[2]


def _bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bench.queue_masters", "--quick", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def _rows(stdout: str) -> dict[tuple[int, int], list[str]]:
    """The table's rows by (masters, shards), each its cells."""
    cells = (line.strip("|").split("|") for line in stdout.splitlines() if line.startswith("| "))
    return {
        (int(row[0]), int(row[1])): [cell.strip() for cell in row]
        for row in cells
        if row[0].strip().isdigit()
    }


def test_the_quick_run_measures_one_and_three_masters() -> None:
    binary("redis-server")  # outside CI its absence skips; in CI it fails
    done = _bench()
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    rows = _rows(done.stdout)
    assert set(rows) == {(1, 1), (1, 16), (3, 1), (3, 16)}, done.stdout
    # Sixteen shards on three masters: every master carries some of the queue.
    each = [float(ms) for ms in rows[3, 16][4].split(",")]
    assert len(each) == 3, rows[3, 16]
    assert min(each) > 0, rows[3, 16]


def test_masters_held_to_a_share_of_a_cpu_use_no_more_than_it() -> None:
    """``--master-cpu 0.2``: each master in a cgroup of its own with a fifth of a CPU, so
    Redis is what runs out; a master that used more than its share would mean no cap."""
    binary("redis-server")
    if os.geteuid() != 0:
        message = "--master-cpu makes cgroups, which needs root"
        if IN_CI:
            pytest.fail(f"{message}; CI runs as root")
        pytest.skip(f"{message}; not in CI, so skipped here and failed in CI")
    done = _bench("--master-cpu", "0.2")
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    assert "each master held to 0.2 of a CPU" in done.stdout
    rows = _rows(done.stdout)
    assert set(rows) == {(1, 1), (1, 16), (3, 1), (3, 16)}, done.stdout
    for layout in ((1, 1), (1, 16)):
        rate = float(rows[layout][2].replace(",", ""))
        busiest_ms = float(rows[layout][4].split(",")[0])
        # CPU seconds per second: ms per 1,000 writes x writes per second / 1e6.
        assert busiest_ms * rate / 1e6 <= 0.3, rows[layout]


def test_a_share_out_of_bounds_is_refused_by_name() -> None:
    done = _bench("--master-cpu", "5")
    assert done.returncode == 1
    assert "--master-cpu must be between 0.01 and 1, not 5" in done.stderr
