"""Real processes over real HTTP: a uvicorn coordinator and agent processes on loopback.

One federation runs three rounds; the coordinator is SIGKILLed after round 1 and
restarted on the same SQLite file, and the agents reconnect by themselves.
"""

from __future__ import annotations

import signal
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import Cluster


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    c.start_coordinator()
    yield c
    c.stop()


def test_federation_over_http_survives_a_coordinator_kill(cluster: Cluster) -> None:
    # Arrange: a 3-round federation and two agent processes
    resp = cluster.http.post("/v1/federations", json={
        "model": "fedavg_cnn", "rounds": 3, "clients_per_round": 2, "min_clients": 2, "round_deadline_s": 120,
        "data": {"dataset": "synthetic"}, "training": {"batch_size": 32, "lr": 0.02, "local_epochs": 1},
    })
    assert resp.status_code == 201, resp.text
    fid = resp.json()["id"]
    for i in range(2):
        cluster.start_agent(i, 2)
    cluster.wait(lambda: len(cluster.http.get("/v1/agents").json()) == 2, "enrollment")
    assert cluster.http.post(f"/v1/federations/{fid}/start").status_code == 200

    # Act: kill -9 the coordinator once round 1 is closed, restart it on the same files
    cluster.wait(lambda: cluster.http.get(f"/v1/federations/{fid}").json()["current_round"] >= 1, "round 1")
    round1_before = cluster.http.get(f"/v1/federations/{fid}/rounds").json()[0]
    assert cluster.coordinator is not None
    cluster.coordinator.send_signal(signal.SIGKILL)
    cluster.coordinator.wait(10)
    cluster.start_coordinator()
    cluster.wait(lambda: cluster.http.get(f"/v1/federations/{fid}").json()["status"] == "completed", "completion", 240)

    # Assert: every round persisted, round 1 unchanged, learning happened, bytes counted
    rows = cluster.http.get(f"/v1/federations/{fid}/rounds").json()
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert rows[0] == round1_before
    assert rows[-1]["loss"] < rows[0]["loss"] and rows[-1]["accuracy"] >= max(rows[0]["accuracy"], 0.5), rows
    assert all(r["participants"] == 2 and r["bytes_up"] > 0 for r in rows)
    # round 1: agents rebuilt the seeded initial model (sha256-checked); later: patches
    # (download bytes are counted in memory and written once per tick, so the SIGKILL right
    # after round 1 may take round 2's count with it — by design, docs/RELIABILITY.md;
    # round 3, after the restart, must be counted)
    assert rows[0]["bytes_down"] == 0 and rows[2]["bytes_down"] > 0, rows
    with sqlite3.connect(cluster.root / "coord" / "coordinator.db") as db:
        closed = db.execute("SELECT round FROM rounds WHERE federation_id=? AND status='closed' ORDER BY round",
                            (fid,)).fetchall()
        versions = db.execute("SELECT COUNT(*) FROM models WHERE federation_id=?", (fid,)).fetchone()[0]
    assert [r[0] for r in closed] == [1, 2, 3] and versions == 4
    # the agents did the work as separate OS processes, each seen by the coordinator
    agents = cluster.http.get("/v1/agents").json()
    assert {a["name"] for a in agents} == {"agent-0", "agent-1"}
