"""Mask artifacts (issue 13): each model version may name its strategy's keep-masks.

Two nullable columns on `models`: the sha256 of the version's mask artifact
(`sparse_kernels.masks`) and of its mask patch from version-1 (the flipped positions),
NULL for strategies without masks and for every version written before this revision.
Batch mode, so SQLite gets the same table as PostgreSQL.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("models") as batch:
        batch.add_column(sa.Column("mask_blob", sa.String(64)))
        batch.add_column(sa.Column("mask_patch_blob", sa.String(64)))


def downgrade() -> None:
    with op.batch_alter_table("models") as batch:
        batch.drop_column("mask_patch_blob")
        batch.drop_column("mask_blob")
