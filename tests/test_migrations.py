"""The Alembic migrations (proxy_app/migrations) against proxy_app/schema.py, on SQLite and PostgreSQL."""

from __future__ import annotations

import fcntl
import time

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import insert
from sqlalchemy import inspect
from sqlalchemy import select
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from proxy_app import migrate
from proxy_app import schema
from proxy_app.migrate import MigrationLockBusy
from proxy_app.store import make_engine
from tests.servers import in_processes


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request, tmp_path):
    """An engine on an empty database: a SQLite file in tmp_path, or a new PostgreSQL database."""
    if request.param == "sqlite":
        engine = make_engine(None, {"STATE_DIRECTORY": str(tmp_path)})
    else:
        engine = make_engine(request.getfixturevalue("pg_url"))
    yield engine
    engine.dispose()


def test_there_is_one_head_and_it_is_the_head_version():
    script = ScriptDirectory.from_config(migrate._config())
    assert script.get_heads() == [migrate.head_version()]


def test_upgrade_creates_exactly_the_tables_of_the_schema(engine):
    assert migrate.current_version(engine) is None
    assert migrate.upgrade(engine) == migrate.head_version()
    assert migrate.current_version(engine) == migrate.head_version()

    found = inspect(engine)
    assert set(found.get_table_names()) == set(schema.metadata.tables) | {"alembic_version"}
    for table in schema.metadata.sorted_tables:
        columns = {c["name"]: c["nullable"] for c in found.get_columns(table.name)}
        assert columns == {c.name: c.nullable for c in table.columns}, table.name
        assert found.get_pk_constraint(table.name)["constrained_columns"] == [c.name for c in table.primary_key]
        indexes = {i["name"]: i["column_names"] for i in found.get_indexes(table.name) if not i.get("duplicates_constraint")}
        assert indexes == {i.name: [c.name for c in i.columns] for i in table.indexes}, table.name
        unique = [u["column_names"] for u in found.get_unique_constraints(table.name)]
        assert unique == [[c.name] for c in table.columns if c.unique], table.name

    # Alembic's own comparison (what `alembic revision --autogenerate` would write): nothing.
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), schema.metadata) == []


def test_upgrade_is_idempotent_and_keeps_the_data(engine):
    migrate.upgrade(engine)
    with engine.begin() as conn:
        conn.execute(insert(schema.changes).values(name="keys", generation=7))
    assert migrate.upgrade(engine) == migrate.head_version()
    with engine.connect() as conn:
        assert conn.execute(select(schema.changes.c.generation)).scalar() == 7
        assert conn.execute(text("SELECT count(*) FROM alembic_version")).scalar() == 1


def test_the_postgres_migration_lock_is_released(pg_url):
    engine = make_engine(pg_url)
    migrate.upgrade(engine)
    with engine.connect() as conn:
        held = conn.execute(text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'")).scalar()
        # And another session can take it at once.
        assert conn.execute(text("SELECT pg_try_advisory_lock(:id)"), {"id": migrate.LOCK_ID}).scalar() is True
        conn.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": migrate.LOCK_ID})
    assert held == 0
    engine.dispose()


def test_a_held_postgres_lock_bounds_the_wait(pg_url):
    engine = make_engine(pg_url)
    with engine.connect() as holder:
        holder.execute(text("SELECT pg_advisory_lock(:id)"), {"id": migrate.LOCK_ID})
        started = time.monotonic()
        with pytest.raises(MigrationLockBusy):
            migrate.upgrade(engine, timeout=0.5)
        assert time.monotonic() - started < 5
        holder.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": migrate.LOCK_ID})
    assert migrate.current_version(engine) is None  # nothing ran without the lock
    assert migrate.upgrade(engine, timeout=5) == migrate.head_version()
    engine.dispose()


def test_a_held_sqlite_lock_bounds_the_wait(tmp_path):
    engine = make_engine(None, {"STATE_DIRECTORY": str(tmp_path)})
    with open(tmp_path / "proxy_app.db.lock", "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        started = time.monotonic()
        with pytest.raises(MigrationLockBusy):
            migrate.upgrade(engine, timeout=0.3)
        assert time.monotonic() - started < 5
        fcntl.flock(lock_file, fcntl.LOCK_UN)
    assert migrate.upgrade(engine, timeout=5) == migrate.head_version()
    engine.dispose()


def _upgrade_in_child(database_url: str | None, state_directory: str) -> str:
    engine = make_engine(database_url, {"STATE_DIRECTORY": state_directory})
    try:
        return migrate.upgrade(engine, timeout=60)
    finally:
        engine.dispose()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_processes_upgrading_one_fresh_database_at_once_all_succeed(backend, request, tmp_path):
    database_url = request.getfixturevalue("pg_url") if backend == "postgresql" else None
    head = migrate.head_version()
    assert in_processes(_upgrade_in_child, [(database_url, str(tmp_path))] * 3, timeout=90) == [head] * 3
    engine = make_engine(database_url, {"STATE_DIRECTORY": str(tmp_path)})
    assert migrate.current_version(engine) == head
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM alembic_version")).scalar() == 1
    engine.dispose()


def test_an_unusable_sqlite_directory_fails_as_a_database_error(tmp_path):
    # The caller (start-up) treats any SQLAlchemyError as "database unavailable".
    engine = make_engine(None, {"STATE_DIRECTORY": str(tmp_path / "missing")})
    with pytest.raises(OperationalError):
        migrate.upgrade(engine)
    engine.dispose()
