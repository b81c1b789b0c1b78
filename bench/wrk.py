"""wrk as the load generator: its Lua scripts, one run, and what the run measured.

    script (written into the run's temp dir) -> taskset -c CPU wrk -t1 -cC -dS --latency -s F URL
      -> the script's done() prints one line "WRK-RESULT {json}" -> ``WrkResult``

Every script ends with the same ``done()``: requests, errors and latency percentiles as JSON, so
nothing is parsed out of wrk's human report. A script that needs a response callback (population,
filling) only has one where its cost does not matter: a ``response()`` makes wrk parse every
response's headers, which would lower the ceiling of a throughput run.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.processes import BenchError

BODY_SIZE = 1024  # bytes of every value the benchmark stores and reads
_MARK = "WRK-RESULT "
_DONE = f"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{_MARK}{{"requests": %.0f, "duration_us": %.0f, "connect": %.0f, "read": %.0f, '
    .. '"write": %.0f, "status": %.0f, "timeout": %.0f, "p50_us": %.0f, "p99_us": %.0f, '
    .. '"max_us": %.0f}}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
"""
# Each thread seeds its own generator from its number, so every target sees the same sequence.
_SEED = """
local counter = 0
setup = function(thread)
  counter = counter + 1
  thread:set("id", counter)
end
"""


def body(key: str) -> bytes:
    """The stored JSON for ``key``: ``BODY_SIZE`` bytes, the same in Python and in Lua."""
    head = f'{{"id":"{key}","pad":"'
    return (head + "x" * (BODY_SIZE - len(head) - 2) + '"}').encode()


def _lua_body() -> str:
    """A Lua function that builds ``body(key)``."""
    return f"""
local function body(key)
  local head = '{{"id":"' .. key .. '","pad":"'
  return head .. string.rep("x", {BODY_SIZE} - #head - 2) .. '"}}'
end
"""


def one_path() -> str:
    """Every request the same (the URL's path): wrk's fastest request, no Lua per request."""
    return _DONE


def uniform(prefix: str, keys: int) -> str:
    """GET ``prefix`` + a key drawn uniformly from ``0 .. keys-1``."""
    return f"""{_SEED}
local requests = {{}}
init = function(args)
  math.randomseed(1000 + id)
  for i = 1, {keys} do requests[i] = wrk.format("GET", "{prefix}" .. (i - 1)) end
end
request = function() return requests[math.random({keys})] end
{_DONE}"""


def zipf(prefix: str, keys: int, exponent: float, seed: int, limit: int, marker: Path) -> str:
    """GET ``prefix`` + key k (0-based rank) with probability proportional to 1/(k+1)^exponent;
    exactly ``limit`` requests are sent, then the file ``marker`` appears (stop wrk then): every
    target gets the same requests, in the same order. One thread only."""
    return f"""
local requests, cdf, sent = {{}}, {{}}, 0
init = function(args)
  math.randomseed({seed})
  local total = 0
  for i = 1, {keys} do
    total = total + 1 / i ^ {exponent}
    cdf[i] = total
    requests[i] = wrk.format("GET", "{prefix}" .. (i - 1))
  end
  for i = 1, {keys} do cdf[i] = cdf[i] / total end
end
request = function()
  sent = sent + 1
  if sent == {limit} then
    -- The last request: this thread stops after writing it, and wrk is stopped from outside.
    local f = io.open("{marker}", "w")
    f:write(tostring(sent))
    f:close()
    wrk.thread:stop()
  end
  local u, lo, hi = math.random(), 1, {keys}
  while lo < hi do
    local mid = math.floor((lo + hi) / 2)
    if cdf[mid] < u then lo = mid + 1 else hi = mid end
  end
  return requests[lo]
end
{_DONE}"""


def fresh_mix(prefix: str, warm: int, first: int, last: int, share: float) -> str:
    """GET ``prefix`` + a key: with probability ``share`` the next of ``first .. last-1`` in
    turn (a key this run has not read before, until it wraps), else one drawn uniformly from
    the warm keys ``0 .. warm-1``. ``share`` 1: every request a key not read before."""
    return f"""{_SEED}
local warm, fresh = {{}}, {first}
init = function(args)
  math.randomseed(2000 + id)
  for i = 1, {warm} do warm[i] = wrk.format("GET", "{prefix}" .. (i - 1)) end
end
request = function()
  if {warm} == 0 or math.random() < {share} then
    local key = fresh
    fresh = fresh + 1
    if fresh >= {last} then fresh = {first} end
    return wrk.format("GET", "{prefix}" .. key)
  end
  return warm[math.random({warm})]
end
{_DONE}"""


def puts_round_robin(prefix: str, keys: int) -> str:
    """PUT ``body(key)`` to ``prefix`` + key, round-robin over ``0 .. keys-1``."""
    return f"""{_lua_body()}
local requests, i = {{}}, 0
init = function(args)
  for k = 1, {keys} do
    requests[k] = wrk.format("PUT", "{prefix}" .. (k - 1),
      {{["Content-Type"] = "application/json"}}, body(tostring(k - 1)))
  end
end
request = function()
  i = i % {keys} + 1
  return requests[i]
end
{_DONE}"""


def sequence(prefix: str, keys: int, method: str, marker: Path, idle: str = "/") -> str:
    """``method`` ``prefix`` + 0, 1, ... ``keys-1`` once each (a PUT carries ``body(key)``), then
    GET ``idle`` (which must not answer ``BODY_SIZE`` bytes); the file ``marker`` appears once
    ``keys`` answers of ``BODY_SIZE`` bytes are in: an answer that is not the value never counts,
    so a failing key shows as a fill that does not finish. One thread only."""
    payload = "body(key)" if method == "PUT" else "nil"
    return f"""{_lua_body()}
local i, answered, verified = 0, 0, false
local headers = {{["Content-Type"] = "application/json"}}
request = function()
  -- wrk calls request() once before connecting, to check it: that call must not use up a key.
  if not verified then
    verified = true
    return wrk.format("GET", "{idle}")
  end
  if i >= {keys} then return wrk.format("GET", "{idle}") end
  local key = tostring(i)
  i = i + 1
  return wrk.format("{method}", "{prefix}" .. key, headers, {payload})
end
response = function(status, headers, b)
  if #b ~= {BODY_SIZE} then return end
  answered = answered + 1
  if answered == {keys} then
    local f = io.open("{marker}", "w")
    f:write(tostring(answered))
    f:close()
  end
end
{_DONE}"""


@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    errors: int  # connect, read, write, timeout, and answers that are not 2xx/3xx
    p50_ms: float
    p99_ms: float
    max_ms: float
    cpu: float  # wrk's own CPU time over the run's wall time: near 1.0, wrk was the bound

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


@dataclass(frozen=True)
class Wrk:
    """How wrk is run: the binary and the CPU it is pinned to (None: not pinned). Setting
    ``stopping`` stops every run at once (the benchmark is being stopped)."""

    binary: str
    cpu: int | None
    stopping: threading.Event = field(default_factory=threading.Event)

    def command(self, url: str, script: Path, connections: int, seconds: float) -> list[str]:
        pin = ["taskset", "-c", str(self.cpu)] if self.cpu is not None else []
        return [
            *pin,
            self.binary,
            "-t1",
            f"-c{connections}",
            f"-d{max(1, math.ceil(seconds))}s",
            "--latency",
            "--timeout",
            "10s",
            "-s",
            str(script),
            url,
        ]

    def run(
        self,
        url: str,
        script: Path,
        *,
        connections: int,
        seconds: float,
        log: Path,
        stop_when: Path | None = None,
    ) -> WrkResult:
        """One wrk run (blocking: call it in a thread). wrk stops by itself after whole
        seconds; it is stopped early (SIGINT: it still reports what it did) after a fraction of
        a second, as soon as the file ``stop_when`` appears, or when ``stopping`` is set."""
        command = self.command(url, script, connections, seconds)
        started = time.monotonic()
        deadline = started + seconds
        with log.open("wb") as out:
            popen = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )
            signalled = False
            try:
                while True:
                    # wait4, not wait: its resource usage is wrk's CPU time.
                    pid, status, usage = os.wait4(popen.pid, os.WNOHANG)
                    if pid:
                        break
                    stop = (
                        self.stopping.is_set()
                        or time.monotonic() >= deadline
                        or (stop_when is not None and stop_when.exists())
                    )
                    if stop and not signalled:
                        popen.send_signal(signal.SIGINT)
                        signalled = True
                    time.sleep(0.01)
                popen.returncode = os.waitstatus_to_exitcode(status)
            except BaseException:
                popen.kill()
                popen.wait()
                raise
        wall = time.monotonic() - started
        if self.stopping.is_set():
            raise BenchError("stopped")
        text = log.read_text(errors="replace")
        return _parse(
            text, " ".join(command), popen.returncode, (usage.ru_utime + usage.ru_stime) / wall
        )


def _parse(text: str, command: str, code: int, cpu: float) -> WrkResult:
    for line in text.splitlines():
        if line.startswith(_MARK):
            found = json.loads(line[len(_MARK) :])
            break
    else:
        raise BenchError(f"`{command}` exited {code} without a result; its output:\n{text[-2000:]}")
    errors = sum(int(found[name]) for name in ("connect", "read", "write", "status", "timeout"))
    return WrkResult(
        requests=int(found["requests"]),
        seconds=found["duration_us"] / 1e6,
        errors=errors,
        p50_ms=found["p50_us"] / 1000,
        p99_ms=found["p99_us"] / 1000,
        max_ms=found["max_us"] / 1000,
        cpu=cpu,
    )


def write_script(directory: Path, name: str, text: str) -> Path:
    path = directory / f"{name}.lua"
    path.write_text(text)
    return path


def version(binary: str) -> str:
    """``wrk -v``'s first line (it exits 1 after printing its usage)."""
    try:
        done = subprocess.run([binary, "-v"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    first = (done.stdout or done.stderr).splitlines()
    return first[0].split(" Copyright")[0].removeprefix("wrk ").strip() if first else "unknown"


def pinned(cpus: Sequence[int], index: int) -> int | None:
    """The ``index``-th CPU of ``cpus`` when there are at least two to pin to, else None."""
    return sorted(cpus)[index] if len(cpus) >= 2 else None
