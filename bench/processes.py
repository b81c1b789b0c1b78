"""The processes a benchmark runs (``cachecar origin``, ``cachecar serve``) and bounded waits.

Every process is started in a session of its own with its output in a log file; ``Processes``
stops each one it started (SIGTERM, then SIGKILL) whatever happened, and a failed wait names
what it waited for and shows the end of the log that explains it.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import aiohttp
from redis.asyncio import Redis
from redis.exceptions import RedisError

LOG_TAIL = 3000  # characters of a process's log shown when it explains a failure
# A line of cachecar's log format ("%(asctime)s %(levelname)-7s %(name)s: %(message)s") that
# says something went wrong; the timestamp is dropped so that repeats can be counted as one.
_TROUBLE = re.compile(r"^\S+ \S+ (WARNING|ERROR|CRITICAL)\s+(.*)$")


class BenchError(Exception):
    """The benchmark cannot go on, or what it measured is wrong; the message says which."""


def cachecar_command() -> list[str]:
    """The ``cachecar`` console script beside this interpreter, else ``python -m proxy``."""
    script = Path(sys.executable).parent / "cachecar"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "proxy"]


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def usage(self) -> tuple[float, int]:
        """CPU seconds and resident bytes of it and its children (``session_usage``)."""
        return session_usage(self.popen.pid)

    def tail(self) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return text[-LOG_TAIL:]

    def troubles(self) -> list[str]:
        """The warnings and errors in its log, each without its timestamp."""
        if not self.log.exists():
            return []
        found = (_TROUBLE.match(line) for line in self.log.read_text(errors="replace").splitlines())
        return [f"{match[1]} {match[2]}" for match in found if match]

    def stop(self, within: float = 20.0) -> int:
        """SIGTERM, then SIGKILL if it has not exited ``within`` seconds later."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(within)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode


def session_usage(session: int) -> tuple[float, int]:
    """CPU seconds used so far and resident bytes now, summed over every live process of
    ``session`` (a process started by ``Processes`` leads a session of its own, so this counts
    its children too: nginx's workers, varnishd's child)."""
    tick = os.sysconf("SC_CLK_TCK")
    page = os.sysconf("SC_PAGE_SIZE")
    cpu, resident = 0.0, 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            pages = int((entry / "statm").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        # The fields after the command name, which may hold spaces: state, ppid, pgrp, session,
        # ... utime (11), stime (12), cutime (13), cstime (14), counted from state.
        fields = stat.rpartition(")")[2].split()
        if int(fields[3]) != session:
            continue
        cpu += sum(int(value) for value in fields[11:15]) / tick
        resident += pages * page
    return cpu, resident


def machine_busy() -> float:
    """CPU seconds the whole machine has spent busy (every CPU, every process) since boot."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class Processes:
    """Starts processes with logs under ``logs``; stops every one of them on the way out."""

    def __init__(self, logs: Path) -> None:
        self._logs = logs
        self._started: list[Process] = []

    def spawn(
        self,
        name: str,
        args: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> Process:
        """Start ``args``; ``env``: variables set for it, beside this process's own; ``cwd``:
        where it runs (``python -m`` imports from there first)."""
        log = self._logs / f"{name}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(
                list(args),
                env={**os.environ, **env} if env else None,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                # Its own session: a Ctrl-C reaches the benchmark, which stops it in order.
                start_new_session=True,
            )
        process = Process(name, popen, log)
        self._started.append(process)
        return process

    @property
    def started(self) -> list[Process]:
        return list(self._started)

    def stop_all(self) -> None:
        for process in reversed(self._started):
            process.stop()

    def __enter__(self) -> Processes:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop_all()


async def until(
    done: Callable[[], Awaitable[bool]],
    what: str,
    *,
    within: float,
    every: float = 0.05,
    process: Process | None = None,
) -> None:
    """Poll ``done`` until it is true; raise ``BenchError`` naming ``what`` after ``within`` s."""
    deadline = time.monotonic() + within
    while not await done():
        if process is not None and process.popen.poll() is not None:
            raise BenchError(
                f"{process.name} exited ({process.popen.returncode}) while waiting for {what}; "
                f"the end of its log:\n{process.tail()}"
            )
        if time.monotonic() > deadline:
            log = f"; the end of {process.name}'s log:\n{process.tail()}" if process else ""
            raise BenchError(f"waited {within:g}s for {what}, in vain{log}")
        await asyncio.sleep(every)


async def wait_http(
    session: aiohttp.ClientSession, url: str, process: Process, *, within: float
) -> None:
    """Wait until ``url`` answers with a status below 500."""

    async def answers() -> bool:
        try:
            async with session.get(url) as response:
                return response.status < 500
        except (aiohttp.ClientError, TimeoutError):
            return False

    await until(answers, f"{url} to answer", within=within, every=0.1, process=process)


async def wind_down(
    processes: Processes,
    troubles: Counter[str],
    redis: Redis,
    prefix: str,
    progress: Callable[[str], None],
) -> None:
    """The end of a benchmark run: every process stopped first (a live flusher must not write
    after the cleanup), what their logs showed added to ``troubles``, the run's keys deleted."""
    await asyncio.to_thread(processes.stop_all)
    for process in processes.started:
        troubles.update(f"{process.name}: {trouble}" for trouble in process.troubles())
    await drop_prefix(redis, prefix, progress)


async def drop_prefix(redis: Redis, prefix: str, progress: Callable[[str], None]) -> None:
    """Delete every key under ``prefix``: SCAN, never KEYS, which would block Redis."""
    dropped = 0
    try:
        batch: list[bytes] = []
        async for key in redis.scan_iter(match=f"{prefix}*", count=1000):
            batch.append(key)
            if len(batch) >= 500:
                dropped += await redis.delete(*batch)
                batch.clear()
        if batch:
            dropped += await redis.delete(*batch)
    except (RedisError, OSError) as exc:
        progress(f"could not delete the keys under {prefix!r}: {exc}")
        return
    progress(f"deleted {dropped:,} Redis keys under {prefix!r}")
