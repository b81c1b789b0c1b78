from __future__ import annotations

from multidict import CIMultiDict, CIMultiDictProxy

from proxy.config import parse_settings
from proxy.routes import Router
from proxy.templates import KeyTemplate

SETTINGS = parse_settings(
    """
upstream: {url: http://127.0.0.1:9000}
l1: {ttl: 7s}
routes:
  - path: /users/{id}/orders/{order}
    key: "orders:{id}:{order}"
    vary: [Accept, X-Lang]
  - path: /users/{id}
    key: "users:{id}"
    ttl: {l1: 1s, l2: 2s}
  - path: /users/{id}.json
  - path: /static/logo
    mode: bypass
  - path: /users/{id}/posts/{post}
    key: "users:{id}"
""",
    env={},
)


def headers(**values: str) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict({k.replace("_", "-"): v for k, v in values.items()}))


def test_the_first_matching_route_wins_and_gives_its_parameters() -> None:
    router = Router.from_settings(SETTINGS)
    found = router.match("/users/42/orders/7")
    assert found is not None
    route, params = found
    assert route.name == "/users/{id}/orders/{order}"
    assert params == {"id": "42", "order": "7"}
    assert route.key_for(params, "/users/42/orders/7", "") == "orders:42:7"


def test_a_parameter_matches_one_segment_only() -> None:
    router = Router.from_settings(SETTINGS)
    assert router.match("/users/1/2") is None
    assert router.match("/users/") is None
    found = router.match("/users/1.json")
    assert found is not None
    assert found[0].name == "/users/{id}"  # first match wins over /users/{id}.json


def test_route_ttls_fall_back_to_the_tier_ttls() -> None:
    routes = Router.from_settings(SETTINGS).routes
    assert (routes[0].l1_ttl, routes[0].l2_ttl) == (7.0, 600.0)
    assert (routes[1].l1_ttl, routes[1].l2_ttl) == (1.0, 2.0)
    assert not routes[3].cached


def test_the_variant_depends_on_vary_headers_case_insensitively_and_hides_values() -> None:
    route = Router.from_settings(SETTINGS).routes[0]
    json = route.variant_for(headers(Accept="application/json"), "", {})
    assert json == route.variant_for(headers(accept="application/json"), "", {})
    assert json != route.variant_for(headers(Accept="text/html"), "", {})
    assert json != route.variant_for(headers(Accept="application/json", X_Lang="fr"), "", {})
    assert "json" not in json  # hashed: a token in a vary header never lands in Redis
    assert Router.from_settings(SETTINGS).routes[1].variant_for(headers(Accept="x"), "", {}) == ""


def test_on_a_key_template_the_sorted_query_is_part_of_the_variant() -> None:
    route = Router.from_settings(SETTINGS).routes[1]
    assert route.variant_for(headers(), "b=2&a=1", {}) == route.variant_for(
        headers(), "a=1&b=2", {}
    )
    assert route.variant_for(headers(), "a=1", {}) != route.variant_for(headers(), "", {})


def test_without_a_key_template_the_key_is_the_path_and_sorted_query() -> None:
    route = Router.from_settings(SETTINGS).routes[2]
    assert route.key_for({"id": "1"}, "/users/1.json", "z=1&a=2") == "/users/1.json?a=2&z=1"
    assert route.key_for({"id": "1"}, "/users/1.json", "") == "/users/1.json"


def test_a_parameter_cannot_render_another_resource_s_key() -> None:
    # /users/1/orders/2:3 and /users/1:2/orders/3 would both be orders:1:2:3 if rendered raw.
    router = Router.from_settings(SETTINGS)
    keys = set()
    for path in ("/users/1/orders/2:3", "/users/1:2/orders/3", "/users/1/orders/2%3A3"):
        found = router.match(path)
        assert found is not None
        route, params = found
        keys.add(route.key_for(params, path, ""))
    assert keys == {"orders:1:2%3A3", "orders:1%3A2:3", "orders:1:2%253A3"}
    plain = KeyTemplate.compile("users:{id}", ["id"])
    # Letters, digits and -._~ stay as they are: a purge by the logical key finds them.
    assert plain.render({"id": "42"}) == "users:42"
    assert plain.render({"id": "alice-b.c_d~e"}) == "users:alice-b.c_d~e"
    assert plain.render({"id": "a:b%20"}) == "users:a%3Ab%2520"


def test_path_parameters_a_key_template_leaves_out_select_variants() -> None:
    route = Router.from_settings(SETTINGS).routes[4]
    assert route.unkeyed == ("post",)
    one = route.variant_for(headers(), "", {"id": "1", "post": "1"})
    two = route.variant_for(headers(), "", {"id": "1", "post": "2"})
    assert one != two  # two posts never share an entry
    assert route.key_for({"id": "1", "post": "2"}, "/users/1/posts/2", "") == "users:1"


def test_an_l1_ttl_longer_than_the_l2_ttl_is_cut_to_it_when_there_is_an_l2() -> None:
    text = "upstream: {url: http://o}\nroutes: [{path: /a, ttl: {l1: 10m, l2: 30s}}]\n"
    with_l2 = parse_settings(text + "l2: {url: 'memory://'}\n", env={})
    assert (Router.from_settings(with_l2).routes[0].l1_ttl) == 30.0
    l1_only = parse_settings(text, env={})
    assert Router.from_settings(l1_only).routes[0].l1_ttl == 600.0
