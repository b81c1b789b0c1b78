"""``server.workers: N``: N processes serving one port, one cachecar to the outside.

    supervisor (cachecar serve)         admin listener: /metrics, /admin/stats, purge, replay ...
      |  a runtime of its own for the admin calls that act through Redis (purge, write-behind)
      |  spawns, watches, restarts
      +-- worker 0 --+  each: the proxy port (SO_REUSEPORT: the kernel spreads connections),
      +-- worker 1 --+        its own L1, a replica like any other (coherence over Redis), and
      +-- ...       -+        its figures on a Unix socket of its own

The figures of all workers are added up when asked for (``proxy.fleet``): ``/metrics`` and
``/admin/stats`` read every worker's on its socket, and a worker that died keeps counting with
the last figures read from it.

Workers are replicas of one another, so several need what several hosts need: a shared Redis
(``l2.url``) with coherence on; the config refuses workers without them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric

from proxy.admin import build_admin_app
from proxy.app import RUNTIME, build_proxy_app
from proxy.fleet import Family, Fleet, Merged, parse
from proxy.listen import WORKER_SOCKET, check_free, listen_on
from proxy.metrics import Metrics
from proxy.settings import Settings

logger = logging.getLogger("cachecar.workers")

READY_WITHIN = 20.0  # seconds a new worker has to answer on its socket
ASK_WITHIN = 2.0  # seconds a worker has to hand over its figures
RESTART_FIRST, RESTART_MAX = 0.1, 5.0  # the wait before restarting a worker that died
STEADY = 10.0  # a worker up this long restarts, if it dies, after RESTART_FIRST again


@dataclass
class _Slot:
    index: int
    socket: str
    process: asyncio.subprocess.Process | None = None
    restarts: int = 0
    families: list[Family] = field(default_factory=list)  # the last read
    stats: dict[str, Any] | None = None  # the last read


class Workers:
    """Starts, watches and restarts the workers, and adds up their figures."""

    def __init__(self, settings: Settings, config: Path, control: Metrics) -> None:
        self._settings = settings
        self._config = config
        self._control = control
        # Abstract Unix sockets (a leading NUL): no file, so no writable directory and no path
        # length to worry about; the supervisor's pid keeps two supervisors apart.
        self._slots = [
            _Slot(index, f"\0cachecar-{os.getpid()}-{index}")
            for index in range(settings.server.workers)
        ]
        self._stopping = asyncio.Event()
        self._watching: list[asyncio.Task[None]] = []
        self._fleet = Fleet(control.window.started)

    # -- processes ------------------------------------------------------------------------------

    async def start(self) -> None:
        await asyncio.gather(*(self._spawn(slot) for slot in self._slots))
        self._watching = [asyncio.create_task(self._watch(slot)) for slot in self._slots]

    async def stop(self, within: float) -> None:
        """SIGTERM every worker (each finishes its requests and flushes within the grace)."""
        self._stopping.set()
        for task in self._watching:
            task.cancel()
        await asyncio.gather(*self._watching, return_exceptions=True)
        running = [s.process for s in self._slots if s.process and s.process.returncode is None]
        for process in running:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(within):
                await asyncio.gather(*(process.wait() for process in running))
        except TimeoutError:
            for process in running:
                if process.returncode is None:
                    logger.error("worker %d did not stop within %gs: killed", process.pid, within)
                    with contextlib.suppress(ProcessLookupError):
                        process.kill()
                    await process.wait()

    async def _spawn(self, slot: _Slot) -> None:
        level = logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower()
        slot.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "proxy",
            "--log-level",
            level if level in {"debug", "info", "warning", "error"} else "info",
            "serve",
            "-c",
            str(self._config),
            # An environment value cannot hold the NUL: "@" stands for it (as in ss and lsof).
            env={**os.environ, WORKER_SOCKET: "@" + slot.socket[1:]},
            # Signals from a terminal reach the supervisor only; it stops the workers itself.
            start_new_session=True,
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + READY_WITHIN
        while await self._ask(slot, "/worker/stats") is None:
            if slot.process.returncode is not None or loop.time() > deadline:
                logger.error("worker %d did not start (see its log above)", slot.process.pid)
                return
            await asyncio.sleep(0.05)

    async def _watch(self, slot: _Slot) -> None:
        loop = asyncio.get_running_loop()
        wait = RESTART_FIRST
        while not self._stopping.is_set():
            try:
                assert slot.process is not None
                started = loop.time()
                code = await slot.process.wait()
                if self._stopping.is_set():
                    return
                self._retire(slot)
                if loop.time() - started > STEADY:
                    wait = RESTART_FIRST
                logger.error(
                    "worker %d exited (%s); starting another in %.1fs",
                    slot.process.pid,
                    _describe(code),
                    wait,
                )
            except Exception:  # never give a slot up: log, and start a worker again
                logger.exception("watching worker slot %d failed", slot.index)
            await asyncio.sleep(wait)
            wait = min(wait * 2, RESTART_MAX)
            slot.restarts += 1
            try:
                await self._spawn(slot)
            except Exception:
                logger.exception("starting a worker in slot %d failed; trying again", slot.index)

    @property
    def up(self) -> int:
        """Workers running now."""
        return sum(1 for s in self._slots if s.process and s.process.returncode is None)

    def _retire(self, slot: _Slot) -> None:
        """Keep what a dead worker counted: its counters add to everyone's from now on."""
        self._fleet.retire(slot.families, slot.stats)
        slot.families, slot.stats = [], None

    # -- figures --------------------------------------------------------------------------------

    async def _ask(self, slot: _Slot, path: str) -> str | None:
        """A worker's answer to ``GET path``; None when it gives none (starting, gone).

        Plain HTTP/1.0 over a socket connected here: uvloop cannot connect to an abstract
        Unix socket by name, Python's socket module can.
        """
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            async with asyncio.timeout(ASK_WITHIN):
                await asyncio.get_running_loop().sock_connect(sock, slot.socket)
                reader, writer = await asyncio.open_unix_connection(sock=sock)
                try:
                    writer.write(f"GET {path} HTTP/1.0\r\nHost: worker\r\n\r\n".encode())
                    answer = await reader.read()
                finally:
                    writer.close()
        except (OSError, TimeoutError):
            sock.close()
            return None
        head, _, body = answer.partition(b"\r\n\r\n")
        if not head.startswith((b"HTTP/1.0 200", b"HTTP/1.1 200")):
            return None
        return body.decode()

    async def _read_all(self, path: str) -> list[tuple[_Slot, str]]:
        """Each slot's answer, for the slots whose worker is still the one that answered (a
        worker that died meanwhile has been retired: its answer would count it twice)."""
        asked = [slot.process for slot in self._slots]
        answers = await asyncio.gather(*(self._ask(slot, path) for slot in self._slots))
        return [
            (slot, answer)
            for slot, process, answer in zip(self._slots, asked, answers, strict=True)
            if answer is not None
            and slot.process is process
            and process is not None
            and process.returncode is None
        ]

    async def registry(self) -> CollectorRegistry:
        for slot, text in await self._read_all("/metrics"):
            slot.families = parse(text)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(Merged(self._merged()))
        return registry

    def _merged(self) -> list[Metric]:
        return self._fleet.metrics(slot.families for slot in self._slots if slot.families)

    async def stats(self) -> dict[str, Any]:
        for slot, text in await self._read_all("/worker/stats"):
            slot.stats = json.loads(text)
        live = [slot.stats for slot in self._slots if slot.stats is not None]
        return {
            **self._fleet.stats(live, self._control.figures(), self._control.now()),
            "workers": [
                {
                    "index": slot.index,
                    "pid": slot.process.pid if slot.process else None,
                    "up": slot.process is not None and slot.process.returncode is None,
                    "restarts": slot.restarts,
                }
                for slot in self._slots
            ],
        }


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


async def supervise(settings: Settings, config: Path | None, stop: asyncio.Event) -> None:
    """Run ``settings.server.workers`` workers and the admin listener until ``stop``."""
    if config is None:
        raise ValueError("workers are started with the config file's path")
    for address in (settings.server.listen, settings.admin.listen):
        check_free(address)
    # Serves no traffic: purges and the queue's admin act through Redis from it. The workers
    # flush the queue; this one does not.
    control_app = build_proxy_app(settings, flushes=False)
    control_runner = web.AppRunner(control_app, access_log=None)
    await control_runner.setup()
    workers = Workers(settings, config, control_app[RUNTIME].metrics)
    admin_runner = web.AppRunner(
        build_admin_app(control_app, workers), access_log=None, shutdown_timeout=1
    )
    await admin_runner.setup()
    try:
        await workers.start()
        # Once the workers serve: whoever waits for the admin listener finds the port ready.
        address = settings.admin.listen
        await listen_on(web.TCPSite(admin_runner, address.host, address.port), address)
        logger.info(
            "cachecar: %d workers serving http://%s; admin on http://%s",
            settings.server.workers,
            settings.server.listen,
            address,
        )
        await stop.wait()
        logger.info("stopping the workers (up to %gs)", settings.server.shutdown_grace)
    finally:
        await workers.stop(settings.server.shutdown_grace + 5.0)
        await admin_runner.cleanup()
        await control_runner.cleanup()
