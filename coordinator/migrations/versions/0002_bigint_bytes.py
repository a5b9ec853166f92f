"""Byte counts and memory budgets as BIGINT.

PostgreSQL's INTEGER is 32-bit: an agent may state a budget up to 2**50 bytes and one
round's downloads pass 2 GiB at 200 agents x 10 MB, both of which the baseline refused
there (NumericValueOutOfRange -> 503). SQLite stores 64-bit integers either way; its
tables are rebuilt by batch mode so the declared types match the metadata too.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# table -> (column, nullable)
_COLUMNS = {
    "agents": [("memory_budget_bytes", True)],
    "updates": [("bytes", False)],
    "declines": [("needed_bytes", True)],
    "downloads": [("bytes", False)],
}


def _retype(old: type[sa.types.TypeEngine], new: type[sa.types.TypeEngine]) -> None:
    for table, columns in _COLUMNS.items():
        with op.batch_alter_table(table) as batch:
            for name, nullable in columns:
                batch.alter_column(name, type_=new(), existing_type=old(), existing_nullable=nullable)


def upgrade() -> None:
    _retype(sa.Integer, sa.BigInteger)


def downgrade() -> None:
    _retype(sa.BigInteger, sa.Integer)
