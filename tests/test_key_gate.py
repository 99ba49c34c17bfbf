"""KeyCache and KeyGate (proxy_app/key_gate.py) over a real SQLite file and a real PostgreSQL.

Database reads are counted with a SQLAlchemy ``before_cursor_execute`` listener on the
engine (https://docs.sqlalchemy.org/en/20/core/events.html#sqlalchemy.events.ConnectionEvents.before_cursor_execute),
so "no read" is observed, not assumed. The limits are taken by the real database limiter.
"""

from __future__ import annotations

import time

import pytest
from sqlalchemy import event

from proxy_app import key_gate
from proxy_app import key_store
from proxy_app import migrate
from proxy_app.errors import Refusal
from proxy_app.key_gate import KeyCache
from proxy_app.key_gate import KeyGate
from proxy_app.key_gate import StoreUnavailable
from proxy_app.key_rules import BLOCKED_KEY
from proxy_app.key_rules import EXPIRED_KEY
from proxy_app.key_rules import UNKNOWN_KEY
from proxy_app.keys import key_name
from proxy_app.keys import token_of
from proxy_app.limiter import make_limiter
from proxy_app.store import make_engine

KEY = "sk-gate-0001"
OTHER = "sk-gate-0002"
PATH = "/v1/chat"


@pytest.fixture
def engine(store_engine):
    return store_engine


class KeyReads:
    """Counts the statements that read ``proxy_keys`` on an engine."""

    def __init__(self, engine):
        self.count = 0
        event.listen(engine, "before_cursor_execute", self._seen)

    def _seen(self, conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith("SELECT") and "proxy_keys" in statement:
            self.count += 1


def create(engine, key=KEY, now=None, **columns):
    now = time.time() if now is None else now
    return key_store.create_key(engine, token_of(key), key_name(key), columns, {}, now)


@pytest.fixture
def gate(engine):
    limiter = make_limiter(engine, None)
    yield KeyGate(KeyCache(engine, ttl=60.0, allow_on_outage=False), limiter)
    limiter.close()


def refusal_of(gate, key, path=PATH) -> Refusal:
    with pytest.raises(Refusal) as caught:
        gate.admit(key, path)
    return caught.value


# --- KeyCache ---------------------------------------------------------------------------------


def test_a_hot_key_is_served_without_a_database_read(engine):
    record = create(engine)
    reads = KeyReads(engine)
    cache = KeyCache(engine, ttl=60.0, allow_on_outage=False)
    now = time.time()
    assert cache.get(record.token, now) == record
    assert reads.count == 1
    for step in range(50):
        assert cache.get(record.token, now + step * 0.09) == record
    assert reads.count == 1


def test_an_entry_is_read_again_once_refresh_seconds_old(engine, monkeypatch):
    monkeypatch.setattr(key_gate, "REFRESH_SECONDS", 0.5)
    record = create(engine)
    reads = KeyReads(engine)
    cache = KeyCache(engine, ttl=60.0, allow_on_outage=False)
    now = time.time()
    assert cache.get(record.token, now) == record
    # A change the watcher has not reported yet: the cache serves what it read until the
    # entry is REFRESH_SECONDS old, then reads the key again.
    key_store.set_blocked(engine, record.token, True, now)
    reads.count = 0  # the change's own reads
    assert cache.get(record.token, now + 0.49).blocked is False
    assert reads.count == 0
    assert cache.get(record.token, now + 0.5).blocked is True
    assert reads.count == 1
    assert cache.get(record.token, now + 0.9).blocked is True
    assert reads.count == 1


def test_an_unknown_key_is_remembered_only_briefly(engine):
    reads = KeyReads(engine)
    cache = KeyCache(engine, ttl=60.0, allow_on_outage=False)
    token = token_of(KEY)
    now = time.time()
    assert cache.get(token, now) is None
    assert cache.get(token, now + key_gate.UNKNOWN_SECONDS / 2) is None
    assert reads.count == 1
    # The key is created now: it works as soon as "unknown" is forgotten.
    created = create(engine, now=now)
    reads.count = 0
    assert cache.get(token, now + key_gate.UNKNOWN_SECONDS) == created
    assert reads.count == 1
    assert key_gate.UNKNOWN_SECONDS <= 1.0


def test_clear_forces_a_read(engine):
    record = create(engine)
    reads = KeyReads(engine)
    cache = KeyCache(engine, ttl=60.0, allow_on_outage=False)
    now = time.time()
    cache.get(record.token, now)
    key_store.set_blocked(engine, record.token, True, now)
    reads.count = 0
    assert cache.get(record.token, now + 0.01).blocked is False
    assert reads.count == 0
    cache.clear()
    assert cache.get(record.token, now + 0.02).blocked is True
    assert reads.count == 1


def test_random_unknown_keys_cannot_grow_the_cache_without_bound(engine, monkeypatch):
    monkeypatch.setattr(key_gate, "MAX_ENTRIES", 5)
    record = create(engine)
    cache = KeyCache(engine, ttl=60.0, allow_on_outage=False)
    now = time.time()
    cache.get(record.token, now)
    for n in range(20):
        assert cache.get(token_of(f"sk-random-{n}"), now) is None
        assert len(cache._entries) <= 5
    # The known key outlives the unknown ones.
    reads = KeyReads(engine)
    assert cache.get(record.token, now + 0.1) == record
    assert reads.count == 0


# --- database outage (PostgreSQL stopped) -----------------------------------------------------


def test_outage_a_recent_key_keeps_working_and_an_unseen_one_is_503(postgres, pg_url):
    engine = make_engine(pg_url, {})
    migrate.upgrade(engine)
    limiter = make_limiter(engine, None)
    try:
        known = create(engine, KEY)
        create(engine, OTHER)
        strict = KeyCache(engine, ttl=30.0, allow_on_outage=False)
        lenient = KeyCache(engine, ttl=30.0, allow_on_outage=True)
        gate = KeyGate(strict, limiter)
        now = time.time()
        assert strict.get(known.token, now) == known
        assert lenient.get(known.token, now) == known
        assert gate.admit(KEY, PATH).token == known.token
        postgres.stop()
        try:
            # Past REFRESH_SECONDS the cache asks the database, which does not answer:
            # verified within key_cache_ttl, the key keeps working.
            later = now + key_gate.REFRESH_SECONDS + 1
            assert strict.get(known.token, later) == known
            assert gate.admit(KEY, PATH).token == known.token
            # A key this worker never verified cannot be vouched for.
            with pytest.raises(StoreUnavailable):
                strict.get(token_of(OTHER), later)
            refusal = refusal_of(gate, OTHER)
            assert (refusal.status, refusal.kind) == (503, "service_unavailable")
            assert dict(refusal.headers)["Retry-After"] == "5"
            assert refusal.api_key is None
            # An unknown key is no different: the database cannot say it is unknown.
            assert refusal_of(gate, "sk-never-made").status == 503
            # Older than key_cache_ttl: refused, unless allow_requests_on_db_unavailable.
            much_later = now + 31
            with pytest.raises(StoreUnavailable):
                strict.get(known.token, much_later)
            assert lenient.get(known.token, much_later) == known
            assert lenient.get(known.token, now + 3600) == known
            with pytest.raises(StoreUnavailable):
                lenient.get(token_of(OTHER), much_later)
        finally:
            postgres.start()
        # Back: the never-seen key is read and works.
        assert gate.admit(OTHER, PATH).token == token_of(OTHER)
    finally:
        limiter.close()
        engine.dispose()


# --- KeyGate.admit ----------------------------------------------------------------------------


def test_unknown_key_is_401_without_naming_a_key(gate):
    refusal = refusal_of(gate, "sk-not-a-key")
    assert (refusal.status, refusal.message, refusal.kind) == (401, UNKNOWN_KEY, "auth_error")
    assert refusal.api_key is None and refusal.key_alias is None


def test_a_stored_token_presented_as_the_key_is_401(engine, gate):
    record = create(engine)
    refusal = refusal_of(gate, record.token)
    assert (refusal.status, refusal.message) == (401, UNKNOWN_KEY)
    assert refusal.api_key is None
    assert gate.admit(KEY, PATH).token == record.token


@pytest.mark.parametrize(
    ("columns", "path", "status", "message", "kind"),
    [
        pytest.param({"blocked": True}, PATH, 401, BLOCKED_KEY, "auth_error", id="blocked"),
        pytest.param({"expires": time.time() - 1}, PATH, 401, EXPIRED_KEY, "auth_error", id="expired"),
        pytest.param({"allowed_routes": ["/v1/other"]}, PATH, 403, f"This key is not allowed to call {PATH}.", "auth_error", id="route"),
        pytest.param(
            {"max_budget": 1.0, "spend": 1.5}, PATH, 400, "Budget has been exceeded! Current cost: 1.5, Max budget: 1.0", "budget_exceeded",
            id="budget",
        ),
        pytest.param(
            {"blocked": True, "expires": time.time() - 1, "allowed_routes": ["/v1/other"], "max_budget": 1.0, "spend": 1.5},
            PATH, 401, BLOCKED_KEY, "auth_error", id="order-blocked-first",
        ),
        pytest.param(
            {"expires": time.time() - 1, "allowed_routes": ["/v1/other"], "max_budget": 1.0, "spend": 1.5},
            PATH, 401, EXPIRED_KEY, "auth_error", id="order-expired-before-route",
        ),
        pytest.param(
            {"allowed_routes": ["/v1/other"], "max_budget": 1.0, "spend": 1.5, "rpm_limit": 0},
            PATH, 403, f"This key is not allowed to call {PATH}.", "auth_error", id="order-route-before-budget-and-limits",
        ),
        pytest.param(
            {"max_budget": 1.0, "spend": 1.5, "rpm_limit": 0}, PATH, 400, "Budget has been exceeded! Current cost: 1.5, Max budget: 1.0",
            "budget_exceeded", id="order-budget-before-limits",
        ),
    ],
)
def test_refusals_in_order_name_the_key_by_its_token(engine, gate, columns, path, status, message, kind):
    record = create(engine, key_alias="gate-alias", **columns)
    refusal = refusal_of(gate, KEY, path)
    assert (refusal.status, refusal.message, refusal.kind) == (status, message, kind)
    assert (refusal.api_key, refusal.key_alias) == (record.token, "gate-alias")
    assert KEY not in repr((refusal.message, refusal.headers, refusal.api_key, refusal.key_alias))


def test_a_key_without_limits_passes_with_nothing_to_release(engine, gate):
    record = create(engine, key_alias="plain")
    passed = gate.admit(KEY, PATH)
    assert (passed.token, passed.key_alias, passed.lease, passed.headers) == (record.token, "plain", None, [])


def test_budget_over_but_reset_due_passes(engine, gate):
    create(engine, max_budget=1.0, spend=5.0, budget_duration="1d", budget_reset_at=time.time() - 1)
    assert gate.admit(KEY, PATH).token == token_of(KEY)


def test_rpm_limit_is_429_with_retry_after_and_rate_limit_headers(engine, gate):
    record = create(engine, rpm_limit=3)
    remaining = []
    for _ in range(3):
        passed = gate.admit(KEY, PATH)
        headers = dict(passed.headers)
        assert headers["x-ratelimit-limit-requests"] == "3"
        remaining.append(headers["x-ratelimit-remaining-requests"])
    assert remaining == ["2", "1", "0"]
    refusal = refusal_of(gate, KEY)
    assert (refusal.status, refusal.kind) == (429, "rate_limit_error")
    headers = dict(refusal.headers)
    assert 1 <= int(headers["Retry-After"]) <= 60
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-limit-requests"] == "3"
    assert refusal.api_key == record.token


def test_a_refusal_before_the_limits_consumes_nothing(engine, gate):
    create(engine, rpm_limit=1, allowed_routes=["/v1/ok"])
    for _ in range(3):
        assert refusal_of(gate, KEY, "/v1/no").status == 403
    assert dict(gate.admit(KEY, "/v1/ok").headers)["x-ratelimit-remaining-requests"] == "0"
    assert refusal_of(gate, KEY, "/v1/ok").status == 429


def test_parallel_limit_is_429_and_a_released_slot_lets_the_next_pass(engine, gate):
    record = create(engine, max_parallel_requests=1)
    first = gate.admit(KEY, PATH)
    assert first.lease is not None and first.headers == []
    refusal = refusal_of(gate, KEY)
    assert (refusal.status, refusal.kind) == (429, "rate_limit_error")
    assert dict(refusal.headers) == {"Retry-After": "1"}
    assert refusal.api_key == record.token
    gate.release(first.lease)
    second = gate.admit(KEY, PATH)
    assert second.lease is not None
    # release is idempotent: releasing the first lease again frees nothing more.
    gate.release(first.lease)
    assert refusal_of(gate, KEY).status == 429
    gate.release(second.lease)


def test_the_previous_key_works_during_its_grace_period_only(engine, gate):
    now = time.time()
    old = create(engine, now=now, key_alias="rolled")
    new_key = "sk-gate-new-0001"
    key_store.regenerate_key(engine, old.token, token_of(new_key), key_name(new_key), 60, now, {}, {})
    gate.cache.clear()
    assert gate.admit(KEY, PATH).token == token_of(new_key)
    assert gate.admit(new_key, PATH).token == token_of(new_key)
    # The grace period is over.
    key_store.update_key(engine, token_of(new_key), {"previous_expires": now - 1}, {}, now)
    gate.cache.clear()
    assert refusal_of(gate, KEY).status == 401
    assert gate.admit(new_key, PATH).token == token_of(new_key)
