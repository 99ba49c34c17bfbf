"""The pure rules a virtual key is checked by (proxy_app/key_rules.py), as tables.

The limiter answers used here come from a real :class:`proxy_app.limiter.LocalLimiter`
driven by a fixed clock, so the headers are checked against what a limiter really says.
"""

from __future__ import annotations

import dataclasses

import pytest

from proxy_app import key_rules
from proxy_app.key_rules import current_spend
from proxy_app.key_rules import key_refusal
from proxy_app.key_rules import limit_refusal
from proxy_app.key_rules import rate_limit_headers
from proxy_app.key_rules import route_allowed
from proxy_app.key_store import KeyRecord
from proxy_app.keys import token_of
from proxy_app.limiter import Admission
from proxy_app.limiter import LocalLimiter

NOW = 1_800_000_000.0
KEY = "sk-rules-0001"
TOKEN = token_of(KEY)
OLD_TOKEN = token_of("sk-rules-old")


def record(**changes) -> KeyRecord:
    """A key that passes every check, with ``changes`` applied."""
    base = KeyRecord(
        token=TOKEN,
        key_alias="rules",
        key_name="sk-...0001",
        expires=None,
        allowed_routes=None,
        rpm_limit=None,
        max_parallel_requests=None,
        max_budget=None,
        budget_duration=None,
        budget_reset_at=None,
        spend=0.0,
        metadata=None,
        blocked=False,
        extra=None,
        created_at=NOW - 100,
        updated_at=NOW - 100,
        previous_token=None,
        previous_expires=None,
    )
    return dataclasses.replace(base, **changes)


# --- route_allowed ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("allowed", "path", "expected"),
    [
        pytest.param(None, "/v1/anything", True, id="none-means-every-route"),
        pytest.param([], "/v1/anything", True, id="empty-means-every-route"),
        pytest.param(("/v1/a",), "/v1/a", True, id="exact"),
        pytest.param(("/v1/a",), "/v1/a/b", True, id="subpath"),
        pytest.param(("/v1/a",), "/v1/a/b/c", True, id="deep-subpath"),
        pytest.param(("/v1/a",), "/v1/a/", True, id="exact-with-trailing-slash"),
        pytest.param(("/v1/a",), "/v1/ab", False, id="prefix-is-not-a-subpath"),
        pytest.param(("/v1/a",), "/v1", False, id="parent-not-allowed"),
        pytest.param(("/v1/a",), "/v1/b", False, id="sibling"),
        pytest.param(("/v1/a",), "/V1/A", False, id="case-sensitive"),
        pytest.param(("/v1/a/",), "/v1/a", True, id="route-with-trailing-slash-exact"),
        pytest.param(("/v1/a/",), "/v1/a/b", True, id="route-with-trailing-slash-subpath"),
        pytest.param(("/v1/a/",), "/v1/ab", False, id="route-with-trailing-slash-prefix"),
        pytest.param(("/v1/a",), "/v1/a%2Fb", False, id="encoded-slash-is-not-a-separator"),
        pytest.param(("/v1/a/b",), "/v1/a%2Fb", False, id="encoded-slash-never-matches-a-real-one"),
        pytest.param(("/v1/a/b",), "/v1/a%2fb", False, id="encoded-slash-lower-case"),
        pytest.param(("/v1/a%2Fb",), "/v1/a%2Fb", True, id="encoded-route-literal"),
        pytest.param(("/v1/b", "/v1/a"), "/v1/a/x", True, id="second-route-of-several"),
        pytest.param(("/v1/b", "/v1/c"), "/v1/a", False, id="none-of-several"),
        pytest.param(("/",), "/anything/at/all", True, id="root-allows-every-path"),
    ],
)
def test_route_allowed(allowed, path, expected):
    assert route_allowed(allowed, path) is expected


# --- current_spend ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spend", "reset_at", "expected"),
    [
        pytest.param(3.5, None, 3.5, id="no-budget-period"),
        pytest.param(3.5, NOW + 1, 3.5, id="period-running"),
        pytest.param(3.5, NOW, 0.0, id="period-ends-now"),
        pytest.param(3.5, NOW - 1, 0.0, id="period-over"),
        pytest.param(0.0, NOW + 1, 0.0, id="nothing-spent"),
    ],
)
def test_current_spend(spend, reset_at, expected):
    assert current_spend(record(spend=spend, budget_reset_at=reset_at), NOW) == expected


# --- key_refusal ------------------------------------------------------------------------------

BLOCKED = (401, key_rules.BLOCKED_KEY, "auth_error")
EXPIRED = (401, key_rules.EXPIRED_KEY, "auth_error")
ROUTE = (403, "This key is not allowed to call /v1/b.", "auth_error")
BUDGET = (400, "Budget has been exceeded! Current cost: 2.0, Max budget: 2.0", "budget_exceeded")
EVERYTHING_WRONG = {"blocked": True, "expires": NOW - 1, "allowed_routes": ("/v1/a",), "max_budget": 2.0, "spend": 2.0}


@pytest.mark.parametrize(
    ("changes", "token", "expected"),
    [
        pytest.param({}, TOKEN, None, id="passes"),
        # The order: the first failing check answers.
        pytest.param(EVERYTHING_WRONG, TOKEN, BLOCKED, id="blocked-before-everything"),
        pytest.param({**EVERYTHING_WRONG, "blocked": False}, TOKEN, EXPIRED, id="expired-before-route-and-budget"),
        pytest.param({**EVERYTHING_WRONG, "blocked": False, "expires": None}, TOKEN, ROUTE, id="route-before-budget"),
        pytest.param({"max_budget": 2.0, "spend": 2.0}, TOKEN, BUDGET, id="budget"),
        # Expiry
        pytest.param({"expires": NOW}, TOKEN, EXPIRED, id="expires-now"),
        pytest.param({"expires": NOW + 1}, TOKEN, None, id="expires-later"),
        # The previous token of a regenerated key
        pytest.param({"previous_token": OLD_TOKEN, "previous_expires": NOW + 60}, OLD_TOKEN, None, id="previous-inside-grace"),
        pytest.param({"previous_token": OLD_TOKEN, "previous_expires": NOW}, OLD_TOKEN, EXPIRED, id="previous-grace-ends-now"),
        pytest.param({"previous_token": OLD_TOKEN, "previous_expires": NOW - 1}, OLD_TOKEN, EXPIRED, id="previous-after-grace"),
        pytest.param({"previous_token": OLD_TOKEN, "previous_expires": None}, OLD_TOKEN, EXPIRED, id="previous-without-grace"),
        pytest.param(
            {"previous_token": OLD_TOKEN, "previous_expires": NOW + 60, "blocked": True}, OLD_TOKEN, BLOCKED, id="previous-of-a-blocked-key"
        ),
        pytest.param({"previous_token": OLD_TOKEN, "previous_expires": NOW + 60}, TOKEN, None, id="current-during-grace"),
        # Routes
        pytest.param({"allowed_routes": ("/v1/b",)}, TOKEN, None, id="route-allowed"),
        pytest.param({"allowed_routes": ("/v1/a",)}, TOKEN, ROUTE, id="route-not-allowed"),
        # Budget
        pytest.param({"max_budget": 2.0, "spend": 1.99}, TOKEN, None, id="under-budget"),
        pytest.param({"max_budget": 2.0, "spend": 5.0, "budget_reset_at": NOW - 1}, TOKEN, None, id="over-budget-but-reset-due"),
        pytest.param({"max_budget": 2.0, "spend": 2.0, "budget_reset_at": NOW + 1}, TOKEN, BUDGET, id="over-budget-period-running"),
        pytest.param(
            {"max_budget": 0.0, "spend": 0.0}, TOKEN, (400, "Budget has been exceeded! Current cost: 0.0, Max budget: 0.0", "budget_exceeded"),
            id="zero-budget",
        ),
    ],
)
def test_key_refusal(changes, token, expected):
    refusal = key_refusal(record(**changes), token, "/v1/b", NOW)
    if expected is None:
        assert refusal is None
    else:
        assert (refusal.status, refusal.message, refusal.kind) == expected
        assert list(refusal.headers) == []


def test_a_refusal_never_names_the_key():
    refusal = key_refusal(record(**EVERYTHING_WRONG, key_alias=KEY), TOKEN, "/v1/b", NOW)
    assert KEY not in refusal.message and TOKEN not in refusal.message


# --- rate_limit_headers and limit_refusal ------------------------------------------------------


class Clock:
    def __init__(self, now: float = NOW):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_rate_limit_headers_count_down():
    limiter = LocalLimiter(clock=Clock())
    seen = [dict(rate_limit_headers(limiter.admit(TOKEN, 10, None))) for _ in range(3)]
    assert [h["x-ratelimit-remaining-requests"] for h in seen] == ["9", "8", "7"]
    assert {h["x-ratelimit-limit-requests"] for h in seen} == {"10"}
    assert {h["x-ratelimit-reset-requests"] for h in seen} == {"60s"}
    assert list(seen[0]) == ["x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests"]


def test_rate_limit_reset_counts_down_to_the_oldest_admission_leaving():
    clock = Clock()
    limiter = LocalLimiter(clock=clock)
    limiter.admit(TOKEN, 10, None)
    clock.now += 20.4
    assert dict(rate_limit_headers(limiter.admit(TOKEN, 10, None)))["x-ratelimit-reset-requests"] == "40s"


@pytest.mark.parametrize(("rpm", "parallel"), [(None, None), (None, 3)])
def test_no_rate_limit_headers_without_an_rpm_limit(rpm, parallel):
    assert rate_limit_headers(LocalLimiter(clock=Clock()).admit(TOKEN, rpm, parallel)) == []


def test_rpm_refusal_is_429_with_retry_after_and_the_headers():
    clock = Clock()
    limiter = LocalLimiter(clock=clock)
    assert limiter.admit(TOKEN, 2, None).allowed
    clock.now += 10
    assert limiter.admit(TOKEN, 2, None).allowed
    clock.now += 0.5
    admission = limiter.admit(TOKEN, 2, None)
    assert not admission.allowed and admission.reason == "rpm"
    refusal = limit_refusal(admission, record(rpm_limit=2))
    assert (refusal.status, refusal.kind) == (429, "rate_limit_error")
    assert refusal.message == "Rate limit reached: this key may make 2 requests per minute."
    headers = dict(refusal.headers)
    # The oldest admission leaves the window 60 - 10.5 = 49.5 s later: rounded up.
    assert headers["Retry-After"] == "50"
    assert headers["x-ratelimit-limit-requests"] == "2"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-reset-requests"] == "50s"
    assert refusal.headers[0][0] == "Retry-After"


def test_parallel_refusal_is_429_with_retry_after():
    limiter = LocalLimiter(clock=Clock())
    first = limiter.admit(TOKEN, None, 1)
    assert first.allowed and first.lease is not None
    admission = limiter.admit(TOKEN, None, 1)
    assert not admission.allowed and admission.reason == "parallel"
    refusal = limit_refusal(admission, record(max_parallel_requests=1))
    assert (refusal.status, refusal.kind) == (429, "rate_limit_error")
    assert refusal.message == "Max parallel request limit reached: this key may have 1 requests in flight."
    assert list(refusal.headers) == [("Retry-After", "1")]
    limiter.release(first.lease)
    assert limiter.admit(TOKEN, None, 1).allowed


@pytest.mark.parametrize(
    ("admission", "headers"),
    [
        pytest.param(
            dict(allowed=True, reason=None, retry_after=0, rpm_limit=10, rpm_remaining=9, reset_seconds=59.6, lease=None),
            [("x-ratelimit-limit-requests", "10"), ("x-ratelimit-remaining-requests", "9"), ("x-ratelimit-reset-requests", "60s")],
            id="rounded",
        ),
        pytest.param(
            dict(allowed=True, reason=None, retry_after=0, rpm_limit=10, rpm_remaining=9, reset_seconds=None, lease=None),
            [("x-ratelimit-limit-requests", "10"), ("x-ratelimit-remaining-requests", "9"), ("x-ratelimit-reset-requests", "0s")],
            id="no-reset-known",
        ),
        pytest.param(
            dict(allowed=True, reason=None, retry_after=0, rpm_limit=10, rpm_remaining=9, reset_seconds=-0.2, lease=None),
            [("x-ratelimit-limit-requests", "10"), ("x-ratelimit-remaining-requests", "9"), ("x-ratelimit-reset-requests", "0s")],
            id="never-negative",
        ),
    ],
)
def test_rate_limit_headers_table(admission, headers):
    assert rate_limit_headers(Admission(**admission)) == headers
