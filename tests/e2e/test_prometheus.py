"""The Grafana dashboard and the alerting rules, against a real Prometheus scraping cachecar.

    cachecar origin <- cachecar serve (real Redis L2) <- traffic from the test
                            ^ /metrics every second
                       prometheus (Debian package, tsdb in tmp_path, the alerting rules loaded)
                            ^ /api/v1/query: every panel query, Grafana variables filled in

The traffic makes every series the dashboard draws: L1 and L2 hits, misses, a coalesced fetch,
unrouted paths, cache-aside and write-behind writes (one of them dead-lettered), and origin
failures while the origin is down. Each query must then parse, name only metrics cachecar
exports, and return data. promtool checks and unit-tests the rules.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import re
import shutil
import signal
import subprocess
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from redis.asyncio import Redis

from tests.conftest import IN_CI
from tests.e2e.conftest import Config, Process, Spawn, start_origin, start_proxy, until, wait_http
from tests.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "grafana" / "dashboards" / "cachecar.json"
RULES = ROOT / "grafana" / "alerts" / "cachecar.rules.yml"
RULES_TEST = ROOT / "grafana" / "alerts" / "cachecar.rules.test.yml"
DOCS = ROOT / "docs" / "observability.md"

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# What Grafana puts in place of each variable, for this test's Prometheus (a scrape a second):
# every route and instance, and a rate window that holds all the traffic.
VARIABLES = {
    "route": ".*",
    "instance": ".*",
    "__rate_interval": "15s",
    "__interval": "1s",
    "__range": "15s",
}
JOB = "cachecar"

# /items/{id}: L1 keeps an entry 300ms, so a read of it half a second later is an L2 hit.
CONFIG = """\
server: {{listen: "127.0.0.1:{port}", shutdown_grace: 5s}}
admin: {{listen: "127.0.0.1:{admin}"}}
upstream: {{url: "{origin}", timeout: 2s}}
l2: {{url: "{redis}", key_prefix: "{prefix}", timeout: 200ms, breaker: {{failures: 3, reset_after: 1s}}}}
coherence: {{channel: "{prefix}invalidate"}}
routes:
  - path: /users/{{id}}
    key: "users:{{id}}"
  - path: /items/{{id}}
    key: "items:{{id}}"
    ttl: {{l1: 300ms, l2: 10m}}
  - path: /carts/{{id}}
    key: "carts:{{id}}"
    mode: write-behind
write_behind: {{flush_interval: 200ms, backoff: {{initial: 100ms, max: 500ms}}}}
"""

PROMETHEUS_CONFIG = """\
global: {{scrape_interval: 1s, scrape_timeout: 900ms, evaluation_interval: 1s}}
rule_files: ["{rules}"]
scrape_configs:
  - job_name: {job}
    static_configs: [{{targets: [{targets}]}}]
"""


def binary(name: str) -> str:
    """A Prometheus binary; missing, it fails the test in CI and skips it elsewhere."""
    found = shutil.which(name)
    if found is None:
        message = f"{name} is not installed (scripts/test installs the Debian package prometheus)"
        if IN_CI:
            pytest.fail(f"{message}; CI needs it")
        pytest.skip(f"{message}; not in CI, so skipped here and failed in CI")
    return found


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside rows (collapsed rows hold theirs) included; rows themselves not."""
    for panel in board["panels"]:
        if panel["type"] == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def queries(board: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title and refId, expression) of every panel query."""
    return [
        (f"{panel['title']} [{target['refId']}]", target["expr"])
        for panel in panels(board)
        for target in panel["targets"]
    ]


_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)(?::\w+)?\]\]")


def substitute(expr: str) -> str:
    """``expr`` as Grafana sends it to Prometheus: every variable replaced by its value."""

    def value(match: re.Match[str]) -> str:
        name = next(group for group in match.groups() if group)
        if name not in VARIABLES:
            raise AssertionError(f"${name} in {expr!r} is not a variable this dashboard defines")
        return VARIABLES[name]

    return _VARIABLE.sub(value, expr)


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_NAME = re.compile(r"(?<![\w.:])([A-Za-z_:][\w:]*)(\s*\()?")
_NOT_METRICS = frozenset(
    {
        *("by", "without", "on", "ignoring", "group_left", "group_right"),
        *("bool", "and", "or", "unless", "offset", "inf", "nan"),
        *("sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values"),
        *("bottomk", "topk", "quantile"),
    }
)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (its selectors' names, bare or in {})."""
    assert "__name__" not in expr, f"select metrics by their name, not __name__: {expr!r}"
    text = _STRING.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries
    text = _GROUPING.sub(r"\1", text)
    return {
        name for name, call in _NAME.findall(text) if not call and name.lower() not in _NOT_METRICS
    }


def exported_names(exposition: str) -> dict[str, str]:
    """Every name a query may select in ``exposition``, to the family it belongs to.

    The text format's ``# TYPE`` lines name the families: a counter as ``x_total``, a histogram
    as ``x`` with its ``x_bucket``, ``x_count`` and ``x_sum`` series, a gauge as itself.
    """
    names: dict[str, str] = {}
    for line in exposition.splitlines():
        if not line.startswith("# TYPE "):
            continue
        _, _, family, kind = line.split()
        if kind in {"histogram", "summary"}:
            suffixes = ("_count", "_sum") + (("_bucket",) if kind == "histogram" else ("",))
            names.update({family + suffix: family for suffix in suffixes})
        else:
            names[family] = family
    return names


def finite(sample: dict[str, Any]) -> bool:
    return math.isfinite(float(sample["value"][1]))


# -- the dashboard and the rules as files ---------------------------------------------------------


def test_the_dashboard_is_grafana_json_whose_panels_all_query_the_datasource_variable() -> None:
    board = dashboard()
    assert board["schemaVersion"] >= 39
    assert board["uid"] == "cachecar"
    variables = {variable["name"]: variable for variable in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in set(variables) - {"datasource"}:
        assert variables[name]["datasource"] == DATASOURCE, name
        assert name in VARIABLES, f"the test has no value for the variable ${name}"

    ids = [panel["id"] for panel in board["panels"]] + [
        inner["id"] for panel in board["panels"] for inner in panel.get("panels", [])
    ]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    taken: dict[tuple[int, int], str] = {}
    for panel in board["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for cell in itertools.product(
            range(grid["x"], grid["x"] + grid["w"]), range(grid["y"], grid["y"] + grid["h"])
        ):
            assert cell not in taken, f"{panel['title']!r} overlaps {taken[cell]!r}"
            taken[cell] = panel["title"]

    drawn = list(panels(board))
    assert drawn
    titles = [panel["title"] for panel in drawn]
    assert len(titles) == len(set(titles)), "each panel has a title of its own"
    for panel in drawn:
        title = panel["title"]
        assert panel["type"] in {"timeseries", "stat"}, title
        assert panel["datasource"] == DATASOURCE, title
        description = panel.get("description", "")
        assert description.endswith("."), title
        assert "\n" not in description, title
        assert panel["targets"], title
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), title
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, title
            assert target["expr"].strip(), title
            assert "$datasource" not in target["expr"], title
            substitute(target["expr"])  # every variable it uses is defined


def test_promtool_checks_the_alerting_rules_and_their_unit_tests_pass() -> None:
    promtool = binary("promtool")
    for args in (["check", "rules", str(RULES)], ["test", "rules", str(RULES_TEST)]):
        done = subprocess.run(
            [promtool, *args], capture_output=True, text=True, timeout=60, check=False
        )
        assert done.returncode == 0, f"promtool {' '.join(args)}:\n{done.stdout}{done.stderr}"

    alerts = [rule for rule in rules() if "alert" in rule]
    assert {rule["alert"] for rule in alerts} >= {
        "CachecarHitRatioLow",
        "CachecarWriteBehindLagging",
        "CachecarWriteBehindDeadLetters",
        "CachecarL2BreakerOpen",
        "CachecarOriginErrors",
    }
    tested = RULES_TEST.read_text()
    for rule in alerts:
        annotations = rule["annotations"]
        assert {"summary", "description", "runbook"} <= set(annotations), rule["alert"]
        assert annotations["runbook"].startswith("docs/observability.md#"), rule["alert"]
        assert f"alertname: {rule['alert']}" in tested, f"{rule['alert']} has no unit test"


def test_every_runbook_is_a_section_of_the_observability_guide() -> None:
    if not DOCS.exists():
        message = f"{DOCS.relative_to(ROOT)} is missing, so the runbook links go nowhere"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(f"{message}; not in CI, so skipped here and failed in CI")
    anchors = set()
    for line in DOCS.read_text().splitlines():
        if line.startswith("#"):
            heading = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"\s", "-", re.sub(r"[^\w\- ]", "", heading)))
        anchors.update(re.findall(r'<a (?:id|name)="([^"]+)"', line))
    missing = {
        rule["alert"]: rule["annotations"]["runbook"]
        for rule in rules()
        if "alert" in rule and rule["annotations"]["runbook"].partition("#")[2] not in anchors
    }
    assert not missing, f"runbooks with no section in {DOCS.name}: {missing}"


def rules() -> list[dict[str, Any]]:
    loaded = yaml.safe_load(RULES.read_text())
    return [rule for group in loaded["groups"] for rule in group["rules"]]


# -- the queries against a real Prometheus ---------------------------------------------------------


@dataclass
class Prometheus:
    url: str
    process: Process
    session: aiohttp.ClientSession

    async def api(self, path: str, **params: str) -> Any:
        """The ``data`` of an HTTP API answer; fails with Prometheus's error otherwise."""
        async with self.session.get(self.url + "/api/v1/" + path, params=params) as response:
            answer = await response.json()
        if answer.get("status") != "success":
            raise AssertionError(f"{path} {params}: {answer.get('error', answer)}")
        return answer["data"]

    async def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        params = {"query": expr} if at is None else {"query": expr, "time": f"{at:.3f}"}
        data = await self.api("query", **params)
        assert data["resultType"] == "vector", (expr, data["resultType"])
        result: list[dict[str, Any]] = data["result"]
        return result

    async def fewest_samples(self, selector: str, window: str) -> int:
        """The fewest samples any series of ``selector`` has in the last ``window``."""
        data = await self.api("query", query=f"{selector}[{window}]")
        return min((len(series["values"]) for series in data["result"]), default=0)

    async def value(self, expr: str) -> float | None:
        result = await self.query(expr)
        return float(result[0]["value"][1]) if result else None


def start_prometheus(
    spawn: Spawn, tmp_path: Path, session: aiohttp.ClientSession, *targets: str
) -> Prometheus:
    """Prometheus scraping ``targets``, started: wait for its /-/ready before querying it."""
    port = free_port()
    config = tmp_path / "prometheus.yml"
    listed = ", ".join(f'"{target}"' for target in targets)
    config.write_text(PROMETHEUS_CONFIG.format(rules=RULES, job=JOB, targets=listed))
    process = spawn(
        "prometheus",
        [
            binary("prometheus"),
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
    )
    return Prometheus(f"http://127.0.0.1:{port}", process, session)


class Traffic:
    """Requests through the proxy, counted: every one of them is in cachecar_requests_total."""

    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        self.session = session
        self.url = url
        self.sent = 0

    async def send(
        self, method: str, path: str, body: bytes | None = None, expect: set[int] | None = None
    ) -> int:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        async with self.session.request(
            method, self.url + path, data=body, headers=headers
        ) as response:
            await response.read()
        self.sent += 1
        if expect is not None:
            assert response.status in expect, (method, path, response.status)
        return response.status

    async def round(self, n: int) -> None:
        """One of each kind of request, on keys of round ``n``'s own where a miss is wanted."""
        for i in range(1, 4):
            await self.send("GET", f"/users/{i}", expect={200})  # a miss once, L1 hits after
        await self.send("HEAD", "/users/1", expect={200})
        for i in range(3):
            await self.send("GET", f"/users/{10 + 3 * n + i}", expect={200})  # misses
        for i in range(3):
            # L1 keeps these 300ms: after the first round, each read here is an L2 hit.
            await self.send("GET", f"/items/{i}", expect={200})
        await self.send("PUT", f"/users/{100 + n}", user(n), expect={200, 201})  # drops the key
        await self.send("PUT", f"/carts/{n}", user(n), expect={202})  # queued
        await self.send("PUT", f"/carts/{n}", user(n, again=True), expect={202})  # coalesced
        await self.send("GET", "/", expect={200})  # no route: passed through
        await self.send("GET", f"/unrouted/{n}", expect={404})


def user(n: int, **fields: object) -> bytes:
    return json.dumps({"n": n, **fields}).encode()


@pytest.mark.redis
async def test_every_dashboard_query_returns_cachecar_data_from_a_real_prometheus(
    redis_client: Redis, spawn: Spawn, tmp_path: Path, redis_url: str, key_prefix: str
) -> None:
    board = dashboard()
    port, admin, origin_port = free_port(), free_port(), free_port()
    # A second replica on the same Redis: it hears the first one's writes (coherence).
    port_b, admin_b = free_port(), free_port()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        # Prometheus first: it takes up new scrape targets only 5s after it starts.
        prometheus = start_prometheus(
            spawn, tmp_path, session, f"127.0.0.1:{admin}", f"127.0.0.1:{admin_b}"
        )
        # Origin latency keeps a miss in flight long enough for concurrent reads to wait on it.
        db = tmp_path / "origin.sqlite"
        origin = await start_origin(spawn, "20ms", port=origin_port, db=db)
        await asyncio.gather(
            *(origin.put(f"/users/{i}", {"id": i}) for i in range(40)),
            *(origin.put(f"/items/{i}", {"id": i}) for i in range(3)),
        )
        config = tmp_path / "cachecar.yaml"
        config.write_text(
            CONFIG.format(
                port=port, admin=admin, origin=origin.url, redis=redis_url, prefix=key_prefix
            )
        )
        proxy = await start_proxy(
            spawn, Config(config, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin}")
        )
        config_b = tmp_path / "cachecar-b.yaml"
        config_b.write_text(
            CONFIG.format(
                port=port_b, admin=admin_b, origin=origin.url, redis=redis_url, prefix=key_prefix
            )
        )
        proxy_b = await start_proxy(
            spawn,
            Config(config_b, f"http://127.0.0.1:{port_b}", f"http://127.0.0.1:{admin_b}"),
            name="proxy-b",
        )
        await wait_http(prometheus.url + "/-/ready", prometheus.process)

        async def scraped() -> bool:
            return await prometheus.value(f'sum(up{{job="{JOB}"}})') == 2

        await until(scraped, "Prometheus scraping both replicas' /metrics")

        traffic = Traffic(session, proxy.url)
        replica_b = Traffic(session, proxy_b.url)
        for i in range(1, 4):
            await replica_b.send("GET", f"/users/{i}", expect={200})
        for n in range(3):
            await traffic.round(n)
            await asyncio.sleep(0.5)

        # The origin goes away for a moment: misses find no origin, queued writes are retried.
        origin.process.stop(signal.SIGKILL)
        for i in range(3):
            await traffic.send("GET", f"/users/{30 + i}", expect={502, 503, 504})
        await traffic.send("PUT", "/carts/while-down", user(0), expect={202})
        await asyncio.sleep(0.7)
        await start_origin(spawn, "20ms", port=origin_port, db=db, name="origin-again")

        for n in range(3, 6):
            await traffic.round(n)
            await asyncio.sleep(0.5)
        # Concurrent reads of one cold key: one goes to the origin, the others wait for it.
        await asyncio.gather(*(traffic.send("GET", "/users/39", expect={200}) for _ in range(10)))
        # The origin refuses this write for good: a dead letter.
        await traffic.send("PUT", "/carts/refused", b"this is not JSON", expect={202})
        await traffic.round(6)

        async with session.get(proxy.admin + "/metrics") as response:
            assert response.status == 200
            exposition = await response.text()

        async def settled() -> bool:
            # Every request counted, every series of cachecar's scraped at least twice within
            # the rate window (a rate needs two samples), and the dead letter reported.
            requests = await prometheus.value(f'sum(cachecar_requests_total{{job="{JOB}"}})')
            fewest = await prometheus.fewest_samples(
                f'{{job="{JOB}", __name__=~"cachecar_.+"}}', "15s"
            )
            dead = await prometheus.value("max(cachecar_write_behind_dead_letters)")
            sent = traffic.sent + replica_b.sent
            return requests == sent and fewest >= 2 and dead == 1

        try:
            await until(settled, "Prometheus holding all the traffic's series")
        except AssertionError as exc:
            requests = await prometheus.value(f'sum(cachecar_requests_total{{job="{JOB}"}})')
            dead = await prometheus.value("max(cachecar_write_behind_dead_letters)")
            raise AssertionError(
                f"{exc}: sent {traffic.sent} + {replica_b.sent} requests, "
                f"cachecar_requests_total says {requests}; "
                f"dead letters {dead}\n{proxy.process.output()}"
            ) from None

        # -- every panel query, at one instant ----------------------------------------------
        exported = exported_names(exposition)
        at = time.time()
        results: dict[str, list[dict[str, Any]]] = {}
        problems: list[str] = []
        for where, expr in queries(board):
            sent = substitute(expr)
            unknown = metric_names(sent) - set(exported)
            if unknown:
                problems.append(f"{where}: {sorted(unknown)} not in cachecar's /metrics")
            try:
                result = await prometheus.query(sent, at)
            except AssertionError as exc:
                problems.append(f"{where}: does not run: {exc}")
                continue
            results[where] = result
            if not result:
                problems.append(f"{where}: no data for {sent}")
            elif not any(finite(sample) for sample in result):
                problems.append(f"{where}: only NaN/Inf for {sent}: {result}")
        assert not problems, "\n".join(problems)

        drawn = set().union(*(metric_names(substitute(expr)) for _, expr in queries(board)))
        undrawn = {f for f in set(exported.values()) if f.startswith("cachecar_")} - {
            exported[name] for name in drawn
        }
        undrawn -= {f for f in undrawn if f.endswith("_created")}
        assert not undrawn, f"cachecar exports metrics no panel draws: {sorted(undrawn)}"

        # The traffic did what it was meant to: each kind of answer is in the data.
        by_outcome = results["Requests by outcome [A]"]
        assert {s["metric"]["outcome"] for s in by_outcome} >= {
            "hit_l1",
            "hit_l2",
            "miss",
            "bypass",
            "write",
        }, by_outcome
        statuses = {s["metric"]["status"] for s in results["Origin errors [A]"]}
        assert "unreachable" in statuses, statuses
        for tier in "BC":  # L1's and L2's hit ratio: each strictly between 0 and 1
            where = f"Hit ratio, overall and by tier [{tier}]"
            [sample] = results[where]
            assert 0 < float(sample["value"][1]) < 1, (where, sample)
        coalesced = await prometheus.value("sum(cachecar_coalesced_requests_total)")
        assert coalesced, "no read waited for another's fetch: nothing to draw as coalesced"

        # -- the template variables' own queries ------------------------------------------------
        for variable in board["templating"]["list"]:
            if variable["type"] != "query":
                continue
            found = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", substitute(variable["query"]))
            assert found, variable["query"]
            selector, label = found.groups()
            values = await prometheus.api(f"label/{label}/values", **{"match[]": selector})
            assert values, f"${variable['name']}: no values for {variable['query']}"

        # -- the alerting rules, loaded by the real Prometheus ----------------------------------
        async def evaluated() -> bool:
            groups = (await prometheus.api("rules"))["groups"]
            return all(
                rule["health"] == "ok" and not rule["lastEvaluation"].startswith("0001-")
                for group in groups
                for rule in group["rules"]
            )

        try:
            await until(evaluated, "every rule evaluated without error", within=5)
        except AssertionError as exc:
            groups = (await prometheus.api("rules"))["groups"]
            broken = [
                (rule["name"], rule["health"], rule.get("lastError"))
                for group in groups
                for rule in group["rules"]
                if rule["health"] != "ok"
            ]
            raise AssertionError(f"{exc}: {broken}") from None

        async def dead_letter_alert() -> bool:
            alerts = (await prometheus.api("alerts"))["alerts"]
            return any(
                alert["labels"]["alertname"] == "CachecarWriteBehindDeadLetters" for alert in alerts
            )

        await until(dead_letter_alert, "CachecarWriteBehindDeadLetters pending", within=5)

    assert proxy.process.stop() == 0, proxy.process.output()


# The hit ratios of docs/observability.md, as PromQL over a window that holds every scrape of the test.
OVERALL = (
    'sum(increase(cachecar_request_duration_seconds_count{{outcome=~"hit_l1|hit_l2"}}[{w}]))'
    " / sum(increase(cachecar_request_duration_seconds_count"
    '{{outcome=~"hit_l1|hit_l2|miss|stale|revalidated"}}[{w}]))'
)
TIER = (
    'sum(increase(cachecar_cache_lookups_total{{tier="{tier}",result="hit"}}[{w}]))'
    ' / sum(increase(cachecar_cache_lookups_total{{tier="{tier}"}}[{w}]))'
)


@pytest.mark.redis
async def test_promql_hit_ratios_of_a_known_sequence_are_exact_across_a_restart(
    redis_client: Redis, spawn: Spawn, tmp_path: Path, redis_url: str, key_prefix: str
) -> None:
    """1 miss + 9 L1 hits on one key, 1 miss on another, a restart, 2 L2 hits: 11/13 overall."""
    port, admin = free_port(), free_port()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        prometheus = start_prometheus(spawn, tmp_path, session, f"127.0.0.1:{admin}")
        origin = await start_origin(spawn)
        await origin.put("/users/1", {"id": 1})
        await origin.put("/users/2", {"id": 2})
        path = tmp_path / "cachecar.yaml"
        path.write_text(
            CONFIG.format(
                port=port, admin=admin, origin=origin.url, redis=redis_url, prefix=key_prefix
            )
        )
        config = Config(path, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin}")
        proxy = await start_proxy(spawn, config)
        await wait_http(prometheus.url + "/-/ready", prometheus.process)
        started = time.time()
        # Pre-created at 0 for every cached route, so it reads 0 (not "no data") after a restart.
        requests = f'sum(cachecar_request_duration_seconds_count{{job="{JOB}"}})'

        async def scrapes(at_least: int) -> bool:
            samples = await prometheus.fewest_samples(
                f'cachecar_request_duration_seconds_count{{job="{JOB}"}}', "60s"
            )
            return samples >= at_least

        # The series start at 0 and are scraped before the first request.
        await until(lambda: scrapes(2), "two scrapes before any traffic", within=15)
        traffic = Traffic(session, proxy.url)
        seen = [await traffic.send("GET", "/users/1", expect={200}) for _ in range(10)]
        assert len(seen) == 10
        await traffic.send("GET", "/users/2", expect={200})

        async def counted(n: int) -> bool:
            return await prometheus.value(requests) == n

        await until(lambda: counted(11), "the first process's 11 requests scraped")
        await asyncio.sleep(0.3)  # the L2 fills finish after the answers
        proxy.process.stop()

        restarted = await start_proxy(spawn, config, name="proxy-again")
        await until(lambda: counted(0), "the restarted process scraped at 0", within=15)
        for key in ("/users/1", "/users/2"):
            async with session.get(restarted.url + key) as response:
                assert response.headers["X-Cache"] == "HIT-L2"
        await until(lambda: counted(2), "the restarted process's 2 requests scraped")
        before = await prometheus.fewest_samples(
            f'cachecar_request_duration_seconds_count{{job="{JOB}"}}', "60s"
        )
        await until(lambda: scrapes(before + 1), "one more scrape")

        window = f"{math.ceil(time.time() - started) + 5}s"
        overall = await prometheus.value(OVERALL.format(w=window))
        l1 = await prometheus.value(TIER.format(tier="l1", w=window))
        l2 = await prometheus.value(TIER.format(tier="l2", w=window))
    # increase() extrapolates every series by the same factor (they share their scrapes and
    # all start at 0), so the ratios are the counts' own, whatever the factor, resets included.
    assert overall == pytest.approx(11 / 13, rel=1e-9)
    assert l1 == pytest.approx(9 / 13, rel=1e-9)  # 9 hits; 2 misses before, 2 after the restart
    assert l2 == pytest.approx(2 / 4, rel=1e-9)  # 2 misses before the restart, 2 hits after


def test_metric_names_finds_the_selectors_and_nothing_else() -> None:
    expr = textwrap.dedent(
        """\
        histogram_quantile(0.95, sum by (le, outcome) (rate(a_bucket{route=~"x|{y}"}[1m])))
        / on (job) group_left (version) sum without (le) (b_total offset 1h) > bool 0.5
        or vector(0) and max_over_time(c[5m:1s]) unless d:recorded:rate5m{x="sum(e)"}
        """
    )
    assert metric_names(expr) == {"a_bucket", "b_total", "c", "d:recorded:rate5m"}


def test_exported_names_follow_the_text_format_families() -> None:
    exposition = textwrap.dedent(
        """\
        # HELP x_total Things.
        # TYPE x_total counter
        x_total 1.0
        # TYPE x_created gauge
        # TYPE y_seconds histogram
        # TYPE z gauge
        """
    )
    assert exported_names(exposition) == {
        "x_total": "x_total",
        "x_created": "x_created",
        "y_seconds_bucket": "y_seconds",
        "y_seconds_count": "y_seconds",
        "y_seconds_sum": "y_seconds",
        "z": "z",
    }
