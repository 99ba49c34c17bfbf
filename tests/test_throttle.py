"""logs.Throttle: a repeated log line at most once per interval."""

from __future__ import annotations

import time

from proxy_app.logs import Throttle


def test_first_line_passes_then_none_until_the_interval_is_over():
    throttle = Throttle(0.2)
    assert [throttle.due() for _ in range(5)] == [True, False, False, False, False]
    time.sleep(0.25)
    assert throttle.due() is True
    assert throttle.due() is False


def test_reset_lets_the_next_line_through_at_once():
    throttle = Throttle(60.0)
    assert throttle.due() is True
    assert throttle.due() is False
    throttle.reset()
    assert throttle.due() is True
