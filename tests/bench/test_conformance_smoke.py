"""The HTTP cache test suite's command runs end to end: ``python -m bench.conformance`` on a
few tests against cachecar, so that it never rots. The full run is docs/conformance.md's
report, not a gate.

What is checked: the suite installs from its lock and its server starts; cachecar passes the
tests it is known to pass (a store, a no-store, a 304 to a client, an invalidation, the origin's
Vary, a revalidation); a test it does not pass is listed with its reason; a 5xx made because the
origin closed the connection is told apart from one made on a valid answer. In CI (CI=true) a
missing Node.js is a failure, not a skip.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import conformance
from bench.conformance_reasons import UNEXPLAINED
from bench.peers import find

REPO = Path(__file__).resolve().parents[2]
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
PASSING = (
    "freshness-max-age-s-maxage-shared-longer",
    "cc-resp-no-store",
    "conditional-304-etag",
    "invalidate-PUT",
    "vary-no-match",
    "304-lm-use-stored-Test-Header",
)
FAILING = (
    "headers-store-Set-Cookie",  # a choice: an answer with Set-Cookie is never stored
    "stale-close",  # the server closes the connection: cachecar has nothing stale, answers 502
)


def _cells(report: str, first: str) -> list[str]:
    """The cells of the report's table row whose first cell is ``first``."""
    for line in report.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] == first:
            return cells
    raise AssertionError(f"no row {first!r} in:\n{report}")


@pytest.mark.redis
@pytest.mark.timeout(300)
def test_a_few_tests_of_the_suite_against_cachecar(redis_url: str) -> None:
    missing = [
        tool.program for tool in (conformance.NODE, conformance.NPM) if not find(tool.program)
    ]
    if missing and os.geteuid() != 0:
        message = f"{', '.join(missing)} missing and not installable without root"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message + "; CI fails here")

    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.conformance",
            "--targets",
            "cachecar",
            "--tests",
            ",".join(PASSING + FAILING),
        ],
        cwd=REPO,
        env={**os.environ, "REDIS_URL": redis_url},
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )

    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    report = done.stdout
    # passed (of 7), required, optimal, check, 5xx on an answer, 5xx on a closed connection
    row = _cells(report, "cachecar")
    assert row[1] == str(len(PASSING)), report
    assert row[5:7] == ["0", "1"], report
    for test in FAILING:
        cells = _cells(report, f"`{test}`")
        assert cells[-1] not in {"", UNEXPLAINED}, f"{test} has no reason:\n{report}"
    for test in PASSING:
        assert f"`{test}`" not in report, report
