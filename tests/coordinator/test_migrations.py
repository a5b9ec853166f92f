"""Alembic migrations, on SQLite and on a real PostgreSQL server (tests/pg.py).

The previous release's schema is tests/coordinator/data/schema_v0_<dialect>.sql: CREATE
TABLEs generated from coordinator/store.py as it was before Alembic (5389d96). Rows that
release would have written are inserted with plain SQL, then a Store opens the database.

Mutations these kill: a baseline that recreates (or drops) existing tables, no BIGINT
revision (2**50 budgets refused on PostgreSQL), a table change in store.py without a
revision (head != metadata), batch mode losing rows or the UNIQUE on token_hash, the
advisory lock dropped (two coordinators starting together), the pre-Alembic hand
migration of missing nullable columns lost.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from coordinator.migrations import current_revision, head_revision
from coordinator.store import AgentRow, FederationRow, RoundRow, Store, UpdateRow, metadata
from tests.pg import PostgresServer

pytestmark = pytest.mark.both_databases  # each test that takes database_url runs on both
DATA = Path(__file__).parent / "data"

# what the previous release wrote: one row or two per table, values with every kind of edge
V0_ROWS: dict[str, list[dict[str, Any]]] = {
    "federations": [{"id": "f1", "config": '{"model": "lenet5", "name": "caf\u00e9"}', "status": "running",
                     "current_round": 1, "model_version": 1, "created_at": 1764590000.123456, "error": None}],
    "agents": [{"id": "a1", "name": "agent-0", "token_hash": "h" * 64, "enrolled_at": 1764590001.5,
                "last_seen": 1764590002.25, "info": '{"platform": "pi"}', "revoked_at": None,
                "memory_budget_bytes": 2**31 - 1},
               {"id": "a2", "name": "agent-1", "token_hash": "g" * 64, "enrolled_at": 1764590001.75,
                "last_seen": 1764590001.75, "info": "{}", "revoked_at": 1764590003.0, "memory_budget_bytes": None}],
    "rounds": [{"federation_id": "f1", "round": 1, "status": "closed", "attempt": 1, "base_version": 0,
                "selected": '["a1", "a2"]', "opened_at": 10.5, "deadline": 70.5, "closed_at": 30.25,
                "metrics": '{"round": 1, "accuracy": 0.5}'},
               {"federation_id": "f1", "round": 2, "status": "open", "attempt": 2, "base_version": 1,
                "selected": '["a1"]', "opened_at": 31.0, "deadline": 91.0, "closed_at": None, "metrics": None}],
    "updates": [{"federation_id": "f1", "round": 2, "agent_id": "a1", "attempt": 2, "received_at": 32.0,
                 "num_samples": 200, "bytes": 4096, "blob": "b" * 64, "report": '{"num_samples": 200}'}],
    "declines": [{"federation_id": "f1", "round": 2, "agent_id": "a2", "attempt": 2, "needed_bytes": 10**9,
                  "reason": "budget fits no level", "declined_at": 33.0}],
    "models": [{"federation_id": "f1", "version": 0, "blob": "0" * 64, "patch_blob": None, "state_blob": None,
                "reshape_blob": None, "created_at": 1.0},
               {"federation_id": "f1", "version": 1, "blob": "1" * 64, "patch_blob": "p" * 64,
                "state_blob": "s" * 64, "reshape_blob": None, "created_at": 2.0}],
    "downloads": [{"federation_id": "f1", "round": 1, "bytes": 123456}],
}


def _url(database_url: str | None, tmp_path: Path) -> str:
    return database_url or f"sqlite:///{tmp_path / 'coordinator.db'}"


def _load_v0(url: str) -> None:
    """The previous release's database: its schema dump, then its rows."""
    engine = sa.create_engine(url)
    dump = (DATA / f"schema_v0_{engine.dialect.name}.sql").read_text()
    statements = [s for s in (_strip_comments(part) for part in dump.split(";")) if s]
    with engine.begin() as conn:
        for statement in statements:
            conn.exec_driver_sql(statement)
        for table, rows in V0_ROWS.items():
            columns = ", ".join(rows[0])
            conn.execute(sa.text(f"INSERT INTO {table} ({columns}) VALUES ({', '.join(':' + c for c in rows[0])})"),
                         rows)
    engine.dispose()


def _strip_comments(sql: str) -> str:
    return "\n".join(line for line in sql.splitlines() if not line.lstrip().startswith("--")).strip()


def _schema_diff(engine: sa.Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(compare_metadata(MigrationContext.configure(conn), metadata))


def test_a_fresh_database_is_migrated_to_the_store_tables(tmp_path: Path, database_url: str | None) -> None:
    store = Store(_url(database_url, tmp_path), tmp_path / "blobs")
    try:
        assert current_revision(store.engine) == head_revision() == "0004"
        assert _schema_diff(store.engine) == []  # the migrations build exactly store.metadata
    finally:
        store.close()


def test_upgrade_from_the_previous_release_keeps_every_row(tmp_path: Path, database_url: str | None) -> None:
    # Arrange: the previous release's schema and data, no alembic_version table
    url = _url(database_url, tmp_path)
    _load_v0(url)

    # Act
    store = Store(url, tmp_path / "blobs")
    try:
        # Assert: at head, the schema is today's, every row reads back as written
        assert current_revision(store.engine) == "0004" and _schema_diff(store.engine) == []
        with store.tx() as conn:
            assert store.list_federations(conn) == [FederationRow("f1", {"model": "lenet5", "name": "caf\u00e9"},
                                                                  "running", 1, 1, 1764590000.123456, None)]
            assert store.list_agents(conn) == [
                AgentRow("a1", "agent-0", "h" * 64, 1764590001.5, 1764590002.25, {"platform": "pi"}, None, 2**31 - 1),
                AgentRow("a2", "agent-1", "g" * 64, 1764590001.75, 1764590001.75, {}, 1764590003.0, None)]
            assert store.list_rounds(conn, "f1") == [
                RoundRow("f1", 1, "closed", 1, 0, ["a1", "a2"], 10.5, 70.5, 30.25, {"round": 1, "accuracy": 0.5}),
                RoundRow("f1", 2, "open", 2, 1, ["a1"], 31.0, 91.0, None, None)]
            assert store.list_updates(conn, "f1", 2, 2) == [UpdateRow("a1", 2, 200, 4096, "b" * 64, {"num_samples": 200})]
            assert store.needs_by_agent(conn) == {"a2": {"f1": 10**9}}
            assert store.get_model(conn, "f1", 1) == {**V0_ROWS["models"][1], "mask_blob": None,
                                                          "mask_patch_blob": None}  # 0004: no mask
            assert store.download_bytes(conn, "f1", 1) == 123456
        # what the old schema refused on PostgreSQL (INTEGER): budgets and byte counts past 2**31
        with store.tx() as conn:
            store.set_budgets(conn, {"a1": 2**50})
            store.add_download_bytes(conn, "f1", 1, 2**32)
        with store.tx() as conn:
            assert store.get_agent(conn, "a1").memory_budget_bytes == 2**50  # type: ignore[union-attr]
            assert store.download_bytes(conn, "f1", 1) == 2**32 + 123456
            with pytest.raises(sa.exc.IntegrityError), conn.begin_nested():  # batch mode kept the UNIQUE
                store.add_agent(conn, AgentRow("a3", "x", "h" * 64, 0.0, 0.0, {}))
    finally:
        store.close()
    # opening again runs nothing (and changes nothing)
    again = Store(url, tmp_path / "blobs")
    with again.tx() as conn:
        assert len(again.list_agents(conn)) == 2
    again.close()


def test_an_older_database_gets_its_missing_columns_and_tables(tmp_path: Path, database_url: str | None) -> None:
    """Before 5389d96 some nullable columns and whole tables did not exist yet; the hand
    migration added them at start, and revision 0001 does so now."""
    url = _url(database_url, tmp_path)
    old = sa.MetaData()
    sa.Table("federations", old, *(sa.Column(c.name, c.type, primary_key=c.primary_key, nullable=c.nullable)
                                   for c in metadata.tables["federations"].columns if c.name != "error"))
    sa.Table("agents", old, *(sa.Column(c.name, sa.Integer if c.name == "memory_budget_bytes" else c.type,
                                        primary_key=c.primary_key, nullable=c.nullable, unique=c.unique)
                              for c in metadata.tables["agents"].columns if c.name not in ("revoked_at",)))
    engine = sa.create_engine(url)
    old.create_all(engine)
    with engine.begin() as conn:
        conn.execute(old.tables["federations"].insert(), [{k: v for k, v in V0_ROWS["federations"][0].items()
                                                           if k != "error"}])
    engine.dispose()

    store = Store(url, tmp_path / "blobs")
    try:
        assert _schema_diff(store.engine) == []
        with store.tx() as conn:
            assert store.get_federation(conn, "f1").error is None  # type: ignore[union-attr]
            assert store.list_declines(conn, "f1") == [] and store.download_bytes(conn, "f1", 1) == 0
    finally:
        store.close()


def test_coordinators_starting_together_migrate_once(tmp_path: Path, postgres_server: PostgresServer) -> None:
    """Four coordinator processes open one empty PostgreSQL database at the same moment
    (replicas starting together): none fails. (One SQLite file has one coordinator.)"""
    url = postgres_server.create_database()
    # each waits for the same wall-clock instant, then opens its Store (Alembic runs)
    at = time.time() + 2.0
    code = ("import sys, time; from pathlib import Path; from coordinator.store import Store; "
            "time.sleep(max(0.0, float(sys.argv[2]) - time.time())); Store(sys.argv[1], Path(sys.argv[3])).close()")
    procs = [subprocess.Popen([sys.executable, "-c", code, url, str(at), str(tmp_path / f"blobs{i}")],
                              stderr=subprocess.PIPE, text=True) for i in range(4)]
    failures = [err[-800:] for p in procs for _, err in [p.communicate(timeout=60)] if p.returncode != 0]
    assert failures == []
    engine = sa.create_engine(url)
    assert current_revision(engine) == "0004" and _schema_diff(engine) == []
    engine.dispose()
    postgres_server.drop_database(url)
