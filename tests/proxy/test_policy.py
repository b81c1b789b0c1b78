from __future__ import annotations

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from cache.entry import Entry
from proxy.config import parse_settings
from proxy.policy import (
    UNSATISFIABLE,
    Decision,
    byte_range,
    decide,
    not_modified,
    parse_cache_control,
)
from proxy.routes import Route, Router

ROUTE = Router.from_settings(
    parse_settings(
        "upstream: {url: http://o}\nl1: {ttl: 30s}\nl2: {ttl: 10m}\n"
        "routes: [{path: /a, negative_ttl: 5s, vary: [Accept]}]",
        env={},
    )
).routes[0]
NOW = 1_767_225_600.0  # Thu, 01 Jan 2026 00:00:00 GMT
SENT = frozenset({"accept", "user-agent", "x-forwarded-for", "x-forwarded-proto"})


def response(**values: str) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict({k.replace("_", "-"): v for k, v in values.items()}))


def test_cache_control_directives_are_parsed_case_insensitively() -> None:
    assert parse_cache_control(['Max-Age=60, PRIVATE, community="UCI"', "no-transform"]) == {
        "max-age": "60",
        "private": None,
        "community": "UCI",
        "no-transform": None,
    }


def test_the_configured_ttls_apply_when_the_origin_says_nothing() -> None:
    assert decide(200, response(), ROUTE, SENT, NOW) == Decision(l1_ttl=30, l2_ttl=600)


def test_s_maxage_wins_over_max_age_for_a_shared_cache() -> None:
    decision = decide(200, response(Cache_Control="max-age=5, s-maxage=90"), ROUTE, SENT, NOW)
    assert decision == Decision(l1_ttl=30, l2_ttl=90)


@pytest.mark.parametrize("value", ["max-age=abc", "max-age=-1", "max-age"])
def test_a_malformed_max_age_is_treated_as_stale(value: str) -> None:
    assert decide(200, response(Cache_Control=value), ROUTE, SENT, NOW).detail == "max-age"


def test_an_invalid_expires_means_already_expired() -> None:
    assert decide(200, response(Expires="0"), ROUTE, SENT, NOW).detail == "max-age"


def test_expires_counts_from_the_origin_date() -> None:
    decision = decide(
        200,
        response(Date="Thu, 01 Jan 2026 00:00:00 GMT", Expires="Thu, 01 Jan 2026 00:01:00 GMT"),
        ROUTE,
        SENT,
        NOW + 3600,  # our clock is ahead of the origin's: the lifetime still is 60 s
    )
    assert decision == Decision(l1_ttl=30, l2_ttl=60)


def test_negative_answers_use_negative_ttl_in_both_tiers() -> None:
    assert decide(404, response(), ROUTE, SENT, NOW) == Decision(l1_ttl=5, l2_ttl=5)


def test_a_vary_on_a_keyed_header_is_fine_and_on_an_unkeyed_sent_one_is_not() -> None:
    assert decide(200, response(Vary="accept"), ROUTE, SENT, NOW).l2_ttl == 600
    refused = decide(200, response(Vary="Accept, User-Agent"), ROUTE, SENT, NOW)
    assert (refused.detail, refused.shared) == ("vary", False)


def entry(status: int = 200, **values: str) -> Entry:
    return Entry(status, tuple((k.replace("_", "-"), v) for k, v in values.items()), b"", 0, 60)


@pytest.mark.parametrize(
    ("if_none_match", "expected"),
    [('"v1"', True), ('W/"v1"', True), ('"v0", "v1"', True), ("*", True), ('"v2"', False)],
)
def test_if_none_match_uses_the_weak_comparison(if_none_match: str, expected: bool) -> None:
    assert not_modified(response(If_None_Match=if_none_match), entry(ETag='"v1"')) is expected


def test_if_none_match_wins_over_if_modified_since() -> None:
    request = response(If_None_Match='"v2"', If_Modified_Since="Fri, 01 Jan 2100 00:00:00 GMT")
    cached = entry(ETag='"v1"', Last_Modified="Wed, 01 Jan 2025 00:00:00 GMT")
    assert not not_modified(request, cached)


def test_only_a_200_is_ever_answered_304() -> None:
    assert not not_modified(response(If_None_Match="*"), entry(404, ETag='"v1"'))


def test_the_first_of_a_repeated_directive_counts() -> None:
    assert parse_cache_control(["max-age=1800, max-age=1", "max-age=5"]) == {"max-age": "1800"}


@pytest.mark.parametrize("value", ["max-age =60", "max-age= 60"])
def test_spaces_around_the_equals_sign_leave_no_argument(value: str) -> None:
    assert decide(200, response(Cache_Control=value), ROUTE, SENT, NOW).detail == "max-age"


@pytest.mark.parametrize("field", ["Surrogate-Control", "CDN-Cache-Control"])
def test_a_targeted_field_replaces_cache_control(field: str) -> None:
    headers = {"Cache_Control": "no-store", field.replace("-", "_"): "max-age=90"}
    assert decide(200, response(**headers), ROUTE, SENT, NOW) == Decision(l1_ttl=30, l2_ttl=90)
    short = {"Cache_Control": "max-age=3600", field.replace("-", "_"): "max-age=5"}
    assert decide(200, response(**short), ROUTE, SENT, NOW) == Decision(l1_ttl=5, l2_ttl=5)
    never = {"Cache_Control": "max-age=3600", field.replace("-", "_"): "no-store"}
    assert decide(200, response(**never), ROUTE, SENT, NOW).detail == "no-store"


def test_surrogate_control_aimed_elsewhere_is_not_cachecar_s() -> None:
    mine = response(Cache_Control="no-store", Surrogate_Control="max-age=90;cachecar")
    assert decide(200, mine, ROUTE, SENT, NOW).l2_ttl == 90
    # Aimed at another surrogate only: as if absent, Cache-Control rules.
    theirs = response(Cache_Control="no-store", Surrogate_Control="max-age=90;other")
    assert decide(200, theirs, ROUTE, SENT, NOW).detail == "no-store"


def test_ttl_default_bounds_an_answer_that_says_nothing_of_its_freshness() -> None:
    def route(default: str) -> Route:
        return Router.from_settings(
            parse_settings(
                "upstream: {url: http://o}\nl2: {ttl: 10m}\n"
                f"routes: [{{path: /a, ttl: {{default: {default}}}}}]",
                env={},
            )
        ).routes[0]

    silent = route("0s")
    assert decide(200, response(), silent, SENT, NOW).detail == "no-freshness"
    assert decide(200, response(Cache_Control="max-age=60"), silent, SENT, NOW).l2_ttl == 60
    assert decide(200, response(), route("1m"), SENT, NOW).l2_ttl == 60
    assert decide(200, response(Cache_Control="max-age=3600"), route("1m"), SENT, NOW).l2_ttl == 600


@pytest.mark.parametrize(
    ("value", "length", "part"),
    [
        ("bytes=0-0", 5, (0, 0)),
        ("bytes=2-", 5, (2, 4)),
        ("bytes=-2", 5, (3, 4)),
        ("bytes=-9", 5, (0, 4)),  # a suffix longer than the body: all of it
        ("BYTES = 1-2", 5, (1, 2)),
        ("bytes=-0", 5, UNSATISFIABLE),
        ("bytes=5-", 5, UNSATISFIABLE),
        ("bytes=0-", 0, UNSATISFIABLE),  # nothing to take a part of
        ("bytes=1-2,3-4", 5, None),
        ("bytes=a-2", 5, None),
        ("bytes=-", 5, None),
        ("bytes=2-1", 5, None),
        ("pages=1-2", 5, None),
    ],
)
def test_which_part_a_range_asks_for(value: str, length: int, part: tuple[int, int] | None) -> None:
    assert byte_range(value, length) == part
