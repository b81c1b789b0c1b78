"""Starting what the side-by-side benchmark measures, each as a real process on 127.0.0.1.

    cachecar        `cachecar serve -c GENERATED.yaml` (L2 on the Redis at REDIS_URL, under the
                    run's key prefix; or L1 only)
    nginx, varnish  bench.peers' configs, in a directory of their own
    aiohttp dict    python -m bench.bare_dict           (the floor for anything on aiohttp)
    aiohttp + Redis python -m bench.bare_redis          (the floor for an L2 hit on aiohttp)

Every target is pinned to the server CPU (``taskset``) when there are two CPUs or more; the load
generator and the origin get the other one.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from bench import peers
from bench.processes import BenchError, Process, Processes, cachecar_command, free_port, until

START_WITHIN = 60.0  # seconds a target has to answer after it is started

# Every read route: the same TTL as the peers' (10m) in both tiers.
ITEMS = '  - {path: "/items/{id}", key: "items:{id}", ttl: {l1: 10m, l2: 10m}}\n'
COLD = '  - {path: "/cold/{id}", key: "cold:{id}", ttl: {l1: 10m, l2: 10m}}\n'
# The L2-hit workload: L1 is skipped on this route (an L1 TTL of 0 stores nothing in L1), so
# every read is an L1 miss and an L2 lookup.
ITEMS_L2_ONLY = '  - {path: "/items/{id}", key: "items:{id}", ttl: {l1: 0s, l2: 10m}}\n'
WRITES = (
    '  - {path: "/wb/{id}", mode: write-behind, key: "wb:{id}"}\n'
    '  - {path: "/wt/{id}", mode: write-through, key: "wt:{id}"}\n'
)


@dataclass
class Target:
    name: str  # as the report names it
    kind: str  # cachecar | nginx | varnish | bare
    url: str
    process: Process
    admin: str = ""  # cachecar's admin listener
    directory: Path | None = None  # nginx's or Varnish's own directory

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])


class Launcher:
    def __init__(
        self,
        processes: Processes,
        directory: Path,
        session: aiohttp.ClientSession,
        origin: str,
        *,
        tools: dict[str, str],
        cpu: int | None,
        redis_url: str,
        run_prefix: str,
        token: str,
    ) -> None:
        self._processes = processes
        self._directory = directory
        self._session = session
        self._origin = origin
        self._tools = tools
        self._pin = ["taskset", "-c", str(cpu)] if cpu is not None else []
        self._redis_url = redis_url
        self._run_prefix = run_prefix
        self._token = token
        self._slugs: set[str] = set()

    async def cachecar(
        self,
        name: str,
        *,
        routes: str,
        max_entries: int = 1_000_000,
        max_bytes: int = 1 << 30,
        l2: bool = True,
        flush_interval: str = "1s",
    ) -> Target:
        port, admin = free_port(), free_port()
        slug = self._slug(name)
        tier2 = (
            f"l2: {{url: {json.dumps(self._redis_url)}, "
            f"key_prefix: {json.dumps(self._run_prefix + slug + ':')}, ttl: 10m}}\n"
            if l2
            else ""
        )
        config = self._directory / f"{slug}.yaml"
        config.write_text(
            f'server: {{listen: "127.0.0.1:{port}"}}\n'
            f'admin: {{listen: "127.0.0.1:{admin}", token: "{self._token}"}}\n'
            f'upstream: {{url: "{self._origin}"}}\n'
            f"l1: {{max_entries: {max_entries}, max_bytes: {max_bytes}, ttl: 10m}}\n"
            f"{tier2}"
            f"write_behind: {{flush_interval: {flush_interval}}}\n"
            f"routes:\n{routes}"
        )
        process = self._processes.spawn(
            slug, [*self._pin, *cachecar_command(), "serve", "-c", str(config)]
        )
        target = Target(
            name, "cachecar", f"http://127.0.0.1:{port}", process, admin=f"http://127.0.0.1:{admin}"
        )
        await self._answers(target.admin + "/healthz", process)
        await self._answers(target.url + "/", process)
        return target

    async def nginx(self, name: str, max_size: int) -> Target:
        directory = self._own_directory(name)
        port = free_port()
        origin_port = int(self._origin.rsplit(":", 1)[1])
        (directory / "nginx.conf").write_text(
            peers.nginx_conf(directory, port, origin_port, max_size)
        )
        command = peers.nginx_command(self._tools[peers.NGINX.program], directory)
        process = self._processes.spawn(directory.name, [*self._pin, *command])
        target = Target(name, "nginx", f"http://127.0.0.1:{port}", process, directory=directory)
        await self._answers(target.url + "/", process)
        return target

    async def varnish(self, name: str, storage: int) -> Target:
        directory = self._own_directory(name)
        port = free_port()
        (directory / "bench.vcl").write_text(peers.vcl(int(self._origin.rsplit(":", 1)[1])))
        command = peers.varnish_command(
            self._tools[peers.VARNISH.program], directory, port, storage
        )
        process = self._processes.spawn(directory.name, [*self._pin, *command])
        target = Target(name, "varnish", f"http://127.0.0.1:{port}", process, directory=directory)
        await self._answers(target.url + "/", process)
        return target

    async def bare_dict(self, name: str, keys: int) -> Target:
        port = free_port()
        command = [
            sys.executable,
            "-m",
            "bench.bare_dict",
            "--port",
            str(port),
            "--keys",
            str(keys),
        ]
        return await self._bare(name, port, command)

    async def bare_redis(self, name: str, prefix: str) -> Target:
        port = free_port()
        command = [
            sys.executable,
            "-m",
            "bench.bare_redis",
            "--port",
            str(port),
            "--redis",
            self._redis_url,
            "--prefix",
            prefix,
        ]
        return await self._bare(name, port, command)

    async def _bare(self, name: str, port: int, command: list[str]) -> Target:
        process = self._processes.spawn(self._slug(name), [*self._pin, *command])
        target = Target(name, "bare", f"http://127.0.0.1:{port}", process)
        await self._answers(target.url + "/", process)
        return target

    def _own_directory(self, name: str) -> Path:
        directory = self._directory / self._slug(name)
        directory.mkdir()
        return directory

    def _slug(self, name: str) -> str:
        """A file name for ``name``, unique in this run (a target may be started twice)."""
        base = "-".join("".join(c if c.isalnum() else " " for c in name.lower()).split())
        slug, n = base, 1
        while slug in self._slugs:
            n += 1
            slug = f"{base}-{n}"
        self._slugs.add(slug)
        return slug

    async def _answers(self, url: str, process: Process) -> None:
        async def up() -> bool:
            try:
                async with self._session.get(url) as response:
                    return response.status < 500
            except (aiohttp.ClientError, TimeoutError):
                return False

        try:
            await until(up, f"{url} to answer", within=START_WITHIN, every=0.1, process=process)
        except BenchError as exc:
            raise BenchError(f"{process.name} did not start: {exc}") from None


def cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
