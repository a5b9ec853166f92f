"""Width levels through the real API, codec and store: each sampled agent is given the
widest level whose estimated need fits the budget it stated, uploads a delta on its
slice, and the new global model equals a numpy reference in which every coordinate is the
weighted mean over the agents whose slice covers it — also across a restart of the
coordinator mid-round. Mutations these kill: dividing by the round's total weight
instead of the covering weight; folding a slice at the wrong global positions; taking the
narrowest or the widest level whatever the budget; accepting a full-shape upload that
claims a narrow level; forgetting the level of stored updates on a restart."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from coordinator.app import create_app
from coordinator.levels import plan_levels
from coordinator.protocol import NEEDS_HEADER, REPORT_HEADER, FederationCreate
from coordinator.settings import CoordinatorSettings
from models.state import seeded_weights
from sparse_kernels import DeltaMeta, ModelDelta, SparseTensor, decode, encode
from sparse_kernels.reshape import apply_reshape, from_runs, kept_axes
from tests.federation_fixtures import small_federation
from tests.helpers import ADMIN

Weights = dict[str, np.ndarray]
LEVELS = {"widths": [1.0, 0.5, 0.25]}


def _client(root: Path) -> TestClient:
    return TestClient(create_app(CoordinatorSettings(data_dir=root, dev_mode=True, tick_s=0.05, long_poll_s=2)))


def _enroll(http: TestClient, budget: int | None) -> dict[str, str]:
    body: dict[str, Any] = {"enrollment_token": "dev-enroll-token", "name": "lv"}
    if budget is not None:
        body["memory_budget_bytes"] = budget
    r = http.post("/v1/agents/enroll", json=body)
    assert r.status_code == 201, r.text
    return {"Authorization": f"Bearer {r.json()['agent_token']}"}


def _task(http: TestClient, auth: dict[str, str]) -> dict[str, Any]:
    for _ in range(30):
        r = http.get("/v1/tasks", params={"wait": 1}, headers=auth)
        if r.status_code == 200:
            return dict(r.json())
    raise AssertionError("no task")


def _reshape(level: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> dict[str, list[list[int] | None]]:
    return {n: [None if runs is None else from_runs(runs, size) for runs, size in zip(dims, shapes[n], strict=True)]
            for n, dims in level["slices"].items()}


def _put(http: TestClient, auth: dict[str, str], fid: str, delta: Weights, samples: int, level: int | None) -> int:
    meta = DeltaMeta(federation_id=fid, round=1, base_version=0, num_samples=samples, kind="delta")
    body = encode(ModelDelta(meta, tuple(SparseTensor.from_dense_nonzero(k, v) for k, v in delta.items())),
                  values="fp32")
    report = {"num_samples": samples, "train_loss": 0.5, "train_accuracy": 0.5, "train_seconds": 1, "level": level}
    r = http.put(f"/v1/federations/{fid}/rounds/1/update", content=body,
                 headers={**auth, REPORT_HEADER: json.dumps(report)})
    return int(r.status_code)


def _model(http: TestClient, fid: str, version: int) -> Weights:
    r = http.get(f"/v1/federations/{fid}/models/{version}", headers=ADMIN)
    assert r.status_code == 200, r.text
    return decode(r.content, max_bytes=1 << 30).to_dense()


def _wait_version(http: TestClient, fid: str, version: int) -> None:
    for _ in range(600):
        if http.get(f"/v1/federations/{fid}", headers=ADMIN).json()["model_version"] >= version:
            return
        time.sleep(0.05)
    raise AssertionError("round did not close")


def _oracle(base: Weights, uploads: list[tuple[Weights, dict[str, Any], float]]) -> Weights:
    """Per coordinate: Σ w·Δ over covering agents / Σ w over covering agents (float64)."""
    out = {}
    for name, v in base.items():
        num, den = np.zeros(v.shape), np.zeros(v.shape)
        for delta, reshape, w in uploads:
            idx = np.ix_(*kept_axes(reshape, name, v.shape))
            num[idx] += w * delta[name].astype(np.float64)
            den[idx] += w
        out[name] = v + np.divide(num, den, out=np.zeros_like(num), where=den > 0)
    return out


@pytest.mark.parametrize("restart", [False, True], ids=["live", "restart-mid-round"])
def test_levels_follow_budgets_and_the_mean_is_over_the_agents_that_trained_each_coordinate(
        tmp_path: Path, restart: bool) -> None:
    root = tmp_path / "coord"
    cfg = small_federation(rounds=1, clients_per_round=4, min_clients=3, levels=LEVELS)
    levels = plan_levels(FederationCreate.model_validate(cfg), seeded_weights("lenet5", 0, in_channels=1,
                                                                              num_classes=10), 1)
    needs = [p.need_bytes for p in levels]
    assert needs[0] > needs[1] > needs[2]
    # budgets: none, exactly level 1's need, between level 2's and level 1's, below level 2's
    budgets = [None, needs[1], (needs[1] + needs[2]) // 2, needs[2] - 1]
    http = _client(root).__enter__()
    closed = False
    try:
        agents = [_enroll(http, b) for b in budgets]
        fid = http.post("/v1/federations", json=cfg, headers=ADMIN).json()["id"]
        http.post(f"/v1/federations/{fid}/start", headers=ADMIN)
        tasks = [_task(http, a) for a in agents[:3]]
        assert [t["level"] for t in tasks] == [0, 1, 2]  # the widest level each budget fits
        assert [lv["need_bytes"] for lv in tasks[0]["levels"]] == needs
        # the fourth fits no level: its polls say what the smallest level needs
        r = http.get("/v1/tasks", params={"wait": 0.2}, headers=agents[3])
        assert r.status_code == 204 and json.loads(r.headers[NEEDS_HEADER]) == {fid: needs[2]}
        listed = {a["memory_budget_bytes"]: a for a in http.get("/v1/agents", headers=ADMIN).json()}
        assert listed[needs[2] - 1]["needs_bytes"] == {fid: needs[2]}
        assert listed[needs[1]]["widths"] == {fid: 0.5}

        base = _model(http, fid, 0)
        shapes = {k: v.shape for k, v in base.items()}
        rng = np.random.default_rng(0)
        uploads = []
        for t, samples in zip(tasks, [100, 50, 30], strict=True):
            reshape = _reshape(t["levels"][t["level"]], shapes)
            local = apply_reshape(base, reshape)
            delta = {k: np.where(rng.random(v.shape) < 0.5, rng.normal(0, 0.01, v.shape), 0).astype(np.float32)
                     for k, v in local.items()}
            uploads.append((delta, reshape, float(samples)))
        # a full-model delta claiming the narrowest level, and a level the round lacks
        assert _put(http, agents[2], fid, uploads[0][0], 30, 2) == 422
        assert _put(http, agents[2], fid, uploads[2][0], 30, 5) == 422
        assert _put(http, agents[0], fid, uploads[0][0], 100, 0) == 200
        assert _put(http, agents[1], fid, uploads[1][0], 50, 1) == 200
        if restart:  # the stored updates are refolded at their levels
            http.__exit__(None, None, None)
            closed = True
            http = _client(root).__enter__()
            closed = False
        assert _put(http, agents[2], fid, uploads[2][0], 30, 2) == 200
        _wait_version(http, fid, 1)
        want = _oracle(base, uploads)
        got = _model(http, fid, 1)
        for k in base:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)
        metrics = http.get(f"/v1/federations/{fid}/rounds", headers=ADMIN).json()[0]
        assert [lv["width"] for lv in metrics["levels"]] == [1.0, 0.5, 0.25]
        assert all(0 <= lv["accuracy"] <= 1 for lv in metrics["levels"])
        assert metrics["levels"][0]["macs"] > metrics["levels"][1]["macs"] > metrics["levels"][2]["macs"]
        assert sorted(a["level"] for a in metrics["agents"]) == [0, 1, 2]
        if not restart:  # one ONNX model per level, the narrowest the smallest
            report = http.get(f"/v1/federations/{fid}/export/2/report", headers=ADMIN).json()
            assert report["width"] == 0.25 and report["level_macs"] == metrics["levels"][2]["macs"]
            onnx = http.get(f"/v1/federations/{fid}/export/2/model.onnx", headers=ADMIN)
            full = http.get(f"/v1/federations/{fid}/export/model.onnx", headers=ADMIN)
            assert onnx.status_code == 200 and 0 < len(onnx.content) < len(full.content)
            assert http.get(f"/v1/federations/{fid}/export/5/report", headers=ADMIN).status_code == 404
            assert http.get(f"/v1/federations/{fid}/export/2/report").status_code == 401
    finally:
        if not closed:
            http.__exit__(None, None, None)


@pytest.mark.parametrize("overrides,reason", [
    ({"strategy": {"name": "feddip"}}, "train plainly"),
    ({"aggregation": {"rule": "median"}}, "'mean' only"),
    ({"levels": {"widths": [0.5] * 9}}, "1 to 8 widths"),
    ({"levels": {"widths": [0.0]}}, "fraction"),
])
def test_width_levels_that_cannot_work_are_refused_at_create(tmp_path: Path, overrides: dict[str, Any],
                                                             reason: str) -> None:
    with _client(tmp_path / "c") as http:
        cfg = {**small_federation(levels=LEVELS), **overrides}
        r = http.post("/v1/federations", json=cfg, headers=ADMIN)
        assert r.status_code == 422 and reason in r.text, r.text
