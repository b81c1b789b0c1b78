"""The admin listener: liveness and readiness."""

from __future__ import annotations

from aiohttp import web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from proxy.admin import build_admin_app
from proxy.app import build_proxy_app
from tests.ports import free_port
from tests.proxy.conftest import Origin, settings_for

Client = TestClient[web.Request, web.Application]


async def admin_for(aiohttp_client: AiohttpClient, origin: Origin, **settings: str) -> Client:
    proxy_app = build_proxy_app(settings_for(origin, **settings))
    await aiohttp_client(proxy_app)  # started: the runtime is open
    return await aiohttp_client(build_admin_app(proxy_app))


async def test_healthz_answers_while_the_process_lives(
    aiohttp_client: AiohttpClient, origin: Origin
) -> None:
    admin = await admin_for(aiohttp_client, origin, upstream=f"http://127.0.0.1:{free_port()}")
    response = await admin.get("/healthz")
    assert response.status == 200
    assert await response.json() == {"status": "alive"}


async def test_readyz_is_200_when_origin_and_l2_answer(
    aiohttp_client: AiohttpClient, origin: Origin
) -> None:
    admin = await admin_for(aiohttp_client, origin)
    response = await admin.get("/readyz")
    assert response.status == 200
    assert await response.json() == {
        "status": "ready",
        "origin": "up",
        "l2": "up",
        "coherence": "off",  # L2 in memory: no replicas to hear
    }
    assert origin.last("/").method == "GET"  # upstream.health_path


async def test_readyz_is_503_naming_the_origin_when_it_is_down(
    aiohttp_client: AiohttpClient, origin: Origin
) -> None:
    admin = await admin_for(aiohttp_client, origin, upstream=f"http://127.0.0.1:{free_port()}")
    response = await admin.get("/readyz")
    assert response.status == 503
    body = await response.json()
    assert body["status"] == "unavailable"
    assert body["reason"].startswith("origin: origin unreachable")
    assert body["l2"] == "up"


async def test_readyz_is_503_when_the_origin_answers_5xx(
    aiohttp_client: AiohttpClient, origin: Origin
) -> None:
    origin.reply("/", b"", status=503)
    admin = await admin_for(aiohttp_client, origin)
    response = await admin.get("/readyz")
    assert response.status == 503
    assert (await response.json())["origin"] == "/ answered 503"


async def test_readyz_is_503_naming_l2_when_redis_is_down(
    aiohttp_client: AiohttpClient, origin: Origin
) -> None:
    admin = await admin_for(aiohttp_client, origin, l2=f"redis://127.0.0.1:{free_port()}")
    response = await admin.get("/readyz")
    assert response.status == 503
    body = await response.json()
    assert body["origin"] == "up"
    assert body["l2"].startswith("ping: ")
    assert body["reason"].startswith("l2: ping")
    # L1 still answers, each entry for coherence.degraded_ttl at most: said, not a reason.
    assert body["coherence"] == "degraded"


async def test_readyz_says_l1_is_unused_without_degraded_mode(
    aiohttp_client: AiohttpClient, origin: Origin
) -> None:
    admin = await admin_for(
        aiohttp_client,
        origin,
        l2=f"redis://127.0.0.1:{free_port()}",
        extra="coherence: {degraded_ttl: 0s}",
    )
    body = await (await admin.get("/readyz")).json()
    assert body["coherence"] == "unsubscribed"
    assert "coherence" not in body["reason"]


async def test_readyz_without_l2_checks_the_origin_only(
    aiohttp_client: AiohttpClient, origin: Origin
) -> None:
    admin = await admin_for(aiohttp_client, origin, l2="")
    assert await (await admin.get("/readyz")).json() == {
        "status": "ready",
        "origin": "up",
        "coherence": "off",
    }


async def test_read_only_calls_need_no_token_and_mutating_ones_need_exactly_it(
    aiohttp_client: AiohttpClient, origin: Origin
) -> None:
    admin = await admin_for(aiohttp_client, origin, extra="admin: {token: s3cret}")
    for path in ("/healthz", "/readyz", "/metrics", "/admin/stats", "/admin/write-behind"):
        assert (await admin.get(path)).status in (200, 404), path  # 404: no write-behind route
    assert (await admin.get("/healthz")).status == 200
    assert (await admin.get("/metrics")).status == 200

    for path in ("/admin/purge", "/admin/write-behind/replay"):
        for authorization, status in (
            (None, 401),
            ("s3cret", 401),  # no scheme
            ("Basic s3cret", 401),
            ("Bearer ", 401),
            ("Bearer s3cre", 403),  # a prefix of the token
            ("Bearer s3cret2", 403),
            ("Bearer S3CRET", 403),
            ("Bearer s3cr\udcff", 403),  # not UTF-8 on the wire: refused, not a crash
        ):
            headers = {} if authorization is None else {"Authorization": authorization}
            response = await admin.post(path, json={"key": "users:1"}, headers=headers)
            assert response.status == status, (path, authorization)
            assert set(await response.json()) == {"error", "detail"}


def test_the_admin_listener_binds_loopback_by_default(origin: Origin) -> None:
    settings = settings_for(origin)
    assert (settings.admin.listen.host, settings.admin.listen.port) == ("127.0.0.1", 8081)
    assert settings.admin.token == ""
