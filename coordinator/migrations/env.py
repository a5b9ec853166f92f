"""Alembic's environment: migrate on the connection `coordinator.migrations` passes in
(`config.attributes["connection"]`); there is no URL or alembic.ini to read."""

from __future__ import annotations

from alembic import context
from sqlalchemy import text

# pg_advisory_xact_lock key ("fedslim" in ASCII): two coordinators opening one PostgreSQL
# database at the same moment would otherwise both see "no tables" and the second would
# fail on CREATE TABLE; with the lock the second waits, then finds the schema at head.
_LOCK_KEY = 0x66656473_6C696D

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through coordinator.migrations.upgrade(engine), not the alembic CLI")

# render_as_batch: ALTER on SQLite goes through Alembic's copy-and-move (SQLite cannot
# alter a column's type in place)
context.configure(connection=connection, render_as_batch=True)
with context.begin_transaction():
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK_KEY})
    context.run_migrations()
