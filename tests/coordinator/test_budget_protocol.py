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


def test_a_declining_agent_releases_the_round_and_is_not_resampled_until_its_budget_fits(tmp_path: Path) -> None:
    """Agent A's budget fits nothing: it declines with the bytes it needs. The round closes
    on B's update at once (not at the 600 s deadline); A is left out of the next round; once
    A restates a budget that large it is sampled again. Mutations killed: a decline that
    does not count as an answer, a decline that forgets its needed bytes, exclusion that
    ignores a raised budget."""
    settings = CoordinatorSettings(data_dir=tmp_path / "c", dev_mode=True, tick_s=0.05, long_poll_s=2)
    with TestClient(create_app(settings)) as c:
        auths = []
        for budget in (16 << 20, 1 << 30):
            r = c.post("/v1/agents/enroll", json={"enrollment_token": "dev-enroll-token", "memory_budget_bytes": budget})
            auths.append({"Authorization": f"Bearer {r.json()['agent_token']}"})
        a, b = auths
        cfg = small_federation(rounds=3, clients_per_round=2, min_clients=1, round_deadline_s=600)
        fid = c.post("/v1/federations", json=cfg, headers=ADMIN).json()["id"]
        c.post(f"/v1/federations/{fid}/start", headers=ADMIN)
        base = decode(c.get(f"/v1/federations/{fid}/models/0", headers=ADMIN).content).to_dense()
        for auth in auths:
            assert c.get("/v1/tasks", params={"wait": 2}, headers=auth).status_code == 200

        r = c.post(f"/v1/federations/{fid}/rounds/1/decline", headers=a,
                   json={"reason": "needs 50 MiB at batch 4", "needed_bytes": 50 << 20})
        assert r.status_code == 200 and r.json()["recorded"]
        assert c.get("/v1/tasks", params={"wait": 0}, headers=a).status_code == 204  # not handed back
        assert _put(c, b, fid, 1, _encode(fid, 1, 0, _random_delta(base, 1), 10), 10) == 200
        _wait_version(c, fid, 1, ADMIN, timeout=10)  # closed on the answers, not the deadline
        row = c.get(f"/v1/federations/{fid}/rounds", headers=ADMIN).json()[0]
        assert (row["participants"], row["stragglers"]) == (1, 0)
        assert row["declined"] == [{"agent": row["declined"][0]["agent"], "needed_bytes": 50 << 20}]
        agents = {x["memory_budget_bytes"]: x for x in c.get("/v1/agents", headers=ADMIN).json()}
        assert agents[16 << 20]["needs_bytes"] == {fid: 50 << 20}

        svc = c.app.state.service  # type: ignore[attr-defined]
        _wait_task_for(c, b)
        with svc.store.tx() as conn:
            assert len(svc.store.get_round(conn, fid, 2).selected) == 1  # A left out
        assert c.get("/v1/tasks", params={"wait": 0, "memory_budget_bytes": 64 << 20}, headers=a).status_code == 204
        v1 = decode(c.get(f"/v1/federations/{fid}/models/1", headers=ADMIN).content)
        assert _put(c, b, fid, 2, _encode(fid, 2, 1, _random_delta(v1.to_dense(), 2), 10), 10) == 200
        _wait_version(c, fid, 2, ADMIN, timeout=10)
        _wait_task_for(c, a)  # with 64 MiB stated, A is sampled for round 3
        with svc.store.tx() as conn:
            assert len(svc.store.get_round(conn, fid, 3).selected) == 2


def _wait_task_for(c: TestClient, auth: dict[str, str]) -> None:
    for _ in range(20):
        if c.get("/v1/tasks", params={"wait": 1}, headers=auth).status_code == 200:
            return
    raise AssertionError("no task")


def test_an_edge_agent_that_cannot_fit_declines_instead_of_stalling_the_round(
        coordinator: TestClient, make_agent, start_federation) -> None:  # type: ignore[no-untyped-def]
    """The real agent loop: a 64 KiB budget fits no plan (BudgetExceeded); the agent tells
    the coordinator, which closes the round on the other agent's update."""
    small, ok = make_agent(0), make_agent(1)
    small.memory_budget_bytes = 64 << 10
    fid = start_federation(rounds=1, clients_per_round=2, min_clients=1, round_deadline_s=600)
    import threading

    workers = [threading.Thread(target=ag.run, kwargs={"max_tasks": 1, "idle_exit_s": 8, "poll_s": 1})
               for ag in (small, ok)]
    for w in workers:
        w.start()
    _wait_version(coordinator, fid, 1, ADMIN, timeout=30)
    for w in workers:
        w.join(30)
    row = coordinator.get(f"/v1/federations/{fid}/rounds", headers=ADMIN).json()[0]
    assert row["participants"] == 1 and len(row["declined"]) == 1
    assert row["declined"][0]["needed_bytes"] > 64 << 10
