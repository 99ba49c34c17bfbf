"""Bring the database to the newest schema revision, one process at a time.

The revisions are Alembic scripts in proxy_app/migrations/versions, run in code (no alembic.ini,
no ``alembic`` command): every instance runs :func:`upgrade` at start-up, and a database already
at the head revision costs one read. Several instances (gunicorn masters on several machines,
or a restart racing the old instance) may start at once, so the upgrade is serialised:
- PostgreSQL: a session-level advisory lock (``pg_advisory_lock``) held by the connection that
  runs the migration, released in ``finally`` (or the connection is closed, which releases it);
  the second instance waits, then finds the database at head and does nothing;
- SQLite: an exclusive ``fcntl.flock`` on ``<database file>.lock`` (the processes share a
  machine), and the migration runs inside ``BEGIN IMMEDIATE``, so a crash midway leaves the old
  schema, not half a new one (SQLite's DDL is transactional; PostgreSQL's is too, and Alembic's
  version row is written in the same transaction).
A wait for the lock is bounded (LOCK_TIMEOUT) and ends in :class:`MigrationLockBusy`.
"""

from __future__ import annotations

import fcntl
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection
from sqlalchemy import Engine
from sqlalchemy import text
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import SQLAlchemyError

from proxy_app.store import is_sqlite

log = logging.getLogger("proxy_app")

MIGRATIONS = Path(__file__).with_name("migrations")
# The advisory lock's key, any constant bigint the database's other users do not pick:
# "proxyapp" in ASCII.
LOCK_ID = 0x70726F7879617070
LOCK_TIMEOUT = 120.0  # seconds to wait for another instance's migration to finish


# The first revision with proxy_endpoints (revisions are zero-padded: they compare as strings).
ENDPOINTS_REVISION = "0002"


class MigrationLockBusy(Exception):
    """Another process held the migration lock for longer than the timeout."""


def head_version() -> str:
    """The newest revision shipped with this code."""
    return ScriptDirectory.from_config(_config()).get_current_head()


def current_version(engine: Engine) -> str | None:
    """The database's revision; None when no migration has run on it."""
    with engine.connect() as conn:
        return _revision(conn)


def upgrade(engine: Engine, timeout: float = LOCK_TIMEOUT) -> str:
    """Migrate the database to the head revision (nothing to do if it is there); return it."""
    if is_sqlite(engine):
        # Locked before connecting: the first connection to a new file switches it to WAL,
        # which needs the file to itself, so racing processes wait on the lock file instead.
        with _file_lock(f"{engine.url.database}.lock", timeout), engine.connect() as conn:
            return _upgrade(conn)
    with engine.connect() as conn, _advisory_lock(conn, timeout):
        return _upgrade(conn)


def _upgrade(conn: Connection) -> str:
    before = _revision(conn)
    conn.rollback()  # end the read's transaction: the migration runs in one of its own
    with conn.begin():
        if conn.dialect.name == "sqlite":
            # The sqlite3 module would run each DDL statement on its own; one transaction, and
            # the write lock from the start (the file lock already keeps other migrations out).
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        # env.py sees a transaction already open on the connection and runs inside it.
        command.upgrade(_config(conn), "head")
    after = _revision(conn)
    conn.rollback()
    if after != before:
        log.info("database schema migrated from revision %s to %s", before, after)
    return after


def _revision(conn: Connection) -> str | None:
    return MigrationContext.configure(conn).get_current_revision()


def _config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


@contextmanager
def _advisory_lock(conn: Connection, timeout: float) -> Iterator[None]:
    # lock_timeout bounds the wait (advisory locks are ordinary heavyweight locks); set_config
    # with is_local=true scopes it to this transaction, so the migration itself is not limited.
    conn.execute(text("SELECT set_config('lock_timeout', :ms, true)"), {"ms": f"{int(timeout * 1000)}ms"})
    try:
        conn.execute(text("SELECT pg_advisory_lock(:id)"), {"id": LOCK_ID})
    except OperationalError as exc:
        if getattr(exc.orig, "sqlstate", None) == "55P03":  # lock_not_available
            raise MigrationLockBusy(f"another process held the database migration lock for more than {timeout:g} s") from None
        raise
    conn.commit()
    try:
        yield
    finally:
        try:
            conn.rollback()
            conn.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": LOCK_ID})
            conn.commit()
        except SQLAlchemyError:
            # The lock belongs to the database session: a connection returned to the pool would
            # keep it and block every other instance, so this one is closed for good instead.
            conn.invalidate()


@contextmanager
def _file_lock(path: str, timeout: float) -> Iterator[None]:
    try:
        lock_file = open(path, "a")  # noqa: SIM115 - closed below; "a": created if missing, never truncated
    except OSError as exc:
        # A directory that is missing or not writable fails as a database error, like an
        # unreachable PostgreSQL: the callers treat both as "the database is unavailable".
        raise OperationalError(f"open {path}", None, exc) from None
    with lock_file:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise MigrationLockBusy(f"another process held {path} for more than {timeout:g} s") from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)
