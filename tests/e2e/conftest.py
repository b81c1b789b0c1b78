"""Processes for end-to-end tests: ``cachecar serve``, ``cachecar origin``, a redis-server.

Every process a test starts is stopped when the test ends, whatever happened; its output goes
to a log file that a failing wait prints.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from tests.ports import free_port
from tests.redis_servers import server_args

CACHECAR = str(Path(sys.executable).parent / "cachecar")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test in this directory e2e (pytestmark in a conftest marks nothing)."""
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.e2e)


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, within: float = 20) -> int:
        """Wait for the process to exit by itself; kill it if it does not in time."""
        try:
            return self.popen.wait(within)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
            raise AssertionError(f"{self.name} did not exit within {within}s") from None

    def stop(self, signum: int = signal.SIGTERM, within: float = 20) -> int:
        """Signal the process and wait for it; kill it if it does not stop in time."""
        if self.popen.poll() is None:
            self.popen.send_signal(signum)
            try:
                self.popen.wait(within)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
                raise AssertionError(f"{self.name} did not stop within {within}s") from None
        return self.popen.returncode


Spawn = Callable[..., Process]


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawn]:
    """``spawn(name, args)`` runs ``args`` with its output to ``tmp_path/name.log``."""
    started: list[Process] = []

    def start(
        name: str, args: Sequence[str], cwd: Path | None = None, stdout: Path | None = None
    ) -> Process:
        """With ``stdout``, standard output goes there and only stderr to the log."""
        log = tmp_path / f"{name}.log"
        with log.open("wb") as out, (stdout or Path(os.devnull)).open("wb") as apart:
            popen = subprocess.Popen(
                list(args),
                stdout=out if stdout is None else apart,
                stderr=subprocess.STDOUT if stdout is None else out,
                cwd=cwd,
                start_new_session=True,
            )
        process = Process(name, popen, log)
        started.append(process)
        return process

    yield start
    for process in reversed(started):
        if process.popen.poll() is None:
            process.popen.kill()
            process.popen.wait()


async def until(
    done: Callable[[], Awaitable[bool]], what: str, within: float = 10.0, every: float = 0.05
) -> None:
    """Poll ``done`` until it is true; fail naming ``what`` after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not await done():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within}s: {what}")
        await asyncio.sleep(every)


async def wait_http(url: str, process: Process, within: float = 20) -> None:
    """Wait until ``url`` answers below 500; fail with ``process``'s log otherwise."""
    async with aiohttp.ClientSession() as session:
        for _ in range(int(within / 0.1)):
            if process.popen.poll() is not None:
                raise AssertionError(
                    f"{process.name} exited ({process.popen.returncode}):\n{process.output()}"
                )
            try:
                async with session.get(url) as response:
                    if response.status < 500:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError(f"{url} did not answer within {within}s:\n{process.output()}")


@dataclass
class Origin:
    url: str
    process: Process

    async def put(self, path: str, value: object) -> None:
        async with (
            aiohttp.ClientSession() as session,
            session.put(self.url + path, json=value) as response,
        ):
            assert response.status in (200, 201)

    async def count(self, path: str) -> int:
        """How many GETs of ``path`` reached the origin."""
        async with (
            aiohttp.ClientSession() as session,
            session.get(self.url + "/_stats") as response,
        ):
            stats = await response.json()
        return int(stats["by_request"].get(f"GET {path}", 0))


async def start_origin(
    spawn: Spawn,
    latency: str = "0ms",
    *,
    port: int | None = None,
    db: Path | None = None,
    name: str = "origin",
) -> Origin:
    """``cachecar origin``; give ``port`` and ``db`` to start it again where it was."""
    port = port or free_port()
    args = [CACHECAR, "origin", "--port", str(port), "--latency", latency]
    if db is not None:
        args += ["--db", str(db)]
    process = spawn(name, args)
    url = f"http://127.0.0.1:{port}"
    await wait_http(url + "/", process)
    return Origin(url, process)


@dataclass
class Config:
    """A config file written for a test, and where its listeners will be."""

    path: Path
    url: str
    admin: str


@dataclass
class Proxy:
    url: str
    admin: str
    process: Process


def write_config(
    path: Path,
    origin: str,
    *,
    l2: str | None = "memory://",
    key_prefix: str = "cachecar:",
    extra: str = "",
    mode: str | None = None,
    admin_token: str | None = None,
    tags: Sequence[str] = (),
    coalesce: str | None = None,
) -> Config:
    """``mode`` sets the /users/{id} route's write mode, ``tags`` its tags, ``coalesce`` its
    coalescing; ``admin_token`` sets admin.token."""
    port, admin = free_port(), free_port()
    token = f", token: {admin_token!r}" if admin_token is not None else ""
    mode_line = f"mode: {mode}" if mode is not None else ""
    tags_line = f"tags: {list(tags)!r}" if tags else ""
    coalesce_line = f"coalesce: {coalesce}" if coalesce is not None else ""
    l2_line = (
        f"l2: {{url: {l2!r}, key_prefix: {key_prefix!r}, timeout: 100ms, "
        "breaker: {failures: 3, reset_after: 1s}}"
        if l2
        else ""
    )
    path.write_text(
        textwrap.dedent(
            f"""\
            server: {{listen: "127.0.0.1:{port}", shutdown_grace: 5s}}
            admin: {{listen: "127.0.0.1:{admin}"{token}}}
            upstream: {{url: "{origin}", timeout: 5s}}
            {l2_line}
            routes:
              - path: /users/{{id}}
                key: "users:{{id}}"
                {mode_line}
                {tags_line}
                {coalesce_line}
            """
        )
        + textwrap.dedent(extra)
    )
    return Config(path, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin}")


async def start_proxy(spawn: Spawn, config: Config, name: str = "proxy") -> Proxy:
    process = spawn(name, [CACHECAR, "serve", "-c", str(config.path)])
    await wait_http(config.admin + "/healthz", process)
    return Proxy(config.url, config.admin, process)


def start_redis(spawn: Spawn, port: int, name: str = "redis") -> Process:
    return spawn(name, server_args(port, Path(os.environ.get("TMPDIR", "/tmp"))))
