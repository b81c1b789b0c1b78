"""The README's set-up on a clean clone: both commands install exactly the lock, and nothing else.

    this repository -> git clone into a temporary directory (+ the working tree's uncommitted
    changes, so that a change to the lock is tried before it is committed)
      -> scripts/demo              installs requirements/runtime.txt + build.txt, and the demo
                                   answers MISS, then HIT-L1
      -> pip freeze                == those two views of uv.lock, under this Python's markers
      -> scripts/bootstrap dev     (what scripts/test runs first) on every supported Python
      -> pip freeze                == requirements/dev.txt + build.txt; the engine's tests pass

The installs take their packages from the package index (or pip's cache), hash-checked.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.utils import canonicalize_name

from tests.conftest import IN_CI
from tests.e2e.conftest import Spawn
from tests.e2e.test_cli import check_the_demo

REPO = Path(__file__).resolve().parents[2]
# The supported Pythons, as pyproject.toml's classifiers (and the README) name them.
SUPPORTED = [
    c.rpartition(" :: ")[2]
    for c in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["classifiers"]
    if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)
]
# `name==version ; marker \` as uv export writes it; the hashes follow on lines of their own.
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)\s*(?:;\s*(.+?))?\s*\\?$")
INSTALL = 600  # seconds: a fresh machine downloads every wheel


def clone(into: Path) -> Path:
    """A clone of this repository, as a user gets it from ``git clone``, with the files the
    working tree adds or changes laid over HEAD (a file deleted but not committed stays)."""
    subprocess.run(["git", "clone", "--quiet", "--no-hardlinks", str(REPO), str(into)], check=True)
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout
    for name in filter(None, listed.decode().split("\0")):
        source = REPO / name
        if source.is_file():
            (into / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, into / name)
    return into


def run(checkout: Path, *command: str, **env: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        list(command),
        cwd=checkout,
        env=os.environ | env,
        capture_output=True,
        text=True,
        timeout=INSTALL,
        check=False,
    )
    assert result.returncode == 0, f"{' '.join(command)}:\n{result.stdout}{result.stderr}"
    return result


def locked(checkout: Path, views: list[str], python: Path) -> dict[str, str]:
    """The pins of ``requirements/<view>.txt`` that apply to ``python`` (its markers)."""
    environment = json.loads(
        run(
            checkout,
            str(python),
            "-c",
            "import json; from packaging.markers import default_environment as e; "
            "print(json.dumps(e()))",
        ).stdout
    )
    pins: dict[str, str] = {}
    for view in views:
        for line in (checkout / "requirements" / f"{view}.txt").read_text().splitlines():
            if match := PIN.match(line):
                name, version, marker = match.groups()
                if marker is None or Marker(marker).evaluate(environment):
                    pins[canonicalize_name(name)] = version
    assert pins, f"no pins read from {views}"
    return pins


def installed(checkout: Path) -> dict[str, str]:
    """What the clone's .venv holds, as ``pip freeze`` says (pip itself and cachecar aside)."""
    freeze = run(checkout, str(checkout / ".venv/bin/python"), "-m", "pip", "freeze").stdout
    found: dict[str, str] = {}
    for line in freeze.splitlines():
        if line.startswith(("#", "-e ")):
            continue  # cachecar itself, editable: "-e /path" under a comment naming it
        name, _, version = line.partition("==")
        assert version, f"pip freeze: {line!r} is not a pinned release"
        found[canonicalize_name(name)] = version
    return found


def interpreter(version: str) -> Path | None:
    """A Python ``version`` on this machine: on PATH, else one that pyenv installed."""
    pyenv = os.environ.get("PYENV_ROOT", str(Path.home() / ".pyenv"))
    candidates = [
        shutil.which(f"python{version}"),
        *sorted(glob.glob(f"{pyenv}/versions/{version}.*/bin/python{version}")),
        f"/usr/bin/python{version}",
    ]
    for candidate in filter(None, candidates):
        try:
            said = subprocess.run(
                [candidate, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
        except OSError:
            continue
        if said.returncode == 0 and said.stdout.strip() == version:
            return Path(candidate)
    return None


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    return clone(tmp_path / "cachecar")


@pytest.mark.timeout(INSTALL + 180)
async def test_scripts_demo_on_a_clean_clone_installs_the_lock_and_answers(
    checkout: Path, spawn: Spawn
) -> None:
    await check_the_demo(spawn, [str(checkout / "scripts/demo"), "--concurrency", "2"], checkout)
    python = checkout / ".venv/bin/python"
    assert installed(checkout) == locked(checkout, ["runtime", "build"], python)


@pytest.mark.timeout(INSTALL + 300)
@pytest.mark.parametrize("version", SUPPORTED)
def test_scripts_bootstrap_dev_installs_exactly_the_lock_on_each_python(
    checkout: Path, version: str
) -> None:
    python = interpreter(version)
    if python is None:
        message = f"Python {version} is supported (README) but not on this machine"
        if IN_CI:
            pytest.fail(f"{message}; CI must try the lock on it")
        pytest.skip(f"{message}; not in CI, so skipped here and failed in CI")
    run(checkout, "scripts/bootstrap", "dev", PYTHON=str(python))
    venv = checkout / ".venv/bin/python"
    said = run(checkout, str(venv), "-c", "import sys; print('%d.%d' % sys.version_info[:2])")
    assert said.stdout.strip() == version
    assert installed(checkout) == locked(checkout, ["dev", "build"], venv)
    # The packages work there, not only install: the engine's tests, from the clone.
    tests = run(
        checkout, str(checkout / ".venv/bin/pytest"), "-q", "-p", "no:cacheprovider", "tests/cache"
    )
    assert re.search(r"\d+ passed", tests.stdout), tests.stdout


def test_bootstrap_makes_the_venv_anew_when_the_lock_changes(checkout: Path) -> None:
    run(checkout, "scripts/bootstrap")
    stray = checkout / ".venv/lib/stray-package-marker"
    stray.write_text("left by an install the lock no longer names")
    run(checkout, "scripts/bootstrap")
    assert stray.exists(), "the same lock reuses the virtualenv"
    lock = checkout / "uv.lock"
    lock.write_text(lock.read_text() + "\n")
    run(checkout, "scripts/bootstrap")
    assert not stray.exists(), "a changed lock must not keep what the old one installed"
    assert installed(checkout) == locked(
        checkout, ["runtime", "build"], checkout / ".venv/bin/python"
    )


def test_the_readme_names_the_supported_pythons() -> None:
    named = ", ".join(SUPPORTED[:-1]) + " and " + SUPPORTED[-1]
    assert f"supports CPython {named}" in (REPO / "README.md").read_text()
