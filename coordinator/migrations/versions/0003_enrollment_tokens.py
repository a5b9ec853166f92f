"""One-time enrollment tokens (issue 12): issued by the operator, each spent by one enrollment.

A new table only: existing rows are untouched, so the upgrade is the same on SQLite and
PostgreSQL. The secret itself is never stored, only its sha256 (like agent tokens).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
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
        "enrollment_tokens",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
        sa.Column("used_at", sa.Float),
        sa.Column("agent_id", sa.String(64)),
        sa.Column("revoked_at", sa.Float),
    )


def downgrade() -> None:
    op.drop_table("enrollment_tokens")
