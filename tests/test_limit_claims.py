"""Claims (proxy_app/limit_claims.py): the rule for their size, and one worker's book of them.

The store side (a claim counted in full, exact near a limit, unused slots given back) is in
tests/test_limiter.py, against real SQLite and PostgreSQL."""

from __future__ import annotations

import pytest

from proxy_app.limit_claims import MAX_CLAIM
from proxy_app.limit_claims import Claims
from proxy_app.limit_claims import claim_size

BIG = 10**9
LIMITS = (10_000, 1000)


@pytest.mark.parametrize(
    ("demand", "rpm", "in_window", "par", "live", "expected"),
    [
        # no demand yet, or too little: one admission per transaction
        (0, BIG, 0, 1000, 0, 1),
        (7, BIG, 0, 1000, 0, 1),
        (8, BIG, 0, 1000, 0, 2),
        # a quarter of the demand, at most MAX_CLAIM
        (40, BIG, 0, None, 0, 10),
        (1000, BIG, 0, None, 0, MAX_CLAIM),
        (1000, None, 0, BIG, 0, MAX_CLAIM),
        # at most 1/64 of what is left under each limit
        (1000, BIG, 0, 1000, 64, 14),
        (1000, 200, 0, None, 0, 3),
        (1000, 10_000, 9_000, None, 0, 15),
        (1000, None, 0, 300, 100, 3),
        (1000, 200, 0, 10_000, 9_900, 1),
        # near a limit (fewer than 128 left) or a small limit: exact, one at a time
        (1000, 127, 0, None, 0, 1),
        (1000, 10_000, 9_873, None, 0, 1),
        (1000, None, 0, 100, 0, 1),
        (1000, 20, 19, 7, 6, 1),
    ],
)
def test_claim_size(demand, rpm, in_window, par, live, expected):
    assert claim_size(demand, rpm, in_window, par, live) == expected


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_claim_is_handed_out_then_asks_the_store_again():
    clock = Clock()
    claims = Claims(0.25, clock)
    assert claims.take("k", LIMITS) is None  # nothing claimed: ask the store
    assert claims.keep("k", LIMITS, 4, 99, 60.0) == 0  # the store took 4; the first was used
    clock.now += 0.1
    # the next three count down from what the store saw, the reset moves with the clock
    assert [claims.take("k", LIMITS) for _ in range(3)] == [(n, pytest.approx(59.9)) for n in (98, 97, 96)]
    assert claims.take("k", LIMITS) is None
    assert claims.expired(everything=True) == []  # all handed out: nothing to give back


def test_a_claim_is_dropped_after_its_seconds_or_when_the_limits_change():
    clock = Clock()
    claims = Claims(0.25, clock)
    claims.keep("k", LIMITS, 5, None, None)
    assert claims.take("k", LIMITS) == (None, None)  # rpm-less key: no remaining, no reset
    assert claims.take("k", (None, 999)) is None  # the key's limits changed: the store decides
    assert claims.expired() == []  # not run out yet
    clock.now += 0.25
    assert claims.take("k", LIMITS) is None
    assert claims.expired() == [("k", 3)]  # three never handed out: their slots go back
    assert claims.expired() == []


def test_a_new_claim_reports_what_the_previous_one_left():
    claims = Claims(0.25, Clock())
    claims.keep("k", LIMITS, 3, 50, 10.0)
    assert claims.keep("k", LIMITS, 2, 40, 10.0) == 2
    assert claims.take("k", LIMITS) == (39, 10.0)
    assert claims.expired(everything=True) == []


def test_demand_is_what_the_worker_asked_in_the_last_period():
    clock = Clock()
    claims = Claims(0.25, clock)
    for _ in range(10):
        claims.take("k", LIMITS)
    assert claims.demand("k") == 10
    clock.now += 0.3  # the next period: the previous one still counts
    claims.take("k", LIMITS)
    assert claims.demand("k") == 10
    clock.now += 0.6  # a quiet period in between: nothing left of it
    claims.take("k", LIMITS)
    assert claims.demand("k") == 1
    assert claims.demand("other") == 0


def test_a_second_look_by_the_same_request_is_not_counted_as_demand():
    # The database limiter looks again once it holds its admission lock (another thread's claim
    # may have come meanwhile): that look hands out an admission but is not one more request.
    claims = Claims(0.25, Clock())
    assert claims.take("k", LIMITS) is None
    assert claims.take("k", LIMITS, count=False) is None
    assert claims.demand("k") == 1
    claims.keep("k", LIMITS, 2, 10, 5.0)
    assert claims.take("k", LIMITS, count=False) == (9, 5.0)
    assert claims.demand("k") == 1
