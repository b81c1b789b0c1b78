"""Why cachecar does not pass a test of the HTTP cache test suite: a bug to fix (and where it
is tracked), or a choice and where the docs say so. ``bench.conformance_report`` puts the
reason beside each test cachecar fails; a failure with none says so, so that it is looked at.

Each row is a pattern of test ids (``fnmatch``: ``*`` for any run of characters) and the
reason; the first row that matches is taken.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

UNEXPLAINED = "not explained yet"

# "to do": a gap issue 16 (HTTP caching semantics toward the origin) is to close; "choice": what
# cachecar does on purpose, as docs/user-guide.md and docs/conformance.md say; "suite": the test
# cannot tell a right answer from a wrong one here.
REASONS: tuple[tuple[str, str], ...] = (
    (
        "304-etag-update-response-Set-Cookie",
        "choice: a 304 with Set-Cookie is passed to the client it answers and nothing is kept: a "
        "cookie in a shared entry would go to every client",
    ),
    (
        "cc-resp-no-cache-revalidate*",
        "to do: a `no-cache` answer is not stored; it could be, to be revalidated on every use",
    ),
    (
        "conditional-etag-vary-headers*",
        "choice: the first answer that varies on a header the route does not key on yet is not "
        "kept when the request had the header (the origin did not see it); the route learns the "
        "header from it",
    ),
    (
        "conditional-etag-strong-generate-unquoted",
        "choice: the stored ETag is sent back as the origin wrote it, here unquoted (which is "
        "not an entity tag); cachecar does not repair it",
    ),
    (
        "conditional-etag-forward*",
        "choice: a cacheable miss is fetched whole, so the client's validators are not sent on; "
        "cachecar answers them itself from the stored entry",
    ),
    (
        "conditional-etag-*respond*",
        "choice: entity tags are compared as RFC 9110 writes them (quoted); a malformed one "
        "matches nothing",
    ),
    (
        "conditional-lm-fresh-no-lm",
        "choice: If-Modified-Since is answered from the stored Last-Modified only, never Date",
    ),
    (
        "age-parse-*",
        "choice: RFC 9111 §5.1: of a list, the first member of `Age` counts, and an invalid "
        "`Age` is ignored; the suite wants such answers stale",
    ),
    (
        "freshness-max-age-date",
        "to do: freshness counts from when cachecar received the answer, not from its `Date`",
    ),
    (
        "freshness-max-age-decimal-*",
        "choice: `max-age` with a fraction is not a delta-seconds (RFC 9111 §1.2.2): stale",
    ),
    (
        "freshness-max-age-100a",
        "choice: a malformed `max-age` makes the answer stale (RFC 9111 §4.2.1)",
    ),
    (
        "freshness-max-age-a100",
        "choice: a malformed `max-age` makes the answer stale (RFC 9111 §4.2.1)",
    ),
    (
        "freshness-max-age-two-*",
        "choice: of two `max-age` directives the first counts (RFC 9111 §4.2.1 allows it)",
    ),
    (
        "freshness-none",
        "choice: an answer with no freshness information is kept for the route's TTL, unless "
        "`ttl.default` says otherwise (`0s` in the suite's config)",
    ),
    (
        "headers-store-Set-Cookie",
        "choice: an answer with Set-Cookie is never stored (docs/user-guide.md)",
    ),
    ("other-set-cookie", "choice: an answer with Set-Cookie is never stored"),
    (
        "headers-omit-headers-listed-in-Cache-Control-no-cache*",
        '`no-cache="field"` is taken as a plain `no-cache`: the answer is not stored',
    ),
    (
        "head-*",
        "choice: a HEAD that misses is fetched as a GET, so that the entry it stores can answer "
        "GETs too",
    ),
    (
        "invalidate-*",
        "to do: look at it (a write invalidates its key and what its Location and "
        "Content-Location name)",
    ),
    (
        "partial-store-partial-*",
        "choice: a 206 from the origin is passed on, not stored: cachecar keeps whole answers "
        "and cuts a Range's part from them",
    ),
    (
        "partial-*",
        "to do: look at it (one byte range is answered from a stored whole answer)",
    ),
    (
        "stale-close-*",
        "suite: the test server closes the connection; cachecar answers 502 and does not serve "
        "the stale entry, as the directive asks; the suite takes an answer without its server's "
        "headers for a cached one (nginx and Varnish fail it alike)",
    ),
    (
        "stale-*",
        "choice: a stale answer is served only within the route's `stale_if_error` and "
        "`stale_while_revalidate` (0 in the suite's config), which the answer's own directives "
        "may narrow, never widen: the operator decides how stale is acceptable",
    ),
    (
        "surrogate-append-capabilities",
        "suite: cachecar sends Surrogate-Capability only on a cacheable miss, not on the "
        "suite's uncached calls",
    ),
    (
        "surrogate-*",
        "to do: look at it (Surrogate-Control is read, aimed at `;cachecar` or at every surrogate)",
    ),
    (
        "vary-*",
        "choice: the first answer that varies on a header the route does not key on yet is not "
        "kept when the request had the header (the origin did not see it); the route learns the "
        "header from it, and the next request with it is kept. The suite's tests share one "
        "route, so which of them teaches it decides some",
    ),
    (
        "*heuristic*",
        "choice: no heuristic freshness (RFC 9111 §4.2.2 allows it, never asks for it): the "
        "suite's config keeps only what the origin says is fresh (`ttl.default: 0s`); without "
        "that an answer is kept for the route's TTL. A 404 or 410 is kept for `negative_ttl` "
        "(0 here), 405, 414 and 501 never",
    ),
    (
        "status-*-fresh",
        "choice: only 200, 203, 204, 300, 301, 308 (and 404/410 for `negative_ttl`) are stored, "
        "whatever their freshness; an origin 5xx is never stored",
    ),
    ("method-POST", "choice: the answer to a POST is never stored"),
    (
        "other-authorization-*",
        "choice: a request with credentials is passed through unless the route keys on the "
        "header (`vary`)",
    ),
    ("other-cookie", "choice: a request with a Cookie is passed through (see above)"),
    (
        "ccreq-*",
        "choice: a client's request Cache-Control is not obeyed (as nginx and Varnish by "
        "default): a sidecar's clients cannot send load past the cache to the origin",
    ),
)


def reason(test_id: str) -> str:
    for pattern, why in REASONS:
        if fnmatchcase(test_id, pattern):
            return why
    return UNEXPLAINED
