"""Federated evaluation: a federation without a server test set (`data.dataset: none`) asks
its agents to evaluate the global model they received on their held-out split; the round's
accuracy/loss are the sample-weighted mean of what they reported (Flower's evaluate).

Oracles: numpy's weighted mean of the reported values; an independent evaluation of the
downloaded global model on the agent's own held-out split."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from coordinator.round_metrics import federated_evaluation
from edge_agent.agent import EdgeAgent
from edge_agent.local import evaluate_global
from edge_agent.local_data import holdout_split
from models import ImageDataset
from sparse_kernels import decode
from tests.federation_fixtures import small_federation
from tests.helpers import ADMIN

NO_SERVER_DATA = {"dataset": "none", "input": {"shape": [1, 28, 28], "classes": [f"c{i}" for i in range(10)]}}


def test_federated_mean_is_the_sample_weighted_mean() -> None:
    rng = np.random.default_rng(0)
    n = rng.integers(1, 500, size=7)
    acc, loss = rng.uniform(0, 1, size=7), rng.uniform(0, 5, size=7)
    reports: list[dict[str, Any]] = [{"eval_samples": int(k), "eval_accuracy": float(a), "eval_loss": float(v)}
                                     for k, a, v in zip(n, acc, loss, strict=True)]
    # agents that did not evaluate (old agents, width levels) weigh nothing
    reports += [{"eval_samples": 0, "eval_accuracy": None, "eval_loss": None}, {}]
    got = federated_evaluation(reports)
    assert got is not None
    assert got["accuracy"] == pytest.approx(float((n * acc).sum() / n.sum()), rel=1e-12)
    assert got["loss"] == pytest.approx(float((n * loss).sum() / n.sum()), rel=1e-12)
    assert got["samples"] == int(n.sum()) and got["agents"] == 7
    assert federated_evaluation([{}, {"eval_samples": 0}]) is None


def _create(coordinator: TestClient, **overrides: Any) -> Any:
    return coordinator.post("/v1/federations", json=small_federation(**overrides), headers=ADMIN)


def test_no_server_data_round_metrics_carry_the_agents_weighted_mean(
        coordinator: TestClient, make_agent: Callable[[int], EdgeAgent], one_thread: None,
        run_federation: Callable[..., list[dict[str, Any]]]) -> None:
    # Arrange: no server-side dataset; agents of different sizes so the weights matter
    agents = [make_agent(0), make_agent(1)]
    agents[1].data = agents[1].data.subset(np.arange(120))  # type: ignore[union-attr]
    # one whole epoch (no max_steps), so num_samples counts the whole training split
    resp = _create(coordinator, data=NO_SERVER_DATA, training={"batch_size": 32, "lr": 0.05})
    assert resp.status_code == 201, resp.text
    fid = resp.json()["id"]
    assert coordinator.post(f"/v1/federations/{fid}/start", headers=ADMIN).status_code == 200

    # Act
    rows = run_federation(fid, agents, max_tasks=2)

    # Assert: every round's accuracy/loss is numpy's weighted mean of what the agents reported
    assert [r["round"] for r in rows] == [1, 2]
    for r in rows:
        per = r["agents"]
        n = np.array([a["eval_samples"] for a in per], dtype=float)
        assert r["evaluation"] == "federated" and sorted(n.tolist()) == [12.0, 20.0], per  # 10 % held out
        assert r["accuracy"] == pytest.approx(np.average([a["eval_accuracy"] for a in per], weights=n))
        assert r["loss"] == pytest.approx(np.average([a["eval_loss"] for a in per], weights=n))
        assert r["federated"]["samples"] == 32 and r["macs"] > 0
        # trained on the rest only: the held-out samples never reach training
        assert sorted(a["num_samples"] for a in per) == [108, 180]
    # the coordinator loaded no dataset (it has none)
    assert coordinator.app.state.service.evaluator._data == {}  # type: ignore[attr-defined]

    # Assert: round 2's figure is the *received* model (version 1) on the agent's held-out
    # split, recomputed here from the downloaded model
    v1 = decode(coordinator.get(f"/v1/federations/{fid}/models/1", headers=ADMIN).content).to_dense()
    agent = agents[1]
    assert isinstance(agent.data, ImageDataset)
    held = holdout_split(agent.data, agent.holdout_fraction, agent.seed)[1]
    assert held is not None
    task_like = type("T", (), {"model": "lenet5", "in_channels": 1, "num_classes": 10, "image_size": None})
    oracle = evaluate_global(task_like, v1, held)  # type: ignore[arg-type]
    reported = next(a for a in rows[1]["agents"] if a["eval_samples"] == len(held))
    assert reported["eval_accuracy"] == pytest.approx(oracle.accuracy)
    assert reported["eval_loss"] == pytest.approx(oracle.loss, rel=1e-5)

    # Assert: the export works without a test set (parity on seeded Gaussian inputs)
    report = coordinator.get(f"/v1/federations/{fid}/export/report", headers=ADMIN)
    assert report.status_code == 200, report.text
    assert coordinator.get(f"/v1/federations/{fid}/export/model.onnx", headers=ADMIN).content[:2] != b""


def test_both_keeps_the_server_accuracy_and_adds_the_federated_mean(
        coordinator: TestClient, make_agent: Callable[[int], EdgeAgent], one_thread: None,
        run_federation: Callable[..., list[dict[str, Any]]]) -> None:
    resp = _create(coordinator, rounds=1, data={"dataset": "synthetic", "eval_samples": 200, "evaluation": "both"})
    assert resp.status_code == 201, resp.text
    fid = resp.json()["id"]
    coordinator.post(f"/v1/federations/{fid}/start", headers=ADMIN)
    (row,) = run_federation(fid, [make_agent(0), make_agent(1)], max_tasks=1)
    per = row["agents"]
    n = np.array([a["eval_samples"] for a in per], dtype=float)
    assert row["evaluation"] == "both" and row["federated"]["samples"] == 40
    assert row["federated"]["accuracy"] == pytest.approx(np.average([a["eval_accuracy"] for a in per], weights=n))
    # server side: the new model on the test split (not the agents' mean of the old one)
    assert row["accuracy"] != row["federated"]["accuracy"]


def test_server_evaluation_is_the_default_and_asks_agents_for_nothing(
        coordinator: TestClient, make_agent: Callable[[int], EdgeAgent], one_thread: None,
        run_federation: Callable[..., list[dict[str, Any]]]) -> None:
    resp = _create(coordinator, rounds=1, training={"batch_size": 32, "lr": 0.05})
    fid = resp.json()["id"]
    coordinator.post(f"/v1/federations/{fid}/start", headers=ADMIN)
    (row,) = run_federation(fid, [make_agent(0), make_agent(1)], max_tasks=1)
    assert row["evaluation"] == "server" and "federated" not in row
    assert all("eval_samples" not in a and a["num_samples"] == 200 for a in row["agents"])  # nothing held out


@pytest.mark.parametrize(("overrides", "status", "what"), [
    # server evaluation needs server data
    ({"data": {"dataset": "none", "evaluation": "server"}}, 422, "needs a server-side dataset"),
    # the spec's channels / classes must be the model's
    ({"data": {**NO_SERVER_DATA, "input": {"shape": [3, 28, 28], "classes": NO_SERVER_DATA["input"]["classes"]}}},
     422, "3 channels"),
    ({"data": {**NO_SERVER_DATA, "input": {"shape": [1, 28, 28], "classes": ["a", "b"]}}}, 422, "2 classes"),
    # a shape the model cannot take (LeNet-5's linear layer is sized for 28×28)
    ({"data": {**NO_SERVER_DATA, "input": {"shape": [1, 40, 40], "classes": NO_SERVER_DATA["input"]["classes"]}}},
     422, "does not fit model"),
    # width levels calibrate BN on server data
    ({"data": NO_SERVER_DATA, "levels": {"widths": [1.0, 0.5]}}, 422, "need data.dataset"),
    # duplicate class names cannot map labels
    ({"data": {**NO_SERVER_DATA, "input": {"shape": [1, 28, 28], "classes": ["a"] * 10}}}, 422, "unique"),
])
def test_refused_configs(coordinator: TestClient, overrides: dict[str, Any], status: int, what: str) -> None:
    resp = _create(coordinator, **overrides)
    assert resp.status_code == status and what in resp.text, resp.text
