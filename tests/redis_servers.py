"""Real Redis deployments a test session starts: a three-master Cluster, a master behind one
Sentinel, a Redis that speaks only TLS. Each on free ports of 127.0.0.1, in a directory of its
own, stopped when the session ends.

Starting one is bounded in time; a server that does not come up fails with its log. Outside
CI a missing ``redis-server`` / ``redis-cli`` / ``openssl`` skips; in CI it fails.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import redis

from tests.ports import free_port

START_WITHIN = 20.0  # seconds for a deployment to come up


@dataclasses.dataclass(frozen=True)
class Deployment:
    """``url`` is what cachecar is given; ``node_url`` a plain URL of the node that
    subscriptions use (the cluster's first seed, the sentinel's master)."""

    name: str
    url: str
    node_url: str


def binary(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        from tests.conftest import IN_CI  # here, not above: tests.conftest imports this module

        package = "openssl" if name == "openssl" else "redis-server"  # redis-cli comes with it
        message = f"{name} is not installed (apt-get install {package})"
        if IN_CI:
            pytest.fail(f"{message}; CI needs it")
        pytest.skip(f"{message}; not in CI, so skipped here and failed in CI")
    return found


class Servers:
    """The processes of one deployment; ``stop`` ends them all."""

    def __init__(self, where: Path) -> None:
        self.where = where
        self._running: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(self, name: str, args: Sequence[str]) -> None:
        log = self.where / f"{name}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(
                list(args),
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.where,
                start_new_session=True,
            )
        self._running.append((popen, log))

    def logs(self) -> str:
        return "\n".join(
            f"--- {log.name}\n{log.read_text(errors='replace')}" for _, log in self._running
        )

    def fail(self, what: str) -> None:
        raise AssertionError(f"{what}\n{self.logs()}")

    def wait_answer(self, url: str, deadline: float) -> None:
        """Until the Redis at ``url`` answers PING; fail with the logs if a server exits."""
        while True:
            for popen, log in self._running:
                if popen.poll() is not None:
                    self.fail(f"{log.stem} exited ({popen.returncode})")
            try:
                with redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1) as c:
                    c.ping()
                return
            except (redis.RedisError, OSError):
                if time.monotonic() > deadline:
                    self.fail(f"{url} did not answer within {START_WITHIN}s")
                time.sleep(0.02)

    def stop(self) -> None:
        for popen, _ in self._running:
            if popen.poll() is None:
                popen.terminate()
        for popen, _ in self._running:
            try:
                popen.wait(5)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait()


def server_args(port: int, where: Path, *extra: str) -> list[str]:
    return [
        binary("redis-server"),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(where),
        *extra,
    ]


@contextlib.contextmanager
def cluster(where: Path, masters: int = 3) -> Iterator[Deployment]:
    """``masters`` primaries, no replicas, every slot covered, ``cluster_state:ok`` on each."""
    servers = Servers(where)
    deadline = time.monotonic() + START_WITHIN
    ports = [free_port() for _ in range(masters)]
    try:
        for port in ports:
            # The bus port is set too: port + 10000 (the default) may be past 65535.
            servers.start(
                f"node-{port}",
                server_args(
                    port,
                    where,
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    str(where / f"nodes-{port}.conf"),
                    "--cluster-port",
                    str(free_port()),
                ),
            )
        for port in ports:
            servers.wait_answer(f"redis://127.0.0.1:{port}", deadline)
        create = subprocess.run(
            [
                binary("redis-cli"),
                "--cluster",
                "create",
                *(f"127.0.0.1:{port}" for port in ports),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            capture_output=True,
            timeout=max(1.0, deadline - time.monotonic()),
            check=False,
        )
        if create.returncode != 0:
            servers.fail(f"redis-cli --cluster create failed:\n{create.stdout.decode()}")
        for port in ports:
            _wait_cluster_ok(servers, port, masters, deadline)
        seed = f"127.0.0.1:{ports[0]}"
        yield Deployment("cluster", f"redis+cluster://{seed}", f"redis://{seed}")
    finally:
        servers.stop()


def _wait_cluster_ok(servers: Servers, port: int, masters: int, deadline: float) -> None:
    with redis.Redis(port=port, socket_timeout=1, decode_responses=True) as client:
        while True:
            info = client.cluster("INFO")
            if (
                info.get("cluster_state") == "ok"
                and str(info.get("cluster_known_nodes")) == str(masters)
                and str(info.get("cluster_slots_ok")) == "16384"
            ):
                return
            if time.monotonic() > deadline:
                servers.fail(f"node {port} not ok within {START_WITHIN}s: {info}")
            time.sleep(0.05)


@contextlib.contextmanager
def sentinel(where: Path, service: str = "mymaster") -> Iterator[Deployment]:
    """A master and one Sentinel watching it (quorum 1)."""
    servers = Servers(where)
    deadline = time.monotonic() + START_WITHIN
    master, watcher = free_port(), free_port()
    config = where / "sentinel.conf"  # Sentinel rewrites its config: it must be a file of its own
    config.write_text(
        f"port {watcher}\nbind 127.0.0.1\ndir {where}\n"
        f"sentinel monitor {service} 127.0.0.1 {master} 1\n"
    )
    try:
        servers.start("master", server_args(master, where))
        servers.start("sentinel", [binary("redis-server"), str(config), "--sentinel"])
        servers.wait_answer(f"redis://127.0.0.1:{master}", deadline)
        servers.wait_answer(f"redis://127.0.0.1:{watcher}", deadline)
        with redis.Redis(port=watcher, socket_timeout=1) as asked:
            while asked.sentinel_get_master_addr_by_name(service) is None:
                if time.monotonic() > deadline:
                    servers.fail(f"the sentinel does not know {service} within {START_WITHIN}s")
                time.sleep(0.02)
        yield Deployment(
            "sentinel",
            f"redis+sentinel://127.0.0.1:{watcher}/{service}/0",
            f"redis://127.0.0.1:{master}/0",
        )
    finally:
        servers.stop()


@contextlib.contextmanager
def tls(where: Path) -> Iterator[Deployment]:
    """A Redis that listens for TLS only, with a self-signed certificate for 127.0.0.1."""
    servers = Servers(where)
    deadline = time.monotonic() + START_WITHIN
    cert, key = where / "redis.crt", where / "redis.key"
    made = subprocess.run(
        [
            binary("openssl"),
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        capture_output=True,
        timeout=START_WITHIN,
        check=False,
    )
    if made.returncode != 0:
        raise AssertionError(f"openssl could not make a certificate:\n{made.stderr.decode()}")
    port = free_port()
    url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={cert}"
    try:
        servers.start(
            "tls",
            [
                *server_args(0, where),
                "--tls-port",
                str(port),
                "--tls-cert-file",
                str(cert),
                "--tls-key-file",
                str(key),
                "--tls-ca-cert-file",
                str(cert),
                "--tls-auth-clients",
                "no",
            ],
        )
        servers.wait_answer(url, deadline)
        yield Deployment("tls", url, url)
    finally:
        servers.stop()
