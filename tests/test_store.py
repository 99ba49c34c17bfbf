"""The database engine (proxy_app/store.py): URLs, redaction, SQLite's settings, PostgreSQL's pool."""

from __future__ import annotations

import socket
import time

import psycopg
import pytest
from sqlalchemy import func
from sqlalchemy import insert
from sqlalchemy import select
from sqlalchemy import text
from sqlalchemy import update
from sqlalchemy.exc import OperationalError

from proxy_app import migrate
from proxy_app import schema
from proxy_app.store import UnusableDatabaseURL
from proxy_app.store import describe
from proxy_app.store import engine_url
from proxy_app.store import is_sqlite
from proxy_app.store import make_engine
from proxy_app.store import sqlite_path
from tests.servers import in_processes

PASSWORD = "hunter2-secret"


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, "{cwd}/proxy_app.db"),
        ({"STATE_DIRECTORY": ""}, "{cwd}/proxy_app.db"),
        ({"STATE_DIRECTORY": "/var/lib/proxy-app"}, "/var/lib/proxy-app/proxy_app.db"),
        # systemd joins several StateDirectory= entries with ":"
        ({"STATE_DIRECTORY": "/var/lib/proxy-app:/var/lib/other"}, "/var/lib/proxy-app/proxy_app.db"),
        ({"STATE_DIRECTORY": "state"}, "{cwd}/state/proxy_app.db"),
    ],
)
def test_sqlite_path(environ, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert sqlite_path(environ) == expected.format(cwd=tmp_path)


@pytest.mark.parametrize(
    ("database_url", "expected"),
    [
        (None, "sqlite:////state/proxy_app.db"),
        ("", "sqlite:////state/proxy_app.db"),
        ("postgresql://u:pw@db.example:5432/proxy", "postgresql+psycopg://u:pw@db.example:5432/proxy"),
        ("postgres://u:pw@db.example/proxy", "postgresql+psycopg://u:pw@db.example/proxy"),
        ("postgresql+psycopg://db.example/proxy?sslmode=require", "postgresql+psycopg://db.example/proxy?sslmode=require"),
        ("postgresql:///proxy?host=/var/run/postgresql", "postgresql+psycopg:///proxy?host=%2Fvar%2Frun%2Fpostgresql"),
        ("sqlite:////tmp/other.db", "sqlite:////tmp/other.db"),
    ],
)
def test_engine_url(database_url, expected):
    assert engine_url(database_url, {"STATE_DIRECTORY": "/state"}) == expected


@pytest.mark.parametrize(
    "database_url",
    [
        f"mysql://u:{PASSWORD}@db.example/proxy",
        f"postgresql+psycopg2://u:{PASSWORD}@db.example/proxy",
        "sqlite:///relative.db",  # would depend on the working directory
        "sqlite://",  # in memory: each connection its own empty database
        f"not a url {PASSWORD}",
        f"://u:{PASSWORD}@",
    ],
)
def test_engine_url_refuses_an_unusable_url_without_repeating_the_password(database_url):
    with pytest.raises(UnusableDatabaseURL) as caught:
        engine_url(database_url, {})
    assert PASSWORD not in str(caught.value)
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize(
    ("database_url", "expected"),
    [
        (f"postgresql://proxy:{PASSWORD}@db.example:5432/proxy", "postgresql://proxy:***@db.example:5432/proxy"),
        (f"postgresql+psycopg://proxy:{PASSWORD}@db.example/proxy", "postgresql+psycopg://proxy:***@db.example/proxy"),
        ("postgresql://proxy:p%40ss%3Aword@db.example/proxy", "postgresql://proxy:***@db.example/proxy"),
        (f"postgresql://db.example/proxy?password={PASSWORD}&sslmode=require", "postgresql://db.example/proxy?password=***&sslmode=require"),
        ("postgresql://proxy@db.example/proxy", "postgresql://proxy@db.example/proxy"),
        (None, "SQLite /state/proxy_app.db"),
        (f"garbage {PASSWORD}", "(an unparseable URL)"),
    ],
)
def test_describe_never_shows_a_password(database_url, expected):
    assert describe(database_url, {"STATE_DIRECTORY": "/state"}) == expected


def test_engine_repr_hides_the_password():
    engine = make_engine(f"postgresql://proxy:{PASSWORD}@127.0.0.1:1/proxy")
    assert PASSWORD not in repr(engine) and PASSWORD not in str(engine.url)
    engine.dispose()


def _pragmas(conn) -> tuple:
    return tuple(conn.exec_driver_sql(f"PRAGMA {name}").scalar() for name in ("journal_mode", "busy_timeout", "synchronous"))


def test_sqlite_engine_is_in_wal_mode_with_a_busy_timeout_on_every_connection(tmp_path):
    engine = make_engine(None, {"STATE_DIRECTORY": str(tmp_path)})
    assert is_sqlite(engine)
    assert engine.url.database == str(tmp_path / "proxy_app.db")
    # Two connections at once: two DBAPI connections, each set up by the connect listener.
    with engine.connect() as first, engine.connect() as second:
        assert _pragmas(first) == _pragmas(second) == ("wal", 5000, 1)  # synchronous 1 = NORMAL
    engine.dispose()
    assert (tmp_path / "proxy_app.db").exists()


def _write_many(directory: str, worker: int, count: int) -> int:
    """One process's writes: ``count`` transactions, each an insert and a read-modify-write."""
    engine = make_engine(None, {"STATE_DIRECTORY": directory})
    try:
        for i in range(count):
            with engine.begin() as conn:
                conn.execute(insert(schema.admissions).values(id=f"{worker}-{i}", token="t", admitted_at=time.time(), lease_expires=0.0))
                conn.execute(update(schema.changes).where(schema.changes.c.name == "keys").values(generation=schema.changes.c.generation + 1))
        return count
    finally:
        engine.dispose()


def test_two_processes_write_one_sqlite_file_without_database_is_locked(tmp_path):
    engine = make_engine(None, {"STATE_DIRECTORY": str(tmp_path)})
    migrate.upgrade(engine)
    with engine.begin() as conn:
        conn.execute(insert(schema.changes).values(name="keys", generation=0))
    engine.dispose()  # nothing pooled crosses the fork

    per_process = 300
    assert in_processes(_write_many, [(str(tmp_path), w, per_process) for w in range(3)], timeout=120) == [per_process] * 3

    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(schema.admissions)).scalar() == 3 * per_process
        assert conn.execute(select(schema.changes.c.generation)).scalar() == 3 * per_process  # no lost update
    engine.dispose()


def test_postgres_engine_pool_settings(pg_url):
    engine = make_engine(pg_url)
    assert not is_sqlite(engine)
    assert engine.dialect.driver == "psycopg"
    assert engine.pool.size() == 5 and engine.pool._max_overflow == 10
    with engine.connect() as conn:
        assert conn.execute(text("SHOW application_name")).scalar() == "proxy_app"
    engine.dispose()


def test_postgres_engine_recovers_after_a_server_restart(postgres, pg_url):
    engine = make_engine(pg_url)
    with engine.connect() as conn:
        first = conn.execute(text("SELECT pg_backend_pid()")).scalar()
    postgres.stop()
    with pytest.raises(OperationalError), engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    postgres.start()
    # The pooled connection died with the old server: pool_pre_ping replaces it, no error.
    with engine.connect() as conn:
        assert conn.execute(text("SELECT pg_backend_pid()")).scalar() != first
    engine.dispose()


def test_postgres_engine_gives_up_on_a_silent_server_after_the_connect_timeout():
    # A listener that never answers: the TCP handshake completes (the kernel does it) and then
    # nothing, like a server behind a dead route. libpq waits connect_timeout (3 s), not forever.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        engine = make_engine(f"postgresql://proxy:{PASSWORD}@127.0.0.1:{silent.getsockname()[1]}/proxy")
        started = time.monotonic()
        with pytest.raises(OperationalError) as caught, engine.connect():
            pass
        elapsed = time.monotonic() - started
        engine.dispose()
    assert 2.5 <= elapsed < 10, elapsed
    assert isinstance(caught.value.orig, psycopg.OperationalError)
    assert PASSWORD not in str(caught.value)


def test_make_engine_opens_no_connection():
    # The gunicorn master may build settings before forking: making the engine must not connect.
    engine = make_engine("postgresql://proxy@127.0.0.1:1/proxy")
    assert engine.pool.checkedout() == 0 and engine.pool.checkedin() == 0
    engine.dispose()
