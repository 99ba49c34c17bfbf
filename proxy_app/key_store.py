"""Virtual keys and usage rows in the database: SQLAlchemy Core on schema.keys, spend_logs, changes.

Every change to a key (generate, update, delete, block, unblock, regenerate) bumps the
"keys" generation in ``proxy_changes`` in the same transaction, so a worker that sees the
counter move (proxy_app/notices.py) also sees the change, and a rolled-back change moves
nothing. The functions that change keys take the Engine and run one transaction each; the
readers take a Connection or an Engine.

Errors from the database itself (unreachable, locked) are left to the caller as SQLAlchemy
exceptions; :class:`KeyConflict` and :class:`KeyNotFound` are the admin API's 409 and 404.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass

from sqlalchemy import Engine
from sqlalchemy import and_
from sqlalchemy import delete
from sqlalchemy import func
from sqlalchemy import insert
from sqlalchemy import or_
from sqlalchemy import select
from sqlalchemy import update
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects import sqlite
from sqlalchemy.exc import IntegrityError

from proxy_app.schema import changes
from proxy_app.schema import keys
from proxy_app.schema import spend_logs as spend_logs_table

KEYS = "keys"


class KeyConflict(Exception):
    """409: the alias or the key is taken."""


class KeyNotFound(Exception):
    """404: no such key (the message never repeats what the caller sent)."""


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """One row of ``proxy_keys``. Times are epoch seconds; ``allowed_routes`` None = every ``auth: true`` endpoint."""

    token: str
    key_alias: str | None
    key_name: str
    expires: float | None
    allowed_routes: tuple[str, ...] | None
    rpm_limit: int | None
    max_parallel_requests: int | None
    max_budget: float | None
    budget_duration: str | None
    budget_reset_at: float | None
    spend: float
    metadata: dict | None
    blocked: bool
    extra: dict | None
    created_at: float
    updated_at: float
    previous_token: str | None
    previous_expires: float | None


def _record(row) -> KeyRecord:
    values = dict(row._mapping)
    routes = values["allowed_routes"]
    values["allowed_routes"] = None if routes is None else tuple(routes)
    values["spend"] = values["spend"] or 0.0
    values["blocked"] = bool(values["blocked"])
    return KeyRecord(**values)


@contextmanager
def connection_of(conn_or_engine):
    """A Connection for the caller's reads: the one given, or one of the Engine's for the block."""
    if isinstance(conn_or_engine, Engine):
        with conn_or_engine.connect() as conn:
            yield conn
    else:
        yield conn_or_engine


# --- change notices ---------------------------------------------------------------------------


def _upsert(conn):
    return {"sqlite": sqlite.insert, "postgresql": postgresql.insert}.get(conn.dialect.name)


def bump(conn, name: str) -> None:
    """Add one to ``name``'s generation, creating the row at 1; in the caller's transaction."""
    make = _upsert(conn)
    if make is not None:
        statement = make(changes).values(name=name, generation=1)
        conn.execute(statement.on_conflict_do_update(index_elements=[changes.c.name], set_={"generation": changes.c.generation + 1}))
        return
    # Another database: update, else insert (the engines proxy_app supports take the branch above).
    if conn.execute(update(changes).where(changes.c.name == name).values(generation=changes.c.generation + 1)).rowcount == 0:
        conn.execute(insert(changes).values(name=name, generation=1))


def generation(conn, name: str) -> int:
    """``name``'s generation; 0 before its first change."""
    with connection_of(conn) as connection:
        value = connection.execute(select(changes.c.generation).where(changes.c.name == name)).scalar()
    return value or 0


# --- reads ------------------------------------------------------------------------------------


def find_key(conn, token: str, now: float) -> KeyRecord | None:
    """The key whose token is ``token``, or whose previous token it is and still in its grace period.

    Blocked and expired keys are returned as they are: saying why is the caller's job
    (proxy_app/key_rules.py).
    """
    query = select(keys).where(
        or_(keys.c.token == token, and_(keys.c.previous_token == token, keys.c.previous_expires > now))
    )
    with connection_of(conn) as connection:
        rows = connection.execute(query).all()
    # The current token wins over another key's previous one (possible only with a custom
    # key equal to a regenerated key's old one, which create_key refuses).
    for row in rows:
        if row.token == token:
            return _record(row)
    return _record(rows[0]) if rows else None


def get_key(conn, token: str) -> KeyRecord | None:
    """The key whose current token is ``token`` (admin calls name keys by their current token)."""
    with connection_of(conn) as connection:
        row = connection.execute(select(keys).where(keys.c.token == token)).first()
    return None if row is None else _record(row)


def list_keys(
    conn, *, page: int = 1, size: int = 10, key_alias: str | None = None, token: str | None = None, extra: dict | None = None
) -> tuple[list[KeyRecord], int]:
    """One page of keys, oldest first, and how many keys match in all.

    ``extra`` filters on inert LiteLLM fields (``{"team_id": "t1"}``), compared as strings.
    """
    conditions = []
    if key_alias is not None:
        conditions.append(keys.c.key_alias == key_alias)
    if token is not None:
        conditions.append(keys.c.token == token)
    for name, value in (extra or {}).items():
        conditions.append(keys.c.extra[name].as_string() == value)
    with connection_of(conn) as connection:
        total = connection.execute(select(func.count()).select_from(keys).where(*conditions)).scalar() or 0
        rows = connection.execute(
            select(keys).where(*conditions).order_by(keys.c.created_at, keys.c.token).limit(size).offset((page - 1) * size)
        ).all()
    return [_record(row) for row in rows], total


# --- changes ----------------------------------------------------------------------------------


def _token_taken(conn, token: str, ignore: str = "") -> None:
    """KeyConflict if a key other than ``ignore`` has ``token``, now or in a grace period."""
    taken = select(keys.c.token).where(or_(keys.c.token == token, keys.c.previous_token == token), keys.c.token != ignore)
    if conn.execute(taken).first():
        raise KeyConflict("This key already exists.")


def _alias_taken(conn, alias: str | None, ignore: str = "") -> None:
    if alias is not None and conn.execute(select(keys.c.token).where(keys.c.key_alias == alias, keys.c.token != ignore)).first():
        raise KeyConflict("A key with this key_alias already exists.")


def write_transaction(conn) -> None:
    """Take SQLite's write lock before the first read (waiting under busy_timeout), so the
    checks and the read-modify-write of a change see what they then write over; PostgreSQL
    locks the key's row instead (``FOR UPDATE`` in :func:`_apply`)."""
    if conn.dialect.name == "sqlite":
        conn.exec_driver_sql("BEGIN IMMEDIATE")


@contextmanager
def _changing(engine: Engine):
    """One transaction that bumps the "keys" generation; a unique-constraint race is a 409."""
    try:
        with engine.begin() as conn:
            write_transaction(conn)
            yield conn
            bump(conn, KEYS)
    except IntegrityError:
        # Two admins creating the same alias (or key) at once: the check above saw neither.
        raise KeyConflict("A key with this key_alias or key already exists.") from None


def create_key(engine: Engine, token: str, key_name: str, columns: dict, extra: dict, now: float) -> KeyRecord:
    """Insert a key. ``columns``: schema.keys values from proxy_app.keys.changes_of.

    :raises KeyConflict: the alias, or the key itself, is taken.
    """
    values = {
        "token": token,
        "key_name": key_name,
        "spend": 0.0,
        "blocked": False,
        **columns,
        "extra": extra or None,
        "created_at": now,
        "updated_at": now,
        "previous_token": None,
        "previous_expires": None,
    }
    with _changing(engine) as conn:
        _token_taken(conn, token)
        _alias_taken(conn, values.get("key_alias"))
        conn.execute(insert(keys).values(**values))
        return _record(conn.execute(select(keys).where(keys.c.token == token)).one())


def _apply(conn, token: str, columns: dict, extra: dict, now: float, identity: dict | None = None) -> KeyRecord:
    row = conn.execute(select(keys).where(keys.c.token == token).with_for_update()).first()
    if row is None:
        raise KeyNotFound("key not found")
    values = dict(columns)
    if extra:
        merged = dict(row.extra or {})
        for name, value in extra.items():
            if value is None:
                merged.pop(name, None)
            else:
                merged[name] = value
        values["extra"] = merged or None
    new_token = (identity or {}).get("token", token)
    if new_token != token:
        _token_taken(conn, new_token, ignore=token)
    if "key_alias" in values:
        _alias_taken(conn, values["key_alias"], ignore=token)
    values.update(identity or {})
    values["updated_at"] = now
    conn.execute(update(keys).where(keys.c.token == token).values(**values))
    return _record(conn.execute(select(keys).where(keys.c.token == new_token)).one())


def update_key(engine: Engine, token: str, columns: dict, extra: dict, now: float) -> KeyRecord:
    """Change the given columns (None clears) and inert fields (None removes) of a key.

    :raises KeyNotFound: no key has this token. :raises KeyConflict: the new alias is taken.
    """
    with _changing(engine) as conn:
        return _apply(conn, token, columns, extra, now)


def set_blocked(engine: Engine, token: str, blocked: bool, now: float) -> KeyRecord:
    with _changing(engine) as conn:
        return _apply(conn, token, {"blocked": blocked}, {}, now)


def regenerate_key(
    engine: Engine, token: str, new_token: str, key_name: str, grace: float, now: float, columns: dict, extra: dict
) -> KeyRecord:
    """Give a key a new token; same record (alias, limits, spend). The old token keeps
    working for ``grace`` seconds (0: not at all); an earlier grace period ends now.

    :raises KeyNotFound: no key has this token. :raises KeyConflict: the new key, or a new alias, is taken.
    """
    identity = {
        "token": new_token,
        "key_name": key_name,
        "previous_token": token if grace > 0 else None,
        "previous_expires": now + grace if grace > 0 else None,
    }
    with _changing(engine) as conn:
        return _apply(conn, token, columns, extra, now, identity)


def delete_keys(engine: Engine, tokens: Iterable[str]) -> tuple[list[str], list[str]]:
    """Delete keys by token: (tokens deleted, tokens not found), in the order given."""
    return _delete(engine, keys.c.token, list(dict.fromkeys(tokens)))


def delete_aliases(engine: Engine, aliases: Iterable[str]) -> tuple[list[str], list[str]]:
    """Delete keys by alias: (aliases deleted, aliases not found), in the order given."""
    return _delete(engine, keys.c.key_alias, list(dict.fromkeys(aliases)))


def _delete(engine: Engine, column, values: list[str]) -> tuple[list[str], list[str]]:
    if not values:
        return [], []
    with engine.begin() as conn:
        write_transaction(conn)
        found = set(conn.execute(select(column).where(column.in_(values))).scalars())
        if found:
            conn.execute(delete(keys).where(column.in_(found)))
            bump(conn, KEYS)
    return [v for v in values if v in found], [v for v in values if v not in found]


# --- usage rows --------------------------------------------------------------------------------


def spend_logs(
    conn,
    api_key_token: str | None = None,
    key_alias: str | None = None,
    start: float | None = None,
    end: float | None = None,
    limit: int = 100,
    page: int = 1,
) -> list[dict]:
    """Usage rows, newest first, as mappings of schema.spend_logs columns.

    ``start`` is inclusive and ``end`` exclusive (epoch seconds of the request's start).
    """
    table = spend_logs_table
    conditions = []
    if api_key_token is not None:
        conditions.append(table.c.api_key == api_key_token)
    if key_alias is not None:
        conditions.append(table.c.key_alias == key_alias)
    if start is not None:
        conditions.append(table.c.start_time >= start)
    if end is not None:
        conditions.append(table.c.start_time < end)
    query = (
        select(table)
        .where(*conditions)
        .order_by(table.c.start_time.desc(), table.c.request_id.desc())
        .limit(limit)
        .offset((page - 1) * limit)
    )
    with connection_of(conn) as connection:
        return [dict(row._mapping) for row in connection.execute(query)]
