"""Baseline: the schema of the last release before Alembic (coordinator/store.py at 5389d96).

On an empty database this creates the tables. On a database that release wrote (no
alembic_version table yet) it adopts the tables in place and adds the nullable columns
an even older coordinator lacked: the hand migration (`_add_missing_columns`) this
revision replaces, frozen here to that release's column list.

Revision ID: 0001
Revises:
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _tables() -> dict[str, list[sa.Column]]:
    """Fresh Column objects per call (a Column belongs to one table)."""
    key64 = sa.String(64)
    return {
        "federations": [
            sa.Column("id", key64, primary_key=True),
            sa.Column("config", sa.Text, nullable=False),
            sa.Column("status", sa.String(16), nullable=False),
            sa.Column("current_round", sa.Integer, nullable=False),
            sa.Column("model_version", sa.Integer, nullable=False),
            sa.Column("created_at", sa.Float, nullable=False),
            sa.Column("error", sa.Text),
        ],
        "agents": [
            sa.Column("id", key64, primary_key=True),
            sa.Column("name", sa.String(100), nullable=False),
            sa.Column("token_hash", key64, nullable=False, unique=True),
            sa.Column("enrolled_at", sa.Float, nullable=False),
            sa.Column("last_seen", sa.Float, nullable=False),
            sa.Column("info", sa.Text, nullable=False),
            sa.Column("revoked_at", sa.Float),
            sa.Column("memory_budget_bytes", sa.Integer),
        ],
        "rounds": [
            sa.Column("federation_id", key64, primary_key=True),
            sa.Column("round", sa.Integer, primary_key=True),
            sa.Column("status", sa.String(16), nullable=False),
            sa.Column("attempt", sa.Integer, nullable=False),
            sa.Column("base_version", sa.Integer, nullable=False),
            sa.Column("selected", sa.Text, nullable=False),
            sa.Column("opened_at", sa.Float, nullable=False),
            sa.Column("deadline", sa.Float, nullable=False),
            sa.Column("closed_at", sa.Float),
            sa.Column("metrics", sa.Text),
        ],
        "updates": [
            sa.Column("federation_id", key64, primary_key=True),
            sa.Column("round", sa.Integer, primary_key=True),
            sa.Column("agent_id", key64, primary_key=True),
            sa.Column("attempt", sa.Integer, nullable=False),
            sa.Column("received_at", sa.Float, nullable=False),
            sa.Column("num_samples", sa.Integer, nullable=False),
            sa.Column("bytes", sa.Integer, nullable=False),
            sa.Column("blob", key64, nullable=False),
            sa.Column("report", sa.Text, nullable=False),
        ],
        "declines": [
            sa.Column("federation_id", key64, primary_key=True),
            sa.Column("round", sa.Integer, primary_key=True),
            sa.Column("agent_id", key64, primary_key=True),
            sa.Column("attempt", sa.Integer, nullable=False),
            sa.Column("needed_bytes", sa.Integer),
            sa.Column("reason", sa.Text, nullable=False),
            sa.Column("declined_at", sa.Float, nullable=False),
        ],
        "models": [
            sa.Column("federation_id", key64, primary_key=True),
            sa.Column("version", sa.Integer, primary_key=True),
            sa.Column("blob", key64, nullable=False),
            sa.Column("patch_blob", key64),
            sa.Column("state_blob", key64),
            sa.Column("reshape_blob", key64),
            sa.Column("created_at", sa.Float, nullable=False),
        ],
        "downloads": [
            sa.Column("federation_id", key64, primary_key=True),
            sa.Column("round", sa.Integer, primary_key=True),
            sa.Column("bytes", sa.Integer, nullable=False),
        ],
    }


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    existing = set(inspector.get_table_names())
    for name, columns in _tables().items():
        if name not in existing:
            op.create_table(name, *columns)
            continue
        have = {c["name"] for c in inspector.get_columns(name)}
        for col in columns:
            if col.name not in have and col.nullable:
                op.add_column(name, col)


def downgrade() -> None:
    for name in reversed(list(_tables())):
        op.drop_table(name)
