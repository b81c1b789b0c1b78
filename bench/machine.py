"""What a benchmark ran on, for its report: the machine and the software."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def machine() -> str:
    """CPUs this process may use (as nproc counts them), their model, the kernel."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    return f"{cpus} CPUs (nproc), {model}, {platform.system()} {platform.release()}"


def cachecar_version() -> str:
    """The installed cachecar version and the checkout's commit, if there is one."""
    try:
        found = version("cachecar")
    except PackageNotFoundError:
        found = "unknown"
    try:
        commit = _git("rev-parse", "--short", "HEAD")
        dirty = _git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return found
    return f"{found} ({commit}{', with local changes' if dirty else ''})"


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=5, check=True
    ).stdout.strip()
