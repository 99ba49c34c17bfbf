"""The database limiter's parallel slots as counters per key and worker.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03

``proxy_admissions`` keeps its column and partial index (see proxy_app/schema.py), so an
instance still running the previous version during a rolling upgrade keeps working; the two
versions share the rpm window but count parallel slots apart until every instance runs this one.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "proxy_slots",
        sa.Column("token", sa.String(64), nullable=False),
        sa.Column("holder", sa.String(64), nullable=False),
        sa.Column("live", sa.Integer(), nullable=False),
        sa.Column("expires", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("token", "holder"),
        sqlite_with_rowid=False,
    )


def downgrade() -> None:
    op.drop_table("proxy_slots")
