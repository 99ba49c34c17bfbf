"""Stored pass-through endpoints in the database: SQLAlchemy Core on schema.endpoints.

Every change bumps the "endpoints" generation in ``proxy_changes`` in the same transaction
(as key changes bump "keys", proxy_app/key_store.py), so every worker that sees the counter
move (proxy_app/notices.py) reads a table that already holds the change. Changes are
serialised (SQLite's write lock, taken before the first read; a PostgreSQL advisory lock):
the check that a path and method are free and the write that takes them cannot interleave
with another change's.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from sqlalchemy import Engine
from sqlalchemy import delete
from sqlalchemy import insert
from sqlalchemy import select
from sqlalchemy import text
from sqlalchemy import update

from proxy_app.key_store import bump
from proxy_app.key_store import connection_of
from proxy_app.key_store import write_transaction
from proxy_app.schema import endpoints

ENDPOINTS = "endpoints"
# Two integers: a key space of their own (the limiter's locks use another first integer).
_PG_LOCK = text("SELECT pg_advisory_xact_lock(7302000, 1)")


@dataclass(frozen=True, slots=True)
class StoredEndpoint:
    """One row: the effective entry as written (literal header values "<redacted>"), and the
    sealed literal values (None when it has none)."""

    id: str
    entry: dict
    sealed: str | None
    created_at: float
    updated_at: float


class Change:
    """A change's transaction: whether it changed anything (a no-op moves no counter)."""

    def __init__(self, conn) -> None:
        self.conn = conn
        self.changed = False


def _stored(row) -> StoredEndpoint:
    return StoredEndpoint(row.id, dict(row.entry), row.sealed, row.created_at, row.updated_at)


def list_stored(conn_or_engine) -> list[StoredEndpoint]:
    """Every stored endpoint, oldest first."""
    with connection_of(conn_or_engine) as conn:
        return [_stored(row) for row in conn.execute(select(endpoints).order_by(endpoints.c.created_at, endpoints.c.id))]


def get_stored(conn, endpoint_id: str) -> StoredEndpoint | None:
    row = conn.execute(select(endpoints).where(endpoints.c.id == endpoint_id)).first()
    return None if row is None else _stored(row)


@contextmanager
def changing(engine: Engine) -> Iterator[Change]:
    """One serialised transaction; bumps the "endpoints" generation if it changed something."""
    with engine.begin() as conn:
        write_transaction(conn)
        if conn.dialect.name == "postgresql":
            conn.execute(_PG_LOCK)
        change = Change(conn)
        yield change
        if change.changed:
            bump(conn, ENDPOINTS)


def add(change: Change, endpoint_id: str, entry: dict, sealed: str | None, now: float) -> None:
    change.conn.execute(
        insert(endpoints).values(id=endpoint_id, path=entry["path"], entry=entry, sealed=sealed, created_at=now, updated_at=now)
    )
    change.changed = True


def replace(change: Change, endpoint_id: str, entry: dict, sealed: str | None, now: float) -> None:
    change.conn.execute(
        update(endpoints).where(endpoints.c.id == endpoint_id).values(path=entry["path"], entry=entry, sealed=sealed, updated_at=now)
    )
    change.changed = True


def remove(change: Change, endpoint_id: str) -> bool:
    removed = change.conn.execute(delete(endpoints).where(endpoints.c.id == endpoint_id)).rowcount > 0
    change.changed = change.changed or removed
    return removed
