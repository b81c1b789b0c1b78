"""The write-behind benchmark runs end to end: ``python -m bench.write_behind --quick``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.redis
def test_the_quick_run_reports_both_modes_and_the_flush_throughput(redis_url: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.write_behind", "--quick"],
        cwd=REPO,
        env={**os.environ, "REDIS_URL": redis_url},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    assert "| mode | acknowledged writes | origin writes |" in done.stdout, done.stdout
    assert "| write-through | 300 | 300 |" in done.stdout, done.stdout
    assert "| write-behind | 300 |" in done.stdout, done.stdout
    assert "flushed writes/s" in done.stdout, done.stdout
    assert "Correctness: every write was acknowledged" in done.stdout, done.stdout
