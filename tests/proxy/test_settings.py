"""The config loader: every problem names its key path and its bad value."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.config import ConfigError, effective_yaml, load_settings, parse_settings
from proxy.logs import redact
from proxy.settings import Address, Mode

MINIMAL = "upstream: {url: http://127.0.0.1:9000}\n"
REPO = Path(__file__).resolve().parents[2]


def problems(text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_settings(text, env=env or {})
    return caught.value.problems


def test_a_minimal_config_gets_the_documented_defaults() -> None:
    settings = parse_settings(MINIMAL, env={})
    assert settings.server.listen == Address("127.0.0.1", 8080)
    assert settings.server.max_body == 10 << 20
    assert settings.server.body_timeout == 30.0
    assert settings.server.body_deadline == 60.0
    assert settings.server.send_timeout == 30.0
    assert settings.admin.listen == Address("127.0.0.1", 8081)
    assert settings.admin.token == ""
    assert settings.upstream.timeout == 5.0
    assert settings.l1.max_bytes == 64 << 20
    assert settings.l1.ttl == 30.0
    assert settings.l2.url is None  # absent: L1 only
    assert settings.l2.timeout == 0.05
    assert settings.l2.key_prefix == "cachecar:"
    assert settings.l2.breaker.failures == 5
    assert settings.coherence.degraded_ttl == 1.0
    assert settings.routes == ()


def test_durations_and_sizes_are_numbers_after_loading() -> None:
    settings = parse_settings(
        MINIMAL
        + "l1: {ttl: 1h, max_bytes: 512KiB}\n"
        + "l2: {url: 'memory://', timeout: 250ms, ttl: 10m}\n"
        + "server: {max_body: 1048576, shutdown_grace: 1.5s, body_deadline: 2m, send_timeout: 250ms}\n"
        + "routes: [{path: /a, ttl: {l1: 2m}, negative_ttl: 1d}]\n",
        env={},
    )
    assert settings.l1.ttl == 3600.0
    assert settings.l1.max_bytes == 512 << 10
    assert settings.l2.timeout == 0.25
    assert settings.server.max_body == 1 << 20
    assert settings.server.shutdown_grace == 1.5
    assert (settings.server.body_deadline, settings.server.send_timeout) == (120.0, 0.25)
    route = settings.routes[0]
    assert (route.ttl.l1, route.ttl.l2, route.negative_ttl) == (120.0, None, 86400.0)
    assert route.mode is Mode.CACHE_ASIDE


def test_environment_variables_are_replaced_in_values() -> None:
    settings = parse_settings(
        "upstream: {url: '${ORIGIN}'}\n"
        "admin: {token: '${TOKEN:-}', listen: '127.0.0.1:${ADMIN_PORT:-9999}'}\n"
        "l2: {key_prefix: 'app$${literal}:'}\n",
        env={"ORIGIN": "http://origin:8000"},
    )
    assert settings.upstream.url == "http://origin:8000"
    assert settings.admin.token == ""
    assert settings.admin.listen.port == 9999
    assert settings.l2.key_prefix == "app${literal}:"


def test_an_unset_variable_without_a_default_names_the_variable_and_the_key() -> None:
    assert problems(MINIMAL + "admin: {token: '${CACHECAR_TOKEN}'}\n") == [
        "admin.token: environment variable CACHECAR_TOKEN is not set "
        "(set it, or give a default: ${CACHECAR_TOKEN:-default})"
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "routes: [{path: /a}, {path: /b, ttl: {l1: 30 seconds}}]",
            "routes[1].ttl.l1: '30 seconds' is not a duration (use 250ms, 30s, 10m, 1h)",
        ),
        ("l1: {ttl: 30}", "l1.ttl: 30 is not a duration (use 250ms, 30s, 10m, 1h)"),
        (
            "l1: {max_bytes: lots}",
            "l1.max_bytes: 'lots' is not a size (use 512KiB, 64MiB, 1GiB or bytes)",
        ),
        ("l1: {max_entries: many}", "l1.max_entries: expected a whole number, got 'many'"),
        ("l1: {max_entries: 0}", "l1.max_entries: 0 must be at least 1"),
        ("l2: {timeout: 0s}", "l2.timeout: '0s' must be more than 0"),
        ("l1: {ttll: 30s}", "l1.ttll: unknown key (did you mean 'ttl'?)"),
        (
            "cache: {}",
            "cache: unknown key (known keys: server, admin, upstream, l1, l2, routes, coherence, "
            "write_behind)",
        ),
        (
            "routes: [{path: /a, tag: x}]",
            "routes[0].tag: unknown key (did you mean 'tags'?)",
        ),
        (
            "server: {listen: 8080}",
            "server.listen: 8080 is not an address (use host:port, e.g. 127.0.0.1:8080)",
        ),
        (
            "server: {listen: 'localhost:99999'}",
            "server.listen: 'localhost:99999' is not an address (use host:port, e.g. 127.0.0.1:8080)",
        ),
        (
            "l2: {url: 'mysql://x'}",
            "l2.url: 'mysql://x' is not a Redis URL (use memory://, redis://host:port/db, rediss://, unix://, redis+cluster://host:port or redis+sentinel://host:port/service)",
        ),
        (
            "l2: {url: 'redis+cluster://h:7000/2'}",
            "l2.url: 'redis+cluster://h:7000/2': Redis Cluster has database 0 only; give no path",
        ),
        (
            "l2: {url: 'redis+cluster://h:7000,h:x'}",
            "l2.url: 'redis+cluster://h:7000,h:x': 'h:x' is not host:port (Port could not be cast to integer value as 'x')",
        ),
        (
            "l2: {url: 'redis+sentinel://h:26379'}",
            "l2.url: 'redis+sentinel://h:26379': name the master's service, as in redis+sentinel://host:26379/mymaster (or /mymaster/0 for a database)",
        ),
        (
            "l2: {url: 'redis+sentinel://h:26379/mymaster/x'}",
            "l2.url: 'redis+sentinel://h:26379/mymaster/x': '/x' is not a database number",
        ),
        (
            "routes: [{path: /a, mode: lazy}]",
            "routes[0].mode: 'lazy' is not one of 'cache-aside', 'write-through', 'write-behind' or 'bypass'",
        ),
        ("routes: [{path: users}]", "routes[0].path: 'users' must start with /"),
        (
            "routes: [{path: '/u/{id}/{id}'}]",
            "routes[0].path: {id} appears twice in '/u/{id}/{id}'",
        ),
        ("routes: [{path: '/u/{id'}]", "routes[0].path: '/u/{id' has an unbalanced brace"),
        (
            "routes: [{path: '/u/{1d}'}]",
            "routes[0].path: {1d} in '/u/{1d}' is not a parameter name",
        ),
        (
            "routes: [{path: '/u/{id}', key: 'u:{uid}'}]",
            "routes[0].key: {uid} is not a parameter of the route's path (it has {id})",
        ),
        (
            "routes: [{path: /a, vary: [Connection]}]",
            "routes[0].vary: 'Connection' is a hop-by-hop header and cannot select a variant",
        ),
        (
            "routes: [{path: /a, vary: ['bad header']}]",
            "routes[0].vary[0]: 'bad header' is not a header name",
        ),
        ("routes: {path: /a}", "routes: expected a list, got {'path': '/a'}"),
        ("server: [1]", "server: expected a mapping of keys, got [1]"),
        ("server: {body_deadline: 0s}", "server.body_deadline: '0s' must be more than 0"),
        (
            "server: {body_deadline: a minute}",
            "server.body_deadline: 'a minute' is not a duration (use 250ms, 30s, 10m, 1h)",
        ),
        (
            "server: {send_timeout: -1s}",
            "server.send_timeout: '-1s' is not a duration (use 250ms, 30s, 10m, 1h)",
        ),
        ("server: {send_timeout: 0ms}", "server.send_timeout: '0ms' must be more than 0"),
    ],
)
def test_each_problem_names_its_key_and_value(text: str, expected: str) -> None:
    assert problems(MINIMAL + text + "\n") == [expected]


def test_forwarding_credentials_unkeyed_is_refused() -> None:
    [problem] = problems(MINIMAL + "routes: [{path: /a, forward_headers: [Authorization]}]\n")
    assert problem.startswith("routes[0].forward_headers: 'Authorization' carries credentials")


def test_the_origin_url_must_be_http_with_a_host() -> None:
    assert problems("upstream: {url: 'ftp://x'}") == [
        "upstream.url: 'ftp://x' is not an http:// or https:// URL with a host"
    ]
    assert problems("server: {}") == ["upstream: required"]
    assert problems("upstream: {timeout: 1s}") == ["upstream.url: required"]


def test_stale_windows_and_early_refresh_are_route_settings() -> None:
    settings = parse_settings(
        MINIMAL
        + "routes: [{path: /a, stale_while_revalidate: 30s, stale_if_error: 10m, early_refresh: 2}]\n",
        env={},
    )
    route = settings.routes[0]
    assert (route.stale_while_revalidate, route.stale_if_error, route.early_refresh) == (
        30.0,
        600.0,
        2.0,
    )
    defaults = parse_settings(MINIMAL + "routes: [{path: /a}]\n", env={}).routes[0]
    assert (defaults.stale_while_revalidate, defaults.stale_if_error) == (0.0, 0.0)
    assert defaults.early_refresh == 1.0  # XFetch's recommended beta


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "routes: [{path: /a, stale_if_error: soon}]",
            "routes[0].stale_if_error: 'soon' is not a duration (use 250ms, 30s, 10m, 1h)",
        ),
        (
            "routes: [{path: /a, early_refresh: -1}]",
            "routes[0].early_refresh: -1 must be at least 0.0",
        ),
    ],
)
def test_bad_stale_settings_are_named(text: str, expected: str) -> None:
    assert problems(MINIMAL + text + "\n") == [expected]


@pytest.mark.parametrize(
    "url",
    [
        "memory://",
        "redis://h:6379/0",
        "rediss://user:secret@h:6380/1?ssl_ca_certs=/etc/ca.pem",
        "unix:///run/redis.sock?db=2",
        "redis+cluster://h:7000",
        "redis+cluster://h1:7000,h2:7001,[::1]:7002",
        "rediss+cluster://user:secret@h:7000?ssl_cert_reqs=none",
        "redis+sentinel://s1:26379,s2/mymaster",
        "redis+sentinel://:secret@s1:26379/mymaster/3",
    ],
)
def test_every_documented_redis_url_form_is_accepted(url: str) -> None:
    assert parse_settings(MINIMAL + f"l2: {{url: {url!r}}}\n", env={}).l2.url == url


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "routes: [{path: /a}, {path: /b, mode: write-behind}]",
            "routes[1].mode: write-behind keeps its queue in Redis; set l2.url (memory:// for an in-process queue that does not survive a restart)",
        ),
        (
            "l2: {url: 'memory://'}\nwrite_behind: {backoff: {initial: 1m, max: 1s}}",
            "write_behind.backoff: initial (1m) is longer than max (1s)",
        ),
        ("write_behind: {batch_size: 0}", "write_behind.batch_size: 0 must be at least 1"),
        (
            "write_behind: {flush_interval: 0s}",
            "write_behind.flush_interval: '0s' must be more than 0",
        ),
        (
            "write_behind: {max_attempts: lots}",
            "write_behind.max_attempts: expected a whole number, got 'lots'",
        ),
        ("write_behind: {shards: 0}", "write_behind.shards: 0 must be at least 1"),
        ("write_behind: {shards: 1000}", "write_behind.shards: 1000 must be at most 256"),
        ("write_behind: {shards: 2.5}", "write_behind.shards: expected a whole number, got 2.5"),
    ],
)
def test_write_behind_settings_are_checked(text: str, expected: str) -> None:
    assert problems(MINIMAL + text + "\n") == [expected]


def test_write_modes_are_accepted_with_an_l2() -> None:
    settings = parse_settings(
        MINIMAL
        + "l2: {url: 'memory://'}\n"
        + "write_behind: {flush_interval: 250ms, batch_size: 10}\n"
        + "routes: [{path: /a, mode: write-behind}, {path: /b, mode: write-through}]\n",
        env={},
    )
    assert [route.mode.value for route in settings.routes] == ["write-behind", "write-through"]
    assert settings.write_behind.flush_interval == 0.25
    assert settings.write_behind.batch_size == 10
    assert settings.write_behind.max_attempts == 10  # the default


def test_every_problem_is_reported_at_once() -> None:
    found = problems(MINIMAL + "l1: {ttl: soon, max_entries: -1}\nl2: {ttl: later}\n")
    assert sorted(found) == [
        "l1.max_entries: -1 must be at least 1",
        "l1.ttl: 'soon' is not a duration (use 250ms, 30s, 10m, 1h)",
        "l2.ttl: 'later' is not a duration (use 250ms, 30s, 10m, 1h)",
    ]


def test_a_key_given_twice_is_an_error_with_its_line() -> None:
    [problem] = problems(MINIMAL + "l1: {ttl: 1s}\nl1: {ttl: 2s}\n")
    assert problem == "line 3, column 1: key 'l1' appears twice in one mapping (not valid YAML)"


def test_yaml_merge_keys_work_and_hostile_yaml_is_named() -> None:
    text = MINIMAL + "routes:\n  - &r {path: /a, negative_ttl: 5s}\n  - {<<: *r, path: /b}\n"
    routes = parse_settings(text, env={}).routes
    assert [(r.path, r.negative_ttl) for r in routes] == [("/a", 5.0), ("/b", 5.0)]
    assert problems(MINIMAL + "? [a]\n: 1\n") == [
        "line 2, column 3: a key must be a plain value, not a list or mapping (not valid YAML)"
    ]
    assert problems(MINIMAL + "routes: &r [*r]\n") == [
        "the document nests too deeply, or an alias (*name) refers to itself"
    ]
    laughs = "a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"a{n}: &a{n} [{', '.join([f'*a{n - 1}'] * 10)}]\n" for n in range(1, 9)
    )  # "billion laughs": 10^9 values from a few hundred bytes
    assert problems(MINIMAL + laughs) == [
        "the document has more than 100000 values once aliases are expanded"
    ]


def test_yaml_that_does_not_parse_names_the_line() -> None:
    [problem] = problems(MINIMAL + "routes: [\n")
    assert problem.startswith("line 3")
    assert problem.endswith("(not valid YAML)")


def test_a_file_that_is_not_a_mapping_is_refused() -> None:
    assert problems("- a\n- b\n") == [
        "the file must be a mapping of sections (server:, routes:, ...)"
    ]


def test_yaml_tags_that_build_objects_are_refused() -> None:
    [problem] = problems(MINIMAL + "l2: {key_prefix: !!python/object/apply:os.system [id]}\n")
    assert "not valid YAML" in problem


def test_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(tmp_path / "nope.yaml")
    assert caught.value.problems == ["cannot read the file: No such file or directory"]


def test_the_effective_settings_fill_defaults_and_hide_the_token() -> None:
    text = effective_yaml(
        parse_settings(
            MINIMAL + "admin: {token: s3cret}\nl1: {ttl: 45s}\nroutes: [{path: /a}]\n", env={}
        )
    )
    assert "s3cret" not in text
    assert "token: <redacted>" in text
    assert "max_bytes: 64MiB" in text
    assert "l1: 45s" in text  # the route inherits l1.ttl
    assert "l2: 10m" in text
    with_l2 = parse_settings(
        MINIMAL + "l2: {url: 'memory://', ttl: 20s}\nroutes: [{path: /a}]\n", env={}
    )
    assert "l1: 20s" in effective_yaml(with_l2)  # cut to L2's: an L1 entry never outlives L2
    assert parse_settings(text.replace("<redacted>", "x"), env={}).l1.ttl == 45.0


@pytest.mark.parametrize(
    "path",
    sorted(
        p.relative_to(REPO)
        for p in [REPO / "config/cachecar.yaml", *REPO.glob("config/examples/*.yaml")]
    ),
    ids=str,
)
def test_every_shipped_config_is_valid(path: Path) -> None:
    load_settings(REPO / path, env={})


UPSTREAM = "upstream: {url: 'http://o'}\n"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "l2: {url: 'redis://h'}\nroutes: [{path: '/u/{id}', tags: ['user:{uid}']}]",
            "routes[0].tags: 'user:{uid}': {uid} is not a parameter of the route's path "
            "(it has {id})",
        ),
        (
            "routes: [{path: '/u/{id}', tags: ['user:{id}']}]",
            "routes[0].tags: tags are indexed in Redis; set l2.url",
        ),
        ("coherence: {channel: ''}", "coherence.channel: a channel name cannot be empty"),
        (
            "coherence: {degraded_ttl: -1s}",
            "coherence.degraded_ttl: '-1s' is not a duration (use 250ms, 30s, 10m, 1h)",
        ),
    ],
)
def test_tags_keys_and_coherence_are_checked(text: str, expected: str) -> None:
    assert problems(UPSTREAM + text) == [expected]


@pytest.mark.parametrize(
    ("url", "logged"),
    [
        ("redis://:pw@h:6379/0", "redis://:***@h:6379/0"),
        ("redis://app:pw@h/0", "redis://app:***@h/0"),
        ("redis://h:6379/0", "redis://h:6379/0"),
        ("redis+cluster://app:s3cret@h:7000,h:7001", "redis+cluster://app:***@h:7000,h:7001"),
        (
            "redis+sentinel://:pw@h:26379,h2/mymaster/0",
            "redis+sentinel://:***@h:26379,h2/mymaster/0",
        ),
        ("memory://", "memory://"),
    ],
)
def test_a_redis_url_is_logged_without_its_password(url: str, logged: str) -> None:
    assert redact(url) == logged


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "server: {workers: 2}",
            "server.workers: each worker has an L1 of its own; above 1 they need a shared "
            "Redis (l2.url) to keep them coherent",
        ),
        (
            "server: {workers: 2}\nl2: {url: 'memory://'}",
            "server.workers: each worker has an L1 of its own; above 1 they need a shared "
            "Redis (l2.url) to keep them coherent",
        ),
        (
            "server: {workers: 2}\nl2: {url: 'redis://h'}\ncoherence: {enabled: false}",
            "server.workers: above 1, coherence.enabled must be true (each worker's L1 must "
            "hear the others' writes)",
        ),
        (
            "server: {workers: 65}",
            "server.workers: 65 must be at most 64",
        ),
    ],
)
def test_workers_need_a_shared_redis_with_coherence(text: str, expected: str) -> None:
    assert problems(UPSTREAM + text) == [expected]


def test_workers_with_a_shared_redis_are_accepted() -> None:
    settings = parse_settings(UPSTREAM + "server: {workers: 4}\nl2: {url: 'redis://h'}", env={})
    assert settings.server.workers == 4
