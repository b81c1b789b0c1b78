"""The peers cachecar is measured beside, and the tools that drive them.

    find wrk, nginx, varnishd -> missing? root with apt-get: install the Debian packages;
                                          else: say what to install, that peer is skipped
    nginx  : nginx.conf in a temp dir, `nginx -p DIR -c nginx.conf -g 'daemon off;'`
    varnish: a VCL in a temp dir, `varnishd -F -j none -a ... -f VCL -s malloc,SIZE -n DIR`

Each peer is configured as its documentation says a cache in front of an HTTP origin is: one
worker process for the one core it gets, a 10-minute TTL, keep-alive to the origin, request
coalescing on (nginx ``proxy_cache_lock``; Varnish's waiting list is always on), no access log
(cachecar writes none by default either). Nothing is tuned down.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

APT_TIMEOUT = 600.0  # seconds an apt-get install may take
NGINX_KEYS_ZONE = "32m"  # ~256,000 keys: never the bound, max_size is
# The command line of a process name that Debian keeps outside a non-root PATH.
_SBIN = ("/usr/sbin", "/usr/local/sbin", "/sbin")


@dataclass(frozen=True)
class Tool:
    program: str  # what is run
    package: str  # the Debian package that ships it
    needed_by: str  # what cannot run without it


WRK = Tool("wrk", "wrk", "every workload (the load generator)")
NGINX = Tool("nginx", "nginx", "the nginx proxy_cache peer")
VARNISH = Tool("varnishd", "varnish", "the Varnish peer")
TOOLS = (WRK, NGINX, VARNISH)


def find(program: str) -> str | None:
    found = shutil.which(program)
    if found:
        return found
    for directory in _SBIN:
        candidate = Path(directory) / program
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def ensure(tools: tuple[Tool, ...]) -> tuple[dict[str, str], list[str]]:
    """The path of each tool, installing the missing ones with apt-get when running as root;
    and a line for each one that is still missing, naming the package to install."""
    missing = [tool for tool in tools if find(tool.program) is None]
    notes: list[str] = []
    if missing and os.geteuid() == 0 and shutil.which("apt-get"):
        packages = sorted({tool.package for tool in missing})
        _progress(f"installing the Debian packages {' '.join(packages)} (apt-get, as root)")
        notes.extend(_apt_install(packages))
    found: dict[str, str] = {}
    for tool in tools:
        path = find(tool.program)
        if path is not None:
            found[tool.program] = path
        else:
            how = (
                "apt-get install failed (see above)"
                if os.geteuid() == 0 and shutil.which("apt-get")
                else f"install it: sudo apt-get install {tool.package}"
            )
            notes.append(
                f"`{tool.program}` (Debian package `{tool.package}`) is missing, so "
                f"{tool.needed_by} is skipped; {how}"
            )
    return found, notes


def _apt_install(packages: list[str]) -> list[str]:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages],
    ):
        try:
            done = subprocess.run(
                command, env=env, capture_output=True, text=True, timeout=APT_TIMEOUT, check=False
            )
        except (OSError, subprocess.SubprocessError) as exc:
            return [f"`{' '.join(command)}` failed: {exc}"]
        if done.returncode != 0:
            return [f"`{' '.join(command)}` exited {done.returncode}: {done.stderr[-500:]}"]
    return []


# -- nginx ---------------------------------------------------------------------------------------


def nginx_conf(directory: Path, port: int, origin_port: int, max_size: int) -> str:
    """proxy_cache in front of the origin; ``max_size`` bytes of cache (nginx counts whole
    filesystem blocks per cached file)."""
    return nginx_frame(
        directory,
        f"""  proxy_cache_path {directory}/cache levels=1:2 keys_zone=bench:{NGINX_KEYS_ZONE}
                   max_size={max_size} inactive=10m use_temp_path=off;
  upstream origin {{ server 127.0.0.1:{origin_port}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location / {{
      proxy_pass http://origin;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_cache bench;
      proxy_cache_valid 200 10m;
      proxy_cache_lock on;
      proxy_cache_lock_timeout 10s;
      proxy_cache_lock_age 10s;
      add_header X-Cache-Status $upstream_cache_status;
    }}
  }}
""",
    )


def nginx_frame(directory: Path, http: str) -> str:
    """An nginx.conf of one worker whose files all live in ``directory``, with ``http`` (the
    caches and servers) inside its http block."""
    # As root, nginx's workers would run as nobody and could not write the temp dir.
    user = "user root;\n" if os.geteuid() == 0 else ""
    temp = "\n".join(
        f"  {kind}_temp_path {directory}/{kind}_temp;"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""{user}worker_processes 1;
error_log {directory}/error.log warn;
pid {directory}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
  access_log off;
{temp}
{http}}}
"""


def nginx_command(binary: str, directory: Path) -> list[str]:
    return [
        binary,
        "-e",
        str(directory / "error.log"),
        "-p",
        str(directory),
        "-c",
        str(directory / "nginx.conf"),
        "-g",
        "daemon off;",
    ]


def nginx_entries(directory: Path) -> int:
    """Files in nginx's cache directory: the entries it holds."""
    return sum(len(files) for _, _, files in os.walk(directory / "cache"))


def nginx_version(binary: str) -> str:
    return _first_line([binary, "-v"]).removeprefix("nginx version: nginx/")


# -- Varnish -------------------------------------------------------------------------------------


def vcl(origin_port: int) -> str:
    return f"""vcl 4.1;
backend origin {{ .host = "127.0.0.1"; .port = "{origin_port}"; }}
sub vcl_backend_response {{ set beresp.ttl = 10m; }}
sub vcl_deliver {{
  if (obj.hits > 0) {{ set resp.http.X-Cache = "HIT"; }} else {{ set resp.http.X-Cache = "MISS"; }}
}}
"""


VARNISH_SMALLEST = 1 << 20  # varnishd refuses a malloc storage below 1 MiB


def varnish_command(binary: str, directory: Path, port: int, storage: int) -> list[str]:
    # -j none: as root the default jail reads the VCL as an unprivileged user, which cannot
    # enter a private temp dir; -F: in the foreground, stopped like any other process.
    return [
        binary,
        "-F",
        "-j",
        "none",
        "-a",
        f"127.0.0.1:{port}",
        "-f",
        str(directory / "bench.vcl"),
        "-s",
        f"malloc,{max(storage, VARNISH_SMALLEST)}",
        "-n",
        str(directory / "varnish"),
    ]


def varnish_counters(binary: str, directory: Path) -> dict[str, int]:
    """varnishstat's counters (MAIN.n_object, SMA.s0.g_bytes, ...), or {} if it cannot say."""
    stat = Path(binary).with_name("varnishstat")
    program = str(stat) if stat.is_file() else (find("varnishstat") or "varnishstat")
    try:
        done = subprocess.run(
            [program, "-n", str(directory / "varnish"), "-1"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return {}
    counters: dict[str, int] = {}
    for line in done.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[1].isdigit():
            counters[parts[0]] = int(parts[1])
    return counters


def varnish_version(binary: str) -> str:
    found = re.search(r"varnish-([\w.]+)", _first_line([binary, "-V"]))
    return found[1] if found else "unknown"


def _first_line(command: list[str]) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    lines = (done.stderr + done.stdout).strip().splitlines()
    return lines[0].strip() if lines else "unknown"


def _progress(message: str) -> None:
    print(f"bench.side_by_side: {message}", file=sys.stderr, flush=True)
