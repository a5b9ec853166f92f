"""Agents training width levels: a real federation where a small budget trains a narrow
slice; and the error-feedback residual following an agent from level to level without
losing what lies outside the slice it trains now. Mutations these kill: uploading the full
model whatever the level; resetting the residual when the level changes; writing the
slice's residual at the wrong global positions."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from coordinator.levels import plan_levels, task_levels
from coordinator.protocol import FederationCreate, Task
from edge_agent.agent import AgentState, EdgeAgent
from edge_agent.client import CoordinatorClient
from edge_agent.levels import level_reshape, local_slices, train_level
from models import make_synthetic
from models.state import seeded_weights
from sparse_kernels import ErrorFeedback
from sparse_kernels.reshape import apply_reshape
from tests.federation_fixtures import run_to_completion, small_federation
from tests.helpers import ADMIN, ENROLL

LEVELS = {"widths": [1.0, 0.5, 0.25], "rule": "first"}  # nested first-k: the residual test reads its rows


def _task(level: int, cfg: dict[str, Any]) -> Task:
    fc = FederationCreate.model_validate(cfg)
    weights = seeded_weights("lenet5", 0, in_channels=1, num_classes=10)
    return Task(federation_id="f", round=1, model="lenet5", in_channels=1, num_classes=10, image_size=None,
                model_version=0, training=fc.training, strategy=fc.strategy, deadline=time.time() + 60,
                levels=task_levels(plan_levels(fc, weights, 1)), level=level,
                model_shapes={k: list(v.shape) for k, v in weights.items()})


def test_the_residual_follows_the_agent_between_levels() -> None:
    torch.manual_seed(0)
    cfg = small_federation(levels=LEVELS, training={"batch_size": 16, "lr": 0.05, "max_steps": 2,
                                                    "upload_density": 0.1})
    weights = seeded_weights("lenet5", 0, in_channels=1, num_classes=10)
    shapes = {k: v.shape for k, v in weights.items()}
    data = make_synthetic(64, seed=1)
    feedback = ErrorFeedback()

    wide_task = _task(1, cfg)
    wide = train_level(wide_task, local_slices(wide_task, weights), data, feedback)  # level 1: width 0.5
    assert wide.report.level == 1
    after_wide = feedback.state_dict()
    assert {k: v.shape for k, v in after_wide.items()} == shapes  # kept in global coordinates
    narrow_task = _task(2, cfg)
    narrow = train_level(narrow_task, local_slices(narrow_task, weights), data, feedback)  # the budget shrank: level 2
    after_narrow = feedback.state_dict()

    reshape = level_reshape(narrow_task.levels[2], shapes)
    sliced = {k: v.shape for k, v in apply_reshape(weights, reshape).items()}
    assert {t.name: t.shape for t in narrow.delta.tensors} == sliced  # the upload is on the slice
    name = "classifier.1.weight"  # fc 120 -> 32 rows at width 0.25: rows 32.. are outside
    outside = np.ones(shapes[name], bool)
    outside[np.ix_(*[np.arange(n) if keep is None else np.asarray(keep)
                     for keep, n in zip(reshape[name], shapes[name], strict=True)])] = False
    np.testing.assert_array_equal(after_narrow[name][outside], after_wide[name][outside])
    assert np.abs(after_wide[name][outside]).sum() > 0  # there was something to keep
    assert not np.array_equal(after_narrow[name][~outside], after_wide[name][~outside])


def test_a_federation_of_budgeted_agents_trains_each_at_its_level(coordinator: Any, tmp_path: Path,
                                                                  one_thread: None) -> None:
    cfg = small_federation(rounds=3, clients_per_round=2, min_clients=2, levels=LEVELS)
    levels = plan_levels(FederationCreate.model_validate(cfg), seeded_weights("lenet5", 0, in_channels=1,
                                                                              num_classes=10), 1)
    budget = (levels[1].need_bytes + levels[2].need_bytes) // 2  # fits level 2 at min_batch, not level 1
    data = make_synthetic(400, seed=0)
    agents = []
    for i, b in enumerate([None, budget]):
        client = CoordinatorClient(coordinator, max_tries=2, backoff_s=0.01)
        client.enroll(ENROLL, name=f"lv-{i}", memory_budget_bytes=b)
        agents.append(EdgeAgent(client, data.subset(np.arange(i * 200, (i + 1) * 200)),
                                AgentState(tmp_path / f"agent-{i}"), memory_budget_bytes=b))
    fid = coordinator.post("/v1/federations", json=cfg, headers=ADMIN).json()["id"]
    coordinator.post(f"/v1/federations/{fid}/start", headers=ADMIN)
    rows = run_to_completion(coordinator, fid, agents, max_tasks=3)
    assert len(rows) == 3
    for row in rows:
        by_budget = {a["budget_bytes"]: a for a in row["agents"]}
        assert by_budget[None]["level"] == 0
        assert by_budget[budget]["level"] == 2
        assert by_budget[budget]["planned_bytes"] <= budget
        assert {lv["width"] for lv in row["levels"]} == {1.0, 0.5, 0.25}
    # from version 1 on, the narrow agent downloads its slice, not the whole model
    model_bytes = len(coordinator.get(f"/v1/federations/{fid}/models/1", headers=ADMIN).content)
    slice_bytes = len(coordinator.get(f"/v1/federations/{fid}/models/2/levels/2?round=3", headers=ADMIN).content)
    assert slice_bytes < model_bytes / 2
    assert agents[1].client.bytes_down < 2 * model_bytes


def test_levels_follow_the_global_model_as_structured_pruning_shrinks_it(coordinator: Any, tmp_path: Path,
                                                                         one_thread: None) -> None:
    cfg = small_federation(rounds=3, clients_per_round=2, min_clients=2, levels=LEVELS,
                           strategy={"name": "structured", "params": {"target_macs": 0.8, "start_round": 1,
                                                                      "prune_steps": 1}})
    levels = plan_levels(FederationCreate.model_validate(cfg), seeded_weights("lenet5", 0, in_channels=1,
                                                                              num_classes=10), 1)
    data = make_synthetic(400, seed=0)
    agents = []
    for i, b in enumerate([None, levels[1].need_bytes]):
        client = CoordinatorClient(coordinator, max_tries=2, backoff_s=0.01)
        client.enroll(ENROLL, name=f"sp-{i}", memory_budget_bytes=b)
        agents.append(EdgeAgent(client, data.subset(np.arange(i * 200, (i + 1) * 200)),
                                AgentState(tmp_path / f"sp-{i}"), memory_budget_bytes=b))
    fid = coordinator.post("/v1/federations", json=cfg, headers=ADMIN).json()["id"]
    coordinator.post(f"/v1/federations/{fid}/start", headers=ADMIN)
    rows = run_to_completion(coordinator, fid, agents, max_tasks=3)
    full = [r["levels"][0]["macs"] for r in rows]
    assert full[0] < levels[0].level.macs and full[1] == full[2]  # round 1 closed with the prune
    assert all(r["levels"][0]["macs"] > r["levels"][1]["macs"] for r in rows)  # the levels are slices of it
    assert {a["level"] for r in rows[1:] for a in r["agents"]} == {0, 1}  # both kept training after the prune
