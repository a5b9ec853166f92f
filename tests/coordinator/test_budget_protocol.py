"""Budgets in the protocol (issue 11, first part): an agent states its training memory
budget at enrollment and may restate it on any poll; the coordinator shows the latest and
records, per agent and round, budget, planned and measured peak.

Mutations killed: ignoring the poll's restatement, recording the enrollment budget
instead of the one in force at upload, losing the restated budget across a restart."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from coordinator.app import create_app
from coordinator.settings import CoordinatorSettings
from sparse_kernels import decode
from tests.coordinator.test_aggregation_oracle import _encode, _put, _random_delta, _wait_version
from tests.federation_fixtures import small_federation
from tests.helpers import ADMIN


def test_budget_restated_on_poll_is_shown_and_recorded_per_round(tmp_path: Path) -> None:
    settings = CoordinatorSettings(data_dir=tmp_path / "c", dev_mode=True, tick_s=0.05, long_poll_s=2)
    with TestClient(create_app(settings)) as c:
        r = c.post("/v1/agents/enroll", json={"enrollment_token": "dev-enroll-token", "memory_budget_bytes": 64 << 20})
        auth = {"Authorization": f"Bearer {r.json()['agent_token']}"}
        fid = c.post("/v1/federations", json=small_federation(rounds=1, clients_per_round=1, min_clients=1),
                     headers=ADMIN).json()["id"]
        c.post(f"/v1/federations/{fid}/start", headers=ADMIN)
        assert c.get("/v1/agents", headers=ADMIN).json()[0]["memory_budget_bytes"] == 64 << 20

        task = c.get("/v1/tasks", params={"wait": 2, "memory_budget_bytes": 24 << 20}, headers=auth)
        assert task.status_code == 200  # under memory pressure: 24 MiB from now on
        assert c.get("/v1/agents", headers=ADMIN).json()[0]["memory_budget_bytes"] == 24 << 20
        bad = c.get("/v1/tasks", params={"wait": 0, "memory_budget_bytes": -5}, headers=auth)
        assert bad.status_code == 422

        base = decode(c.get(f"/v1/federations/{fid}/models/0", headers=ADMIN).content).to_dense()
        assert _put(c, auth, fid, 1, _encode(fid, 1, 0, _random_delta(base, 0), 10), 10) == 200
        _wait_version(c, fid, 1, ADMIN)
        (row,) = c.get(f"/v1/federations/{fid}/rounds", headers=ADMIN).json()
        assert [a["budget_bytes"] for a in row["agents"]] == [24 << 20]
        assert set(row["agents"][0]) >= {"agent", "budget_bytes", "planned_bytes", "peak_bytes"}
    with TestClient(create_app(settings)) as c:  # durable: written at the next tick
        assert c.get("/v1/agents", headers=ADMIN).json()[0]["memory_budget_bytes"] == 24 << 20
