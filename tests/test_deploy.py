"""The deployment artifacts agree with cachecar: the Dockerfile, the Kubernetes example, and the
multi-replica example config.

There is no Docker engine or cluster in a test, so the image is built the way the Dockerfile
says, by hand, and run as the Pod would run it:

    the checkout -> .dockerignore -> the build context -> the build stage's COPY lines
      -> pip wheel (cachecar's wheel, by the locked build backend; the dependencies come from
         this virtualenv, which holds the versions of the lock that the image installs)
      -> a fresh virtualenv holding that wheel, as the runtime stage's /opt/cachecar
      -> ENTRYPOINT + the Pod's args, on the ConfigMap's config, with the Pod's environment
      -> the Pod's probes, the scrape path, the token from the Secret, HEALTHCHECK, SIGTERM

The manifests are read as data; the cachecar config inside the ConfigMap is validated by
cachecar itself, with the environment the Pod spec gives the container.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import signal
import string
import subprocess
import sys
import sysconfig
import time
import tomllib
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from aiohttp import web
from yarl import URL

from proxy.admin import build_admin_app
from proxy.config import load_settings, parse_settings
from proxy.settings import CoherenceSettings, Settings
from tests.ports import free_port

REPO = Path(__file__).resolve().parent.parent
MANIFEST = REPO / "deploy/kubernetes/deployment.yaml"
TOKEN = "token-from-the-secret"  # what a secretKeyRef stands for here
LOOPBACK = {"127.0.0.1", "::1", "localhost"}
ALL_INTERFACES = {"0.0.0.0", "::", ""}


# -- the Dockerfile ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: COPY, ENV, ...
    args: str


@dataclass(frozen=True)
class Image:
    """The Dockerfile: its first (build) stage and its last (runtime) stage."""

    build: list[Instruction]
    runtime: list[Instruction]

    @classmethod
    def read(cls, path: Path = REPO / "Dockerfile") -> Image:
        stages: list[list[Instruction]] = []
        logical = ""
        for line in path.read_text(encoding="utf-8").splitlines():
            stripped = line.strip()
            if not stripped or stripped.startswith("#"):
                continue  # comments (and the syntax directive), also between continued lines
            if stripped.endswith("\\"):
                logical += stripped[:-1] + " "
                continue
            keyword, _, args = (logical + stripped).partition(" ")
            logical = ""
            if keyword.upper() == "FROM":
                stages.append([])
            if stages:  # an ARG before the first FROM belongs to no stage
                stages[-1].append(Instruction(keyword.upper(), args.strip()))
        assert len(stages) >= 2, "the Dockerfile is meant to be multi-stage"
        return cls(stages[0], stages[-1])

    def last(self, keyword: str) -> str:
        """The runtime stage's last ``keyword`` (the one that counts, for CMD, USER, ...)."""
        found = [i.args for i in self.runtime if i.keyword == keyword]
        assert found, f"the runtime stage has no {keyword}"
        return found[-1]

    def env(self) -> dict[str, str]:
        """The runtime stage's ENV, in ``KEY=value`` form."""
        env: dict[str, str] = {}
        for instruction in self.runtime:
            if instruction.keyword == "ENV":
                for pair in shlex.split(instruction.args):
                    key, _, value = pair.partition("=")
                    env[key] = value
        return env

    def exposed_ports(self) -> set[int]:
        return {
            int(port.split("/")[0])
            for i in self.runtime
            if i.keyword == "EXPOSE"
            for port in i.args.split()
        }

    def user(self) -> tuple[int, int]:
        uid, _, gid = self.last("USER").partition(":")
        assert uid.isdigit(), "runAsNonRoot can only verify a numeric USER"
        assert gid.isdigit()
        return int(uid), int(gid)

    def healthcheck(self) -> list[str]:
        _options, _, command = self.last("HEALTHCHECK").partition("CMD ")
        assert command.startswith("["), "HEALTHCHECK in exec form (no shell in the way)"
        argv: list[str] = json.loads(command)
        return argv

    def command(self) -> list[str]:
        entrypoint: list[str] = json.loads(self.last("ENTRYPOINT"))
        cmd: list[str] = json.loads(self.last("CMD"))
        return entrypoint + cmd

    def build_copies(self) -> list[tuple[list[str], str]]:
        """The build stage's ``COPY`` lines as (sources, destination)."""
        copies = []
        for instruction in self.build:
            if instruction.keyword == "COPY":
                *sources, destination = shlex.split(instruction.args)
                assert not any(s.startswith("--") for s in sources), "context copies only"
                copies.append((sources, destination))
        return copies


def dockerignore() -> list[tuple[bool, str]]:
    """(is an exception, pattern) for each line of .dockerignore."""
    patterns = []
    for line in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            exception = line.startswith("!")
            patterns.append((exception, line.removeprefix("!").strip("/")))
    return patterns


def ignored(path: str, patterns: list[tuple[bool, str]]) -> bool:
    """Docker's rule: the last pattern matching the path, or one of its parents, decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    result = False
    for exception, pattern in patterns:
        if any(fnmatch.fnmatchcase(prefix, pattern) for prefix in prefixes):
            result = not exception
    return result


def build_context() -> set[str]:
    """The files ``docker build .`` sends: the checkout less what .dockerignore excludes."""
    patterns = dockerignore()
    exceptions = [pattern for exception, pattern in patterns if exception]
    files: set[str] = set()
    for root, dirs, names in os.walk(REPO):
        here = Path(root).relative_to(REPO).as_posix()
        prefix = "" if here == "." else here + "/"
        # Skip an excluded directory unless an exception reaches inside it (.venv, .git).
        dirs[:] = [
            d
            for d in dirs
            if not ignored(prefix + d, patterns)
            or any(e.startswith(prefix + d + "/") for e in exceptions)
        ]
        files |= {prefix + name for name in names if not ignored(prefix + name, patterns)}
    return files


def replay_build_copies(image: Image, context: set[str], into: Path) -> set[str]:
    """Run the build stage's COPY lines from ``context`` into ``into``; the files copied."""
    used: set[str] = set()
    for sources, destination in image.build_copies():
        for source in sources:
            source = source.rstrip("/")
            if source in context:  # a file: into the destination directory
                chosen = {source: PurePosixPath(source).name}
            else:  # a directory: its contents into the destination
                chosen = {f: f[len(source) + 1 :] for f in context if f.startswith(source + "/")}
            assert chosen, f"COPY {source}: not in the build context (.dockerignore?)"
            for name, relative in chosen.items():
                target = into / destination / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(REPO / name, target)
            used |= set(chosen)
    return used


# -- the Kubernetes example ----------------------------------------------------------------------


@dataclass(frozen=True)
class Pod:
    """The example Deployment's Pod, its cachecar container, and the config it gets."""

    deployment: dict[str, Any]
    spec: dict[str, Any]
    cachecar: dict[str, Any]
    apps: list[dict[str, Any]]
    config_path: str  # where cachecar reads its config, inside the container
    config_text: str  # the ConfigMap's text mounted there
    env: dict[str, str]  # the container's environment; a Secret's value is TOKEN
    secret_env: set[str]

    @classmethod
    def read(cls) -> Pod:
        documents = [d for d in yaml.safe_load_all(MANIFEST.read_text(encoding="utf-8")) if d]
        (deployment,) = [d for d in documents if d["kind"] == "Deployment"]
        spec = deployment["spec"]["template"]["spec"]
        containers = [*spec.get("initContainers", []), *spec["containers"]]
        (cachecar,) = [
            c for c in containers if c["image"].rpartition("/")[2].startswith("cachecar:")
        ]
        apps = [c for c in containers if c is not cachecar]
        args = cachecar.get("args", Image.read().command()[1:])
        config_path = args[args.index("-c") + 1]

        # The file is there only if a mounted ConfigMap volume puts it there.
        mounts = [
            m for m in cachecar["volumeMounts"] if config_path.startswith(m["mountPath"] + "/")
        ]
        assert len(mounts) == 1, f"no volume is mounted where cachecar reads {config_path}"
        mount = mounts[0]
        (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
        file_name = config_path[len(mount["mountPath"]) + 1 :]
        items = volume["configMap"].get("items")
        key = (
            file_name if items is None else next(i["key"] for i in items if i["path"] == file_name)
        )
        (config_map,) = [
            d
            for d in documents
            if d["kind"] == "ConfigMap" and d["metadata"]["name"] == volume["configMap"]["name"]
        ]

        env, secret_env = {}, set()
        for variable in cachecar.get("env", []):
            if "value" in variable:
                env[variable["name"]] = variable["value"]
            else:
                assert "secretKeyRef" in variable["valueFrom"], variable
                env[variable["name"]] = TOKEN
                secret_env.add(variable["name"])
        return cls(
            deployment, spec, cachecar, apps, config_path, config_map["data"][key], env, secret_env
        )

    def settings(self) -> Settings:
        return parse_settings(self.config_text, source=f"{MANIFEST.name} ConfigMap", env=self.env)

    def raw_config(self) -> dict[str, Any]:
        raw: dict[str, Any] = yaml.safe_load(self.config_text)
        return raw

    def container_ports(self) -> dict[str | int, int]:
        """The cachecar container's ports, by name and by number."""
        ports = {p["containerPort"]: p["containerPort"] for p in self.cachecar.get("ports", [])}
        ports |= {
            p["name"]: p["containerPort"] for p in self.cachecar.get("ports", []) if "name" in p
        }
        return ports


def admin_paths() -> set[str]:
    """What the admin listener answers."""
    app = build_admin_app(web.Application())
    return {resource.canonical for resource in app.router.resources()}


def quantity(text: str) -> int:
    """A Kubernetes memory quantity in bytes (``256Mi``, ``1G``)."""
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "K": 10**3, "M": 10**6, "G": 10**9}
    for unit, factor in units.items():
        if text.endswith(unit):
            return int(text.removesuffix(unit)) * factor
    return int(text)


@pytest.fixture(scope="module")
def pod() -> Pod:
    return Pod.read()


@pytest.fixture(scope="module")
def image() -> Image:
    return Image.read()


def test_the_pods_config_is_valid_with_the_environment_the_pod_gives_it(pod: Pod) -> None:
    settings = pod.settings()  # ConfigError names the key and any ${VAR} the Pod does not set
    reference = re.fullmatch(r"\$\{(\w+)\}", pod.raw_config()["admin"]["token"])
    assert reference, "admin.token comes from the environment, with no default to fall back on"
    assert reference.group(1) in pod.secret_env, "and the environment gets it from a Secret"
    assert settings.admin.token == TOKEN


def test_the_probes_and_the_scrape_target_are_on_the_admin_listener(pod: Pod) -> None:
    settings = pod.settings()
    admin = settings.admin.listen
    assert admin.host in ALL_INTERFACES, (
        "the kubelet probes and Prometheus scrapes the Pod's IP: admin.listen must not be loopback"
    )
    ports = pod.container_ports()
    expected = {
        "startupProbe": "/healthz",
        "livenessProbe": "/healthz",
        # Not /readyz: it asks the dependencies every Pod shares, so one outage of them would
        # empty the Service at once (docs/operations.md).
        "readinessProbe": "/healthz",
    }
    for probe, path in expected.items():
        get = pod.cachecar[probe]["httpGet"]
        assert (get["path"], ports.get(get["port"])) == (path, admin.port), probe
    assert set(expected.values()) <= admin_paths()

    annotations = pod.deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == admin.port
    assert annotations["prometheus.io/path"] == "/metrics"
    assert "/metrics" in admin_paths()


def test_the_app_reaches_the_proxy_on_loopback_and_the_proxy_reaches_services(pod: Pod) -> None:
    settings = pod.settings()
    assert settings.server.listen.host in LOOPBACK, "only the Pod's own containers use the proxy"
    app_urls = [
        URL(variable["value"])
        for app in pod.apps
        for variable in app.get("env", [])
        if str(variable.get("value", "")).startswith("http://")
    ]
    assert [(url.host, url.port) for url in app_urls if url.host in LOOPBACK] == [
        (settings.server.listen.host, settings.server.listen.port)
    ]
    # Loopback in a Pod is the Pod itself: the data store and Redis are Services.
    assert URL(settings.upstream.url).host not in LOOPBACK
    assert settings.l2.url is not None
    assert URL(settings.l2.url).host not in LOOPBACK


def test_the_replicas_share_one_redis_and_invalidate_each_others_l1(pod: Pod) -> None:
    settings = pod.settings()
    assert pod.deployment["spec"]["replicas"] > 1
    assert settings.l2.url is not None
    assert URL(settings.l2.url).scheme in {"redis", "rediss"}, "memory:// is one Pod's own"
    assert settings.coherence.enabled
    # The default channel is every service's: sharing a Redis, they would drop each other's keys.
    assert settings.coherence.channel != CoherenceSettings().channel
    assert any(route.tags for route in settings.routes)


def test_the_grace_period_covers_the_apps_drain_and_then_cachecars_stop(pod: Pod) -> None:
    settings = pod.settings()
    # A native sidecar gets SIGTERM only once the app has exited, so the app never loses its
    # data store while it drains; cachecar's shutdown_grace starts after the app's preStop.
    assert pod.cachecar in pod.spec.get("initContainers", [])
    assert pod.cachecar["restartPolicy"] == "Always"
    app_pre_stop = max(app["lifecycle"]["preStop"]["sleep"]["seconds"] for app in pod.apps)
    grace = pod.spec["terminationGracePeriodSeconds"]
    assert grace > app_pre_stop + settings.server.shutdown_grace, (
        f"terminationGracePeriodSeconds {grace} leaves cachecar less than "
        f"server.shutdown_grace ({settings.server.shutdown_grace:g}s) after the app's "
        f"{app_pre_stop}s preStop"
    )


def test_the_sidecar_runs_as_the_images_user_with_memory_for_its_l1(pod: Pod, image: Image) -> None:
    uid, gid = image.user()
    assert uid != 0
    context = pod.cachecar["securityContext"]
    assert (context["runAsUser"], context["runAsGroup"]) == (uid, gid)
    assert pod.spec["securityContext"]["runAsNonRoot"]
    assert context["readOnlyRootFilesystem"]
    limit = quantity(pod.cachecar["resources"]["limits"]["memory"])
    assert limit > pod.settings().l1.max_bytes + (64 << 20), "L1 plus the interpreter"


def test_the_image_serves_the_default_configs_ports_and_checks_healthz(image: Image) -> None:
    default = load_settings(REPO / "config/cachecar.yaml", env={})
    listeners = {default.server.listen.port, default.admin.listen.port}
    assert image.exposed_ports() == listeners
    assert listeners == {Settings.model_fields[s].default.listen.port for s in ("server", "admin")}

    argv = image.healthcheck()
    assert argv[0] == "python", "slim images have no curl; the image's own Python asks"
    url = URL(image.env()["CACHECAR_HEALTHCHECK_URL"])
    assert url.host in LOOPBACK, "it runs inside the container: loopback reaches either binding"
    assert (url.port, url.path) == (default.admin.listen.port, "/healthz")
    assert url.path in admin_paths()


def test_the_pod_runs_the_images_console_script_and_command(image: Image, pod: Pod) -> None:
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"][
        "scripts"
    ]
    command = image.command()
    assert command[0] in scripts
    assert pod.cachecar["args"] == command[1:], "the Pod runs what the image runs by default"


def test_the_replicas_example_shares_redis_and_invalidates_by_its_own_channel() -> None:
    path = REPO / "config/examples/replicas.yaml"
    # tests/proxy/test_settings.py validates it with no environment; this is with one.
    settings = load_settings(
        path, env={"REDIS_URL": "redis://redis:6379/0", "CACHECAR_ADMIN_TOKEN": TOKEN}
    )
    assert settings.l2.url == "redis://redis:6379/0"
    assert settings.admin.token == TOKEN
    assert settings.coherence.enabled
    assert settings.coherence.channel != CoherenceSettings().channel, "the service's own"
    assert any(route.tags for route in settings.routes)


# The build stage's `pip wheel`: cachecar alone, with the locked build backend (it is in this
# virtualenv, from requirements/build.txt, as it is in the image's build stage).
PIP_WHEEL = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]


# -- the image, built and run by hand ------------------------------------------------------------


def test_the_build_context_is_what_the_build_stage_copies(image: Image, tmp_path: Path) -> None:
    context = build_context()
    used = replay_build_copies(image, context, tmp_path)
    assert context - used == set(), "sent to the builder and never used: add to .dockerignore"


def test_the_image_installs_the_locked_versions_and_builds_nothing_else(image: Image) -> None:
    commands = [
        shlex.split(command)
        for instruction in image.build
        if instruction.keyword == "RUN"
        for command in instruction.args.split("&&")
    ]
    installs = [argv for argv in commands if argv[:1] == ["pip"] and "install" in argv]
    from_lock = [argv[argv.index("-r") + 1] for argv in installs if "-r" in argv]
    assert sorted(from_lock) == ["requirements/build.txt", "requirements/runtime.txt"]
    for argv in installs:
        if "-r" in argv:  # a view of uv.lock: every file hash-checked, none built from source
            assert {"--require-hashes", "--only-binary"} <= set(argv), argv
        else:  # cachecar's own wheel, and nothing fetched with it
            assert {"--no-index", "--no-deps"} <= set(argv), argv
    (build,) = [argv for argv in commands if argv[:2] == ["pip", "wheel"]]
    assert {"--no-deps", "--no-build-isolation"} <= set(build), "the backend is the locked one"
    lock = (REPO / "requirements/runtime.txt").read_text()
    assert all(f"\n{name}==" in lock for name in ("aiohttp", "redis", "pydantic"))


@pytest.fixture(scope="module")
def wheel(image: Image, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """cachecar's wheel, built as the image's build stage builds it, from what it copies."""
    work = tmp_path_factory.mktemp("image-build")
    source = work / "src"
    replay_build_copies(image, build_context(), source)
    wheels = work / "wheels"
    result = subprocess.run(
        [*PIP_WHEEL, "--wheel-dir", str(wheels), "."],
        cwd=source,
        capture_output=True,
        text=True,
        env=os.environ | {"PIP_DISABLE_PIP_VERSION_CHECK": "1"},
        check=False,
    )
    assert result.returncode == 0, f"pip wheel failed:\n{result.stdout}{result.stderr}"
    (built,) = wheels.glob("cachecar-*.whl")
    return built


def test_the_wheel_carries_the_files_the_image_runs_on(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        scripts = archive.read(entry_points).decode()
    assert {"proxy/cachecar.yaml", "proxy/static/dashboard.html", "proxy/cli.py"} <= names
    assert re.search(r"^cachecar = proxy\.cli:main$", scripts, re.MULTILINE)
    assert not any(n.startswith(("tests/", "bench/", "config/")) for n in names)


@dataclass
class Running:
    """A process started in the container, its output in a file."""

    popen: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class Container:
    """The runtime stage, stood in for: its /opt/cachecar, its environment, its WORKDIR."""

    opt: Path  # the image's /opt/cachecar
    env: dict[str, str]
    workdir: Path
    started: list[Running]

    def run(self, argv: list[str], **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            argv,
            env=self.env | env,
            cwd=self.workdir,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    def start(self, name: str, argv: list[str]) -> Running:
        log = self.workdir.parent / f"{name}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, env=self.env, cwd=self.workdir
            )
        self.started.append(Running(popen, log))
        return self.started[-1]


def http(
    url: str, *, method: str = "GET", body: bytes | None = None, token: str | None = None
) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body; an error status is an answer too."""
    request = urllib.request.Request(url, data=body, method=method)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    if body is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def wait_until_answers(url: str, process: Running, within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if process.popen.poll() is not None:
            raise AssertionError(f"exited {process.popen.returncode}:\n{process.output()}")
        try:
            http(url)
        except OSError:
            time.sleep(0.05)
            continue
        return
    raise AssertionError(f"{url} did not answer within {within}s:\n{process.output()}")


@pytest.fixture
def container(wheel: Path, image: Image, pod: Pod, tmp_path: Path) -> Iterator[Container]:
    """The wheel installed as the runtime stage installs it, with the image's and Pod's env.

    The image installs the dependencies from their wheels too; here they come from this
    virtualenv's site-packages, added as a path only, so that the editable install of the
    checkout it also holds stays out of sight.
    """
    opt = tmp_path / "opt/cachecar"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(opt)], check=True)
    pip = [sys.executable, "-m", "pip", "--python", str(opt / "bin/python")]
    subprocess.run(
        [*pip, "install", "--quiet", "--no-index", "--no-deps", str(wheel)],
        env=os.environ | {"PIP_DISABLE_PIP_VERSION_CHECK": "1"},
        check=True,
    )
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    dependencies = sysconfig.get_paths()["purelib"]
    (opt / "lib" / version / "site-packages/_dependencies.pth").write_text(dependencies + "\n")
    env = {
        key: string.Template(value.replace("/opt/cachecar", str(opt))).safe_substitute(
            PATH=os.environ["PATH"]
        )
        for key, value in image.env().items()
    }
    workdir = tmp_path / "root"
    workdir.mkdir()
    started: list[Running] = []
    yield Container(opt, env | pod.env, workdir, started)
    for process in started:
        if process.popen.poll() is None:
            process.popen.kill()
            process.popen.wait()


def test_the_installed_wheel_runs_and_not_the_checkout(container: Container) -> None:
    where = container.run(["python", "-c", "import proxy; print(proxy.__file__)"])
    assert where.stdout.startswith(str(container.opt)), where.stdout + where.stderr


@pytest.mark.e2e
def test_the_image_serves_the_pods_config_and_stops_on_sigterm(
    container: Container, image: Image, pod: Pod, tmp_path: Path
) -> None:
    # The Pod's config on ports free here, a demo origin for the data store's Service, and an
    # in-process Redis for the Redis Service.
    settings = pod.settings()
    origin_port, proxy_port, admin_port = free_port(), free_port(), free_port()
    config = pod.raw_config()
    config["server"]["listen"] = f"{settings.server.listen.host}:{proxy_port}"
    config["admin"]["listen"] = f"{settings.admin.listen.host}:{admin_port}"
    config["upstream"]["url"] = f"http://127.0.0.1:{origin_port}"
    config["l2"]["url"] = "memory://"
    mounted = tmp_path / "etc/cachecar/cachecar.yaml"  # the ConfigMap's volume
    mounted.parent.mkdir(parents=True)
    mounted.write_text(yaml.safe_dump(config), encoding="utf-8")
    args = [str(mounted) if arg == pod.config_path else arg for arg in pod.cachecar["args"]]

    origin = container.start("origin", ["cachecar", "origin", "--port", str(origin_port)])
    wait_until_answers(f"http://127.0.0.1:{origin_port}/", origin)
    cachecar = container.start("cachecar", [image.command()[0], *args])
    admin = f"http://127.0.0.1:{admin_port}"
    wait_until_answers(admin + "/healthz", cachecar)

    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        path = pod.cachecar[probe]["httpGet"]["path"]
        status, _, body = http(admin + path)
        assert status == 200, f"{probe} {path}: {status} {body!r}\n{cachecar.output()}"
    annotations = pod.deployment["spec"]["template"]["metadata"]["annotations"]
    status, _, body = http(admin + annotations["prometheus.io/path"])
    assert status == 200
    assert b"cachecar_l1_entries" in body
    status, _, body = http(admin + "/dashboard")  # the page travels in the wheel
    assert status == 200
    assert b"<html" in body.lower()

    # The app's DATASTORE_URL (on this run's port) is answered by cachecar.
    status, headers, _ = http(f"http://127.0.0.1:{proxy_port}/users/1")
    assert "X-Cache" in headers, (status, headers)

    # The token from the Secret, through ${CACHECAR_ADMIN_TOKEN}, guards the mutating calls.
    purge = json.dumps({"tag": "user:1"}).encode()
    assert http(admin + "/admin/purge", method="POST", body=purge)[0] == 401
    status, _, body = http(admin + "/admin/purge", method="POST", body=purge, token=TOKEN)
    assert status == 200, body
    assert "purged" in json.loads(body)

    healthy = container.run(image.healthcheck(), CACHECAR_HEALTHCHECK_URL=admin + "/healthz")
    assert healthy.returncode == 0, healthy.stderr

    began = time.monotonic()
    cachecar.popen.send_signal(signal.SIGTERM)  # what the kubelet sends once the app has exited
    assert cachecar.popen.wait(settings.server.shutdown_grace + 5) == 0, cachecar.output()
    assert time.monotonic() - began < settings.server.shutdown_grace
    gone = container.run(image.healthcheck(), CACHECAR_HEALTHCHECK_URL=admin + "/healthz")
    assert gone.returncode != 0
