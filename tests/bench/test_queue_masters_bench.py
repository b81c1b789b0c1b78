"""The queue-on-masters benchmark runs end to end: ``python -m bench.queue_masters --quick``
starts its own clusters (one master, then three), so it needs redis-server, as CI has."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.redis_servers import binary

REPO = Path(__file__).resolve().parents[2]


def test_the_quick_run_measures_one_and_three_masters() -> None:
    binary("redis-server")  # outside CI its absence skips; in CI it fails
    done = subprocess.run(
        [sys.executable, "-m", "bench.queue_masters", "--quick"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    rows = [line for line in done.stdout.splitlines() if line.startswith("| 1 |")]
    rows += [line for line in done.stdout.splitlines() if line.startswith("| 3 |")]
    assert len(rows) == 3, done.stdout
    # Sixteen shards on three masters: every master carries some of the queue.
    [spread] = [row for row in rows if row.startswith("| 3 | 16 |")]
    each = [float(ms) for ms in spread.split("|")[5].split(",")]
    assert len(each) == 3, spread
    assert min(each) > 0, spread
