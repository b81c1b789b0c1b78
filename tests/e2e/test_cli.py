"""The ``cachecar`` command as a user types it: check, serve on a bad file, and the demo."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
from pathlib import Path

import aiohttp
import pytest
import yaml

from tests.e2e.conftest import CACHECAR, Spawn, wait_http
from tests.ports import free_port

REPO = Path(__file__).resolve().parents[2]
VALID = "upstream: {url: 'http://127.0.0.1:9000'}\n"


def cachecar(
    *args: str, cwd: Path = REPO, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CACHECAR, *args], capture_output=True, text=True, cwd=cwd, timeout=60, env=env
    )


def test_check_prints_the_effective_settings_as_yaml(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(VALID + "routes: [{path: '/users/{id}', key: 'users:{id}'}]\n")
    result = cachecar("check", "-c", str(config))
    assert result.returncode == 0, result.stderr
    effective = yaml.safe_load(result.stdout)
    assert effective["l1"]["max_bytes"] == "64MiB"
    assert effective["routes"][0]["key"] == "users:{id}"
    assert effective["routes"][0]["ttl"] == {"l1": "30s", "l2": "10m"}


def test_check_without_c_uses_the_embedded_default() -> None:
    result = cachecar("check")
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["upstream"]["url"] == "http://127.0.0.1:9000"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            VALID + "routes: [{path: /a}, {path: /b, ttl: {l1: 30 seconds}}]\n",
            "routes[1].ttl.l1: '30 seconds' is not a duration (use 250ms, 30s, 10m, 1h)",
        ),
        (
            VALID + "l1: {max_entries: lots}\n",
            "l1.max_entries: expected a whole number, got 'lots'",
        ),
        (VALID + "l2: {timout: 1s}\n", "l2.timout: unknown key (did you mean 'timeout'?)"),
        (
            VALID + "admin: {token: '${NO_SUCH_VAR_X}'}\n",
            "admin.token: environment variable NO_SUCH_VAR_X is not set",
        ),
        (VALID + "server: {listen: nowhere}\n", "server.listen: 'nowhere' is not an address"),
        (
            VALID + "routes: [{path: '/u/{id}', key: 'u:{uid}'}]\n",
            "routes[0].key: {uid} is not a parameter",
        ),
        ("upstream: {url: 'http://127.0.0.1:9000'\n", "line 2, column 1"),
        ("l1: {ttl: 1s}\n", "upstream: required"),
    ],
)
def test_every_config_error_names_its_key_and_exits_2(
    tmp_path: Path, text: str, expected: str
) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    for command in ("check", "serve"):
        result = cachecar(command, "-c", str(config))
        assert result.returncode == 2
        assert f"{config} is not a valid config" in result.stderr
        assert expected in result.stderr
        assert result.stdout == ""


def test_a_missing_config_file_is_exit_2(tmp_path: Path) -> None:
    result = cachecar("check", "-c", str(tmp_path / "absent.yaml"))
    assert result.returncode == 2
    assert "cannot read the file: No such file or directory" in result.stderr


def test_a_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "c.yaml"
        config.write_text(
            VALID
            + f"server: {{listen: '127.0.0.1:{port}'}}\n"
            + f"admin: {{listen: '127.0.0.1:{free_port()}'}}\n"
        )
        result = cachecar("serve", "-c", str(config))
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr


def port_is_closed(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


async def test_the_demo_answers_miss_then_hit_and_ctrl_c_stops_everything(spawn: Spawn) -> None:
    await check_the_demo(spawn, [CACHECAR, "demo", "--concurrency", "2"], cwd=REPO)


async def check_the_demo(spawn: Spawn, command: list[str], cwd: Path) -> None:
    """``command`` runs the demo: it answers MISS then HIT-L1, and Ctrl-C stops all of it."""
    # The demo runs the embedded default: proxy 8080, admin 8081, origin 9000.
    for port in (8080, 8081, 9000):
        assert port_is_closed(port), f"port {port} is taken; the demo needs it"
    demo = spawn("demo", command, cwd=cwd)
    await wait_http("http://127.0.0.1:8081/healthz", demo, within=120)
    for _ in range(300):
        if "Ctrl-C stops everything" in demo.output():
            break
        await asyncio.sleep(0.1)
    async with aiohttp.ClientSession() as session:
        # The generator reads users; a product is cold until this test asks for it.
        async with session.get("http://127.0.0.1:8080/products/7") as first:
            assert (first.status, first.headers["X-Cache"]) == (200, "MISS")
        async with session.get("http://127.0.0.1:8080/products/7") as second:
            assert (second.status, second.headers["X-Cache"]) == (200, "HIT-L1")
    await asyncio.sleep(1.5)  # at least one live line
    assert await asyncio.to_thread(demo.stop, signal.SIGINT) == 0
    output = demo.output()
    assert "req/s" in output
    assert "hit" in output
    assert "stopped." in output
    for port in (8080, 8081, 9000):
        assert port_is_closed(port), f"something still listens on {port} after Ctrl-C"
