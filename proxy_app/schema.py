"""The store's tables, in SQLAlchemy Core: one definition for SQLite and PostgreSQL.

Times are seconds since the epoch (``Float``): one type on both engines, no time zones to
get wrong; the admin API formats them as ISO 8601 UTC. Alembic migrations under
``proxy_app/migrations/versions`` create and change these tables; a change here needs a new
migration (``tests/test_migrations.py`` compares the two).
"""

from __future__ import annotations

from sqlalchemy import JSON
from sqlalchemy import Boolean
from sqlalchemy import Column
from sqlalchemy import Float
from sqlalchemy import Index
from sqlalchemy import Integer
from sqlalchemy import MetaData
from sqlalchemy import String
from sqlalchemy import Table
from sqlalchemy import Text
from sqlalchemy import text

metadata = MetaData()

# A virtual key (LiteLLM's LiteLLM_VerificationToken). Only the SHA-256 hex digest of the key
# is stored (``token``); the plaintext is shown once, when it is generated.
keys = Table(
    "proxy_keys",
    metadata,
    Column("token", String(64), primary_key=True),
    Column("key_alias", String(255), unique=True, nullable=True),
    # "sk-...abcd": the last four characters, so an operator can tell keys apart.
    Column("key_name", String(32), nullable=False),
    Column("expires", Float, nullable=True),
    Column("allowed_routes", JSON, nullable=True),
    Column("rpm_limit", Integer, nullable=True),
    Column("max_parallel_requests", Integer, nullable=True),
    Column("max_budget", Float, nullable=True),
    Column("budget_duration", String(32), nullable=True),
    Column("budget_reset_at", Float, nullable=True),
    Column("spend", Float, nullable=False, default=0.0),
    Column("metadata", JSON, nullable=True),
    Column("blocked", Boolean, nullable=False, default=False),
    # LiteLLM fields with no effect here (models, team_id, user_id, tags, tpm_limit...),
    # stored and returned as given.
    Column("extra", JSON, nullable=True),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    # /key/regenerate with grace_period: the previous key keeps working until then.
    Column("previous_token", String(64), nullable=True, index=True),
    Column("previous_expires", Float, nullable=True),
)

# One row per pass-through request (LiteLLM's LiteLLM_SpendLogs, fields of our own).
spend_logs = Table(
    "proxy_spend_logs",
    metadata,
    Column("request_id", String(64), primary_key=True),
    Column("api_key", String(64), nullable=True),
    Column("key_alias", String(255), nullable=True),
    Column("route", Text, nullable=True),
    Column("method", String(16), nullable=False),
    Column("status", Integer, nullable=False),
    Column("request_bytes", Integer, nullable=False),
    Column("response_bytes", Integer, nullable=False),
    Column("duration_ms", Float, nullable=False),
    Column("ttfb_ms", Float, nullable=True),
    Column("spend", Float, nullable=False),
    Column("start_time", Float, nullable=False),
    Column("end_time", Float, nullable=False),
    Column("upstream_error", Text, nullable=True),
    Index("ix_proxy_spend_logs_start_time", "start_time"),
    Index("ix_proxy_spend_logs_api_key_start_time", "api_key", "start_time"),
)

# Limit counters when there is no Redis (proxy_app/limiter.py DatabaseLimiter).
#
# The rpm window: one row per admission of a key with an ``rpm_limit``, counted while it was
# admitted in the last 60 s. The primary key is (token, id), and an id starts with the key's
# admission number (fixed-width hex: proxy_app/limiter.py row_id), so a key's rows are in
# admission (and time) order in the primary key: the window is read from it alone. On SQLite
# the table is WITHOUT ROWID (the rows live in the primary key's B-tree:
# https://www.sqlite.org/withoutrowid.html).
#
# Since revision 0003 the parallel slots are counted in ``proxy_slots`` and every row here has
# ``lease_expires`` 0, so the partial index below stays empty and costs an admission nothing;
# column and index are kept for an instance still running revision 0002's code during a
# rolling upgrade (it keeps its leases here).
admissions = Table(
    "proxy_admissions",
    metadata,
    Column("token", String(64), primary_key=True),
    Column("id", String(36), primary_key=True),
    Column("admitted_at", Float, nullable=False),
    Column("lease_expires", Float, nullable=False),
    # The live slots of a key: lease_expires in the future.
    Index(
        "ix_proxy_admissions_token_lease_expires",
        "token",
        "lease_expires",
        sqlite_where=text("lease_expires > 0"),
        postgresql_where=text("lease_expires > 0"),
    ),
    sqlite_with_rowid=False,
)

# The parallel slots of the database limiter: one row per key and holder (a worker process's
# limiter), holding how many of the key's requests that worker has in flight. An admission
# adds one to its own row and a release takes one off (in batches), both in place: a slot
# has no row of its own. A holder moves ``expires`` forward while it holds slots (at each
# admission, and every lease_seconds / 3 from its thread); a row past ``expires`` counts for
# nothing, so the slots of a worker killed with SIGKILL come back when its row runs out.
slots = Table(
    "proxy_slots",
    metadata,
    Column("token", String(64), primary_key=True),
    Column("holder", String(64), primary_key=True),
    Column("live", Integer, nullable=False),
    Column("expires", Float, nullable=False),
    sqlite_with_rowid=False,
)

# Change notices: a counter per kind of object ("keys", "endpoints"), bumped in the same
# transaction as the change. Every worker polls these few rows (not one per request) and
# drops what it cached when a counter moved.
changes = Table(
    "proxy_changes",
    metadata,
    Column("name", String(32), primary_key=True),
    Column("generation", Integer, nullable=False),
)

# Pass-through endpoints added through the endpoint API (proxy_app/endpoint_admin.py). ``entry``
# is the effective entry as written (proxy_app/endpoint_rules.py), its literal header values
# replaced by "<redacted>"; those values are in ``sealed``, one Fernet token
# (proxy_app/endpoint_secrets.py), never in clear.
endpoints = Table(
    "proxy_endpoints",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("path", Text, nullable=False),
    Column("entry", JSON, nullable=False),
    Column("sealed", Text, nullable=True),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
)
