"""The first tables: virtual keys, spend logs, limiter admissions, change counters.

Revision ID: 0001
Revises:
Create Date: 2025-12-03

Written out in full rather than made by ``metadata.create_all``: a migration must keep creating
the tables as they were at this revision after proxy_app/schema.py moves on.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "proxy_keys",
        sa.Column("token", sa.String(64), nullable=False),
        sa.Column("key_alias", sa.String(255), nullable=True),
        sa.Column("key_name", sa.String(32), nullable=False),
        sa.Column("expires", sa.Float(), nullable=True),
        sa.Column("allowed_routes", sa.JSON(), nullable=True),
        sa.Column("rpm_limit", sa.Integer(), nullable=True),
        sa.Column("max_parallel_requests", sa.Integer(), nullable=True),
        sa.Column("max_budget", sa.Float(), nullable=True),
        sa.Column("budget_duration", sa.String(32), nullable=True),
        sa.Column("budget_reset_at", sa.Float(), nullable=True),
        sa.Column("spend", sa.Float(), nullable=False),
        sa.Column("metadata", sa.JSON(), nullable=True),
        sa.Column("blocked", sa.Boolean(), nullable=False),
        sa.Column("extra", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.Column("previous_token", sa.String(64), nullable=True),
        sa.Column("previous_expires", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("token"),
        # Named, so a later batch migration on SQLite can find and change it.
        sa.UniqueConstraint("key_alias", name="uq_proxy_keys_key_alias"),
    )
    op.create_index("ix_proxy_keys_previous_token", "proxy_keys", ["previous_token"])

    op.create_table(
        "proxy_spend_logs",
        sa.Column("request_id", sa.String(64), nullable=False),
        sa.Column("api_key", sa.String(64), nullable=True),
        sa.Column("key_alias", sa.String(255), nullable=True),
        sa.Column("route", sa.Text(), nullable=True),
        sa.Column("method", sa.String(16), nullable=False),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("request_bytes", sa.Integer(), nullable=False),
        sa.Column("response_bytes", sa.Integer(), nullable=False),
        sa.Column("duration_ms", sa.Float(), nullable=False),
        sa.Column("ttfb_ms", sa.Float(), nullable=True),
        sa.Column("spend", sa.Float(), nullable=False),
        sa.Column("start_time", sa.Float(), nullable=False),
        sa.Column("end_time", sa.Float(), nullable=False),
        sa.Column("upstream_error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("request_id"),
    )
    op.create_index("ix_proxy_spend_logs_start_time", "proxy_spend_logs", ["start_time"])
    op.create_index("ix_proxy_spend_logs_api_key_start_time", "proxy_spend_logs", ["api_key", "start_time"])

    op.create_table(
        "proxy_admissions",
        sa.Column("token", sa.String(64), nullable=False),
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("admitted_at", sa.Float(), nullable=False),
        sa.Column("lease_expires", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("token", "id"),
        sqlite_with_rowid=False,
    )
    op.create_index(
        "ix_proxy_admissions_token_lease_expires",
        "proxy_admissions",
        ["token", "lease_expires"],
        sqlite_where=sa.text("lease_expires > 0"),
        postgresql_where=sa.text("lease_expires > 0"),
    )

    op.create_table(
        "proxy_changes",
        sa.Column("name", sa.String(32), nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )


def downgrade() -> None:
    op.drop_table("proxy_changes")
    op.drop_index("ix_proxy_admissions_token_lease_expires", table_name="proxy_admissions")
    op.drop_table("proxy_admissions")
    op.drop_index("ix_proxy_spend_logs_api_key_start_time", table_name="proxy_spend_logs")
    op.drop_index("ix_proxy_spend_logs_start_time", table_name="proxy_spend_logs")
    op.drop_table("proxy_spend_logs")
    op.drop_index("ix_proxy_keys_previous_token", table_name="proxy_keys")
    op.drop_table("proxy_keys")
