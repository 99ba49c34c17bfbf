"""proxy_app/key_store.py against a real SQLite file and a real PostgreSQL (tests/servers.py)."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import insert
from sqlalchemy import select

from proxy_app import key_store
from proxy_app import keys
from proxy_app.key_store import KeyConflict
from proxy_app.key_store import KeyNotFound
from proxy_app.schema import spend_logs

NOW = 1_800_000_000.0


@pytest.fixture
def engine(store_engine):
    return store_engine


def create(engine, key="sk-test-0001", now=NOW, extra=None, **columns):
    return key_store.create_key(engine, keys.token_of(key), keys.key_name(key), columns, extra or {}, now)


def generation(engine) -> int:
    with engine.connect() as conn:
        return key_store.generation(conn, "keys")


def test_create_and_find(engine):
    record = create(engine, key_alias="a", rpm_limit=5, allowed_routes=["/v1"], metadata={"m": 1}, extra={"models": ["x"]})
    assert record.token == keys.token_of("sk-test-0001")
    assert record.key_name == "sk-...0001"
    assert record.allowed_routes == ("/v1",)
    assert record.rpm_limit == 5
    assert record.spend == 0.0
    assert record.blocked is False
    assert record.metadata == {"m": 1}
    assert record.extra == {"models": ["x"]}
    assert record.created_at == record.updated_at == NOW
    with engine.connect() as conn:
        assert key_store.find_key(conn, record.token, NOW) == record
        assert key_store.find_key(conn, keys.token_of("sk-other"), NOW) is None
    # An Engine works as well as a Connection.
    assert key_store.find_key(engine, record.token, NOW) == record


def test_duplicate_alias_or_key_is_a_conflict_and_changes_nothing(engine):
    create(engine, key_alias="a")
    before = generation(engine)
    with pytest.raises(KeyConflict, match="key_alias"):
        create(engine, key="sk-test-0002", key_alias="a")
    with pytest.raises(KeyConflict, match="This key already exists"):
        create(engine, key="sk-test-0001", key_alias="b")
    assert generation(engine) == before
    assert key_store.list_keys(engine)[1] == 1


def test_every_change_bumps_the_generation(engine):
    assert generation(engine) == 0
    record = create(engine)
    assert generation(engine) == 1
    key_store.update_key(engine, record.token, {"rpm_limit": 3}, {}, NOW + 1)
    assert generation(engine) == 2
    key_store.set_blocked(engine, record.token, True, NOW + 2)
    key_store.set_blocked(engine, record.token, False, NOW + 3)
    assert generation(engine) == 4
    new = key_store.regenerate_key(engine, record.token, keys.token_of("sk-new-1"), "sk-...ew-1", 0, NOW + 4, {}, {})
    assert generation(engine) == 5
    assert key_store.delete_keys(engine, [new.token]) == ([new.token], [])
    assert generation(engine) == 6
    # Nothing deleted, nothing to tell the workers.
    assert key_store.delete_keys(engine, [new.token]) == ([], [new.token])
    assert generation(engine) == 6


def test_bump_is_atomic_under_concurrent_changes(engine):
    errors = []

    def work(index):
        try:
            for n in range(5):
                create(engine, key=f"sk-thread-{index}-{n}")
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    assert generation(engine) == 20


def test_update_sets_clears_and_merges_extra(engine):
    record = create(engine, key_alias="a", rpm_limit=5, extra={"models": ["x"], "team_id": "t"})
    updated = key_store.update_key(engine, record.token, {"rpm_limit": None, "max_budget": 2.0}, {"models": None, "user_id": "u"}, NOW + 5)
    assert updated.rpm_limit is None
    assert updated.max_budget == 2.0
    assert updated.key_alias == "a"
    assert updated.extra == {"team_id": "t", "user_id": "u"}
    assert updated.updated_at == NOW + 5
    assert updated.created_at == NOW
    with pytest.raises(KeyNotFound):
        key_store.update_key(engine, keys.token_of("sk-nope"), {"rpm_limit": 1}, {}, NOW)


def test_update_to_a_taken_alias_is_a_conflict_and_to_its_own_alias_is_not(engine):
    create(engine, key_alias="a")
    second = create(engine, key="sk-test-0002", key_alias="b")
    with pytest.raises(KeyConflict):
        key_store.update_key(engine, second.token, {"key_alias": "a"}, {}, NOW)
    assert key_store.update_key(engine, second.token, {"key_alias": "b"}, {}, NOW).key_alias == "b"


def test_regenerate_keeps_the_record_and_the_old_token_during_the_grace_period(engine):
    old = create(engine, key_alias="a", rpm_limit=7)
    key_store.update_key(engine, old.token, {"spend": 1.25}, {}, NOW)
    new_token = keys.token_of("sk-new-key")
    new = key_store.regenerate_key(engine, old.token, new_token, "sk-...-key", 60, NOW + 10, {}, {})
    assert (new.token, new.key_alias, new.rpm_limit, new.spend, new.created_at) == (new_token, "a", 7, 1.25, NOW)
    assert (new.previous_token, new.previous_expires) == (old.token, NOW + 70)
    assert key_store.find_key(engine, new_token, NOW + 20) == new
    assert key_store.find_key(engine, old.token, NOW + 69) == new
    assert key_store.find_key(engine, old.token, NOW + 70) is None
    # Admin calls name the key by its current token only.
    assert key_store.get_key(engine, old.token) is None
    # Regenerating again ends the first grace period at once.
    newer = key_store.regenerate_key(engine, new_token, keys.token_of("sk-newer"), "sk-...ewer", 0, NOW + 30, {}, {})
    assert newer.previous_token is None
    assert key_store.find_key(engine, old.token, NOW + 31) is None
    assert key_store.find_key(engine, new_token, NOW + 31) is None


def test_regenerate_refuses_a_taken_key_and_an_unknown_one(engine):
    first = create(engine)
    second = create(engine, key="sk-test-0002")
    with pytest.raises(KeyConflict):
        key_store.regenerate_key(engine, first.token, second.token, "x", 0, NOW, {}, {})
    with pytest.raises(KeyNotFound):
        key_store.regenerate_key(engine, keys.token_of("sk-nope"), keys.token_of("sk-z"), "x", 0, NOW, {}, {})
    # A key in its grace period cannot be taken by a new custom key.
    key_store.regenerate_key(engine, first.token, keys.token_of("sk-third"), "x", 60, NOW, {}, {})
    with pytest.raises(KeyConflict):
        create(engine, key="sk-test-0001")


def test_delete_by_token_and_by_alias(engine):
    a = create(engine, key_alias="a")
    create(engine, key="sk-test-0002", key_alias="b")
    create(engine, key="sk-test-0003", key_alias="c")
    assert key_store.delete_keys(engine, [a.token, "f" * 64, a.token]) == ([a.token], ["f" * 64])
    assert key_store.delete_aliases(engine, ["b", "zz"]) == (["b"], ["zz"])
    assert [r.key_alias for r in key_store.list_keys(engine)[0]] == ["c"]


def test_list_pages_and_filters(engine):
    for n in range(5):
        create(engine, key=f"sk-test-000{n}", now=NOW + n, key_alias=f"k{n}", extra={"team_id": "t1" if n % 2 else "t2"})
    page, total = key_store.list_keys(engine, page=2, size=2)
    assert total == 5
    assert [r.key_alias for r in page] == ["k2", "k3"]
    assert [r.key_alias for r in key_store.list_keys(engine, page=3, size=2)[0]] == ["k4"]
    assert key_store.list_keys(engine, page=4, size=2) == ([], 5)
    assert [r.key_alias for r in key_store.list_keys(engine, key_alias="k3")[0]] == ["k3"]
    assert [r.key_alias for r in key_store.list_keys(engine, extra={"team_id": "t1"})[0]] == ["k1", "k3"]
    assert [r.key_alias for r in key_store.list_keys(engine, token=keys.token_of("sk-test-0004"))[0]] == ["k4"]


def usage_row(request_id, start, api_key="a" * 64, key_alias="k"):
    return {
        "request_id": request_id,
        "api_key": api_key,
        "key_alias": key_alias,
        "route": "/v1",
        "method": "POST",
        "status": 200,
        "request_bytes": 1,
        "response_bytes": 2,
        "duration_ms": 3.0,
        "ttfb_ms": None,
        "spend": 0.5,
        "start_time": start,
        "end_time": start + 1,
        "upstream_error": None,
    }


def test_spend_logs_newest_first_filtered_and_paged(engine):
    rows = [usage_row(f"r{n}", NOW + n * 100, api_key="a" * 64 if n % 2 else "b" * 64, key_alias=f"k{n % 2}") for n in range(6)]
    with engine.begin() as conn:
        conn.execute(insert(spend_logs), rows)
    ids = lambda found: [row["request_id"] for row in found]  # noqa: E731 - a one-line helper
    assert ids(key_store.spend_logs(engine)) == ["r5", "r4", "r3", "r2", "r1", "r0"]
    assert ids(key_store.spend_logs(engine, api_key_token="a" * 64)) == ["r5", "r3", "r1"]
    assert ids(key_store.spend_logs(engine, key_alias="k0")) == ["r4", "r2", "r0"]
    assert ids(key_store.spend_logs(engine, start=NOW + 100, end=NOW + 400)) == ["r3", "r2", "r1"]
    assert ids(key_store.spend_logs(engine, limit=2, page=2)) == ["r3", "r2"]
    assert key_store.spend_logs(engine, limit=2, page=4) == []
    with engine.connect() as conn:
        assert key_store.spend_logs(conn, limit=1)[0] == rows[5]


def test_generation_of_an_unknown_name_is_zero(engine):
    with engine.connect() as conn:
        assert key_store.generation(conn, "endpoints") == 0
        assert conn.execute(select(1)).scalar() == 1


def test_concurrent_updates_of_different_fields_all_land(engine):
    record = create(engine, extra={"team_id": "t"})
    errors = []

    def work(index):
        try:
            key_store.update_key(engine, record.token, {}, {f"field_{index}": index}, NOW + index)
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    assert key_store.get_key(engine, record.token).extra == {"team_id": "t", **{f"field_{i}": i for i in range(6)}}
