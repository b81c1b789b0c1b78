"""What a run of the HTTP cache test suite found (``bench.conformance``), and its report:

the run: when, on what, the suite's version and each system's
-> passed, by kind of test (required, optimal, check), and the 5xx each proxy made itself
-> every test cachecar does not pass: the kind, whether nginx and Varnish pass it, what the
   suite saw, and why (``bench.conformance_reasons``: a bug to fix, or a choice)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from bench.conformance_reasons import reason
from bench.machine import machine

KINDS = ("required", "optimal", "check")
SAW = 90  # characters of the suite's message kept in the failures' table


@dataclass(frozen=True)
class Test:
    id: str
    kind: str  # required | optimal | check
    name: str  # what it asks, in the suite's words
    suite: str  # the group it belongs to


@dataclass(frozen=True)
class Made:
    """A 5xx answer the proxy made itself: the test server sent none."""

    test: str  # the test's id
    status: int
    closed: bool  # the test server closed the connection instead of answering: an origin failure


@dataclass
class Outcome:
    """One system's run: each test's result, and the 5xx answers it made itself."""

    system: str
    version: str
    results: dict[str, object]  # test id -> true, or [the error's kind, its message]
    made5xx: list[Made]

    @property
    def made_on_answers(self) -> list[Made]:
        """The 5xx it made though the origin answered: never right for a valid answer."""
        return [made for made in self.made5xx if not made.closed]

    def passed(self, test: Test) -> bool:
        return self.results.get(test.id) is True

    def saw(self, test: Test) -> str:
        """The suite's word on a test that did not pass."""
        result = self.results.get(test.id)
        if result is None:
            return "not run"
        if isinstance(result, list):
            return ": ".join(str(part) for part in result)
        return str(result)


@dataclass
class Report:
    started: datetime
    suite: str  # the suite's version
    skipped: list[str] = field(default_factory=list)
    tests: list[Test] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)

    def outcome(self, system: str) -> Outcome | None:
        return next((found for found in self.outcomes if found.system == system), None)


def render(report: Report) -> str:
    lines = [
        "### The run",
        "",
        f"- {report.started:%Y-%m-%d %H:%M} UTC, {machine()}",
        f"- the suite: http-cache-tests {report.suite}, its {len(report.tests)} tests for a "
        "reverse proxy ("
        + ", ".join(f"{_count(report.tests, kind)} {kind}" for kind in KINDS)
        + "), as its CLI runs them; each result is taken on its own (a test the suite's site "
        "shows as depending on a failed one counts as failed here)",
        *(f"- {found.system}: {found.version}" for found in report.outcomes),
        *(f"- skipped: {note}" for note in report.skipped),
        "",
        "### Passed",
        "",
        "A 5xx the proxy made is one the test server did not send: where the server answered, it "
        "is never right; where the server closed the connection instead (a test of an origin "
        "failure), a 502 is the proxy's honest answer when it has nothing stale to serve.",
        "",
        "| system | passed (of "
        + str(len(report.tests))
        + ") | "
        + " | ".join(f"{kind} (of {_count(report.tests, kind)})" for kind in KINDS)
        + " | 5xx the proxy made: origin answered | origin closed |",
        "| --- | ---: | " + " | ".join("---:" for _ in KINDS) + " | ---: | ---: |",
    ]
    for found in report.outcomes:
        passed = [test for test in report.tests if found.passed(test)]
        answered = len(found.made_on_answers)
        lines.append(
            f"| {found.system} | {len(passed)} | "
            + " | ".join(str(_count(passed, kind)) for kind in KINDS)
            + f" | {answered} | {len(found.made5xx) - answered} |"
        )
    cachecar = report.outcome("cachecar")
    if cachecar is not None:
        lines += _failures(report, cachecar)
    return "\n".join(lines) + "\n"


def _failures(report: Report, cachecar: Outcome) -> list[str]:
    peers = [found for found in report.outcomes if found.system != "cachecar"]
    failed = [test for test in report.tests if not cachecar.passed(test)]
    failed.sort(key=lambda test: (KINDS.index(test.kind), test.id))
    lines = [
        "",
        "### Where cachecar does not pass",
        "",
        f"{len(failed)} tests. A peer's column says whether it passes the test in the same run.",
        "",
        "| test | kind | "
        + "".join(f"{found.system} | " for found in peers)
        + "what the suite saw | why |",
        "| --- | --- | " + "".join("--- | " for _ in peers) + "--- | --- |",
    ]
    for test in failed:
        saw = cachecar.saw(test).replace("|", "\\|").replace("\n", " ")
        if len(saw) > SAW:
            saw = saw[: SAW - 1] + "…"
        lines.append(
            f"| `{test.id}` | {test.kind} | "
            + "".join(f"{'pass' if found.passed(test) else 'fail'} | " for found in peers)
            + f"{saw} | {reason(test.id)} |"
        )
    if cachecar.made5xx:
        lines += ["", "5xx answers cachecar made itself (the test server sent none of them):", ""]
        lines += [
            f"- `{made.test}`: {made.status}"
            + (
                " (the test server closed the connection instead of answering)"
                if made.closed
                else ""
            )
            for made in cachecar.made5xx
        ]
    return lines


def _count(tests: list[Test], kind: str) -> int:
    return sum(1 for test in tests if test.kind == kind)
