"""The Store behaves the same on SQLite and on a real PostgreSQL server (tests/pg.py):
every row type round-trips exactly, upserts and accumulating counters, transactions,
constraints. The SQLite run is the reference the PostgreSQL run must match.

Mutations these kill: 32-bit columns for budgets/byte counts (PostgreSQL refuses 2**50),
single-precision floats (timestamps lose their sub-second part), an autocommit engine (a
failed transaction leaves half its rows), the UNIQUE on token_hash lost, put_round
inserting twice, a decline of an earlier attempt kept beside the new one, a bare
postgresql:// URL left to psycopg2, no pre-ping (a restarted PostgreSQL answered with
dead pooled connections), a database outage that is not a 503.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from coordinator.store import AgentRow, FederationRow, RoundRow, Store, UpdateRow, engine_url

NOW = 1764590000.123456  # a time.time() with microseconds: double precision keeps them


@pytest.fixture
def store(tmp_path: Path, database_url: str | None) -> Iterator[Store]:
    s = Store(database_url or f"sqlite:///{tmp_path / 'c.db'}", tmp_path / "blobs")
    yield s
    s.close()


@pytest.mark.both_databases
def test_every_row_type_round_trips_exactly(store: Store) -> None:
    fed = FederationRow("f1", {"name": "caf\u00e9 \u2603", "rounds": 3, "nested": {"x": [1.5, None]}}, "created", 0, 0, NOW)
    agent = AgentRow("a1", "agent-0", "h" * 64, NOW, NOW + 0.5, {"platform": "jetson"}, None, 2**50)
    with store.tx() as conn:
        store.add_federation(conn, fed)
        store.add_agent(conn, agent)
        store.put_round(conn, RoundRow("f1", 1, "open", 1, 0, ["a1"], NOW, NOW + 60, None, None))
        store.add_update(conn, "f1", 1, UpdateRow("a1", 1, 10**9, 2**40, "b" * 64, {"num_samples": 10**9}))
        store.add_decline(conn, "f1", 1, "a1", 1, 2**45, "too small")
        store.add_model(conn, "f1", 0, "0" * 64, None, None)
        store.add_download_bytes(conn, "f1", 1, 2**31 - 1)
    with store.tx() as conn:  # a second transaction: what was committed, not what is cached
        store.put_round(conn, RoundRow("f1", 1, "closed", 1, 0, ["a1"], NOW, NOW + 60, NOW + 1, {"loss": 0.25}))
        store.add_decline(conn, "f1", 1, "a1", 2, None, "retry attempt")  # replaces attempt 1's
        store.add_download_bytes(conn, "f1", 1, 2**31 - 1)  # past 2**31 in all
        store.update_federation(conn, "f1", status="running", current_round=1, error="retrying: x")
        store.touch_agents(conn, {"a1": NOW + 2})
    with store.tx() as conn:
        assert store.get_federation(conn, "f1") == FederationRow(fed.id, fed.config, "running", 1, 0, NOW, "retrying: x")
        assert store.list_agents(conn) == [AgentRow("a1", "agent-0", "h" * 64, NOW, NOW + 2, {"platform": "jetson"},
                                                    None, 2**50)]
        assert store.list_rounds(conn, "f1") == [RoundRow("f1", 1, "closed", 1, 0, ["a1"], NOW, NOW + 60, NOW + 1,
                                                          {"loss": 0.25})]
        assert store.list_updates(conn, "f1", 1, 1) == [UpdateRow("a1", 1, 10**9, 2**40, "b" * 64,
                                                                  {"num_samples": 10**9})]
        [decline] = store.list_declines(conn, "f1")
        assert (decline["attempt"], decline["needed_bytes"], decline["reason"]) == (2, None, "retry attempt")
        assert store.download_bytes(conn, "f1", 1) == 2 * (2**31 - 1)
        assert store.count_agents(conn) == 1 and store.count_online(conn, NOW + 1) == 1
        assert store.count_online(conn, NOW + 3) == 0


@pytest.mark.both_databases
def test_a_failed_transaction_leaves_nothing(store: Store) -> None:
    with pytest.raises(RuntimeError), store.tx() as conn:
        store.add_federation(conn, FederationRow("f1", {}, "created", 0, 0, NOW))
        store.add_model(conn, "f1", 0, "0" * 64, None, None)
        raise RuntimeError("crash between the two writes and the commit")
    with store.tx() as conn:
        assert store.list_federations(conn) == [] and store.get_model(conn, "f1", 0) is None


@pytest.mark.both_databases
def test_an_agent_token_hash_is_unique(store: Store) -> None:
    with store.tx() as conn:
        store.add_agent(conn, AgentRow("a1", "x", "h" * 64, NOW, NOW, {}))
    with pytest.raises(sa.exc.IntegrityError), store.tx() as conn:
        store.add_agent(conn, AgentRow("a2", "y", "h" * 64, NOW, NOW, {}))
    with store.tx() as conn:
        assert [a.id for a in store.list_agents(conn)] == ["a1"]


@pytest.mark.parametrize(
    ("given", "want"),
    [
        ("postgresql://u:p@db:5432/fed", "postgresql+psycopg://u:p@db:5432/fed"),  # bare: psycopg 3, not psycopg2
        ("postgres://u:p@db/fed", "postgresql+psycopg://u:p@db/fed"),  # the scheme many hosts hand out
        ("postgresql+psycopg://u:p%40ss@db/fed", "postgresql+psycopg://u:p%40ss@db/fed"),  # kept, escapes intact
        ("sqlite:///data/coordinator.db", "sqlite:///data/coordinator.db"),  # untouched
    ],
)
def test_engine_url_points_postgresql_at_psycopg(given: str, want: str) -> None:
    assert engine_url(given) == want


def test_a_restarted_postgresql_is_a_503_while_down_and_no_error_after(tmp_path: Path) -> None:
    """The database restarts under a running coordinator: requests that need it get 503 +
    Retry-After while it is down, and the first request after it is back succeeds (the
    pool pings a connection on checkout instead of handing out a dead one). Its own
    server: the session's must not go down under other tests."""
    from fastapi.testclient import TestClient

    from coordinator.app import create_app
    from coordinator.settings import CoordinatorSettings
    from tests.helpers import ADMIN
    from tests.pg import availability, launch

    bindir, run_as, why = availability()
    if why is not None or bindir is None:
        pytest.skip(f"PostgreSQL unavailable: {why}")
    server = launch(bindir, run_as)
    try:
        # no scheduler tick during the test (it would meet the dead connections first)
        settings = CoordinatorSettings(data_dir=tmp_path / "c", database_url=server.create_database(), dev_mode=True,
                                       tick_s=600)
        with TestClient(create_app(settings)) as c:
            assert c.get("/v1/federations", headers=ADMIN).status_code == 200  # a pooled connection exists now
            server.pause()
            server.resume()  # that connection is dead, the pool does not know yet
            assert [c.get("/v1/federations", headers=ADMIN).status_code for _ in range(3)] == [200] * 3
            server.pause()
            down = c.get("/v1/federations", headers=ADMIN)
            assert down.status_code == 503 and down.headers["retry-after"] == "5", down.text
            server.resume()
            assert c.get("/v1/federations", headers=ADMIN).status_code == 200
    finally:
        server.stop()
