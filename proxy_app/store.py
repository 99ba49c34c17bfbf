"""The database engine: PostgreSQL when ``database_url`` is set, else a SQLite file.

One SQLAlchemy Core engine per process, made after gunicorn forks its workers (pooled
connections must not be shared across a fork).

SQLite (no ``database_url``): ``$STATE_DIRECTORY/proxy_app.db`` (the directory systemd makes for
the unit's ``StateDirectory=``), else ``proxy_app.db`` in the working directory. Every connection
gets, from a ``connect`` event listener (SQLAlchemy's documented way to run PRAGMAs per
connection, https://docs.sqlalchemy.org/en/20/dialects/sqlite.html#foreign-key-support):
- ``journal_mode=WAL``: readers never block the writer nor the writer the readers, which several
  worker processes on one file need (https://www.sqlite.org/wal.html);
- ``busy_timeout=5000``: a writer waits up to 5 s for another process's write to finish instead
  of failing at once with "database is locked";
- ``synchronous=NORMAL``: in WAL mode a commit is durable against a process crash, only a power
  loss can lose the last commits, for one fsync per checkpoint instead of one per commit.
Transactions keep the ``sqlite3`` module's own handling: it opens a (deferred) transaction at a
statement's first INSERT/UPDATE/DELETE, so a write waits for the lock under busy_timeout. A
transaction that must read and then write consistently (a limit check) starts with
``conn.exec_driver_sql("BEGIN IMMEDIATE")``: a deferred transaction that read first cannot wait
for the write lock and fails at once when another process wrote in between.

PostgreSQL: psycopg 3 (``postgresql+psycopg://``; ``postgresql://`` and ``postgres://`` are taken as
that), a small pool per process checked before use (``pool_pre_ping``, so a connection the
server dropped during a restart is replaced rather than failing a request), and
``connect_timeout`` 3 s so an unreachable server fails a request quickly instead of holding a
worker thread (both unless the URL sets them itself).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from sqlalchemy import Engine
from sqlalchemy import create_engine
from sqlalchemy import event
from sqlalchemy.engine import URL
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

SQLITE_FILE = "proxy_app.db"
BUSY_TIMEOUT_MS = 5000
CONNECT_TIMEOUT = 3  # seconds (libpq's connect_timeout)
POOL_SIZE = 5  # connections kept per worker process: keys are cached, the pool serves misses and writers
MAX_OVERFLOW = 10  # extra connections under a burst, closed when returned
POOL_TIMEOUT = 5  # seconds a thread waits for a free connection before the store counts as unavailable
POSTGRES_SCHEMES = ("postgresql", "postgres", "postgresql+psycopg")
# Query parameters that can carry a secret (libpq accepts password= in the URL).
SECRET_PARAMETERS = ("password", "sslpassword")
_REDACTED = "REDACTEDbyproxyapp"


class UnusableDatabaseURL(ValueError):
    """database_url is not a PostgreSQL (or SQLite file) URL. The message never repeats a password."""


def sqlite_path(environ: Mapping[str, str]) -> str:
    """The SQLite file: in $STATE_DIRECTORY if systemd set it, else in the working directory (absolute)."""
    # systemd joins several StateDirectory= entries with ":"; the first is the unit's own.
    state = (environ.get("STATE_DIRECTORY") or "").split(":")[0]
    return os.path.abspath(os.path.join(state or os.getcwd(), SQLITE_FILE))


def engine_url(database_url: str | None, environ: Mapping[str, str]) -> str:
    """The SQLAlchemy URL for ``database_url``: the SQLite file when it is unset, psycopg for PostgreSQL.

    ``sqlite:///<absolute path>`` is also accepted (tools and tests name a file of their own).
    """
    if not database_url:
        return URL.create("sqlite", database=sqlite_path(environ)).render_as_string(hide_password=False)
    url = _parse(database_url)
    if url.drivername in POSTGRES_SCHEMES:
        return url.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    if url.drivername == "sqlite" and url.database and os.path.isabs(url.database):
        return database_url
    raise UnusableDatabaseURL(f"database_url must be a postgresql:// URL, got {describe(database_url)}")


def make_engine(database_url: str | None, environ: Mapping[str, str] = os.environ) -> Engine:
    """An engine for ``database_url`` (see the module docstring). No connection is opened yet."""
    url = make_url(engine_url(database_url, environ))
    if url.drivername == "sqlite":
        return _sqlite_engine(url)
    connect_args = {}
    if "connect_timeout" not in url.query:
        connect_args["connect_timeout"] = CONNECT_TIMEOUT
    if "application_name" not in url.query:
        connect_args["application_name"] = "proxy_app"  # who holds a connection, in pg_stat_activity
    return create_engine(
        url,
        pool_pre_ping=True,
        pool_size=POOL_SIZE,
        max_overflow=MAX_OVERFLOW,
        pool_timeout=POOL_TIMEOUT,
        connect_args=connect_args,
    )


def _sqlite_engine(url: URL) -> Engine:
    # The sqlite3 module's timeout is the busy timeout too; the PRAGMA below states it for every
    # connection whatever the driver's default.
    engine = create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_MS / 1000})

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_connection, _record) -> None:
        cursor = dbapi_connection.cursor()
        try:
            # busy_timeout first: switching a new file to WAL needs a lock another process may hold.
            cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = NORMAL")
        finally:
            cursor.close()

    return engine


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


def describe(database_url: str | None, environ: Mapping[str, str] = os.environ) -> str:
    """The database for a log line or an error: passwords replaced by ``***``, in the userinfo
    and in the query string. None is the SQLite file."""
    if not database_url:
        return f"SQLite {sqlite_path(environ)}"
    try:
        url = make_url(database_url)
    except (ArgumentError, ValueError):
        # Not parseable: anything in it could be the password, so none of it is repeated.
        return "(an unparseable URL)"
    # A placeholder of letters only, so URL quoting leaves it as it is, then shown as "***" like
    # the password in the userinfo.
    query = {name: (_REDACTED if name.lower() in SECRET_PARAMETERS else value) for name, value in url.query.items()}
    return url.set(query=query).render_as_string(hide_password=True).replace(_REDACTED, "***")


def _parse(database_url: str) -> URL:
    try:
        return make_url(database_url)
    except (ArgumentError, ValueError):
        raise UnusableDatabaseURL(f"database_url is not a URL: {describe(database_url)}") from None
