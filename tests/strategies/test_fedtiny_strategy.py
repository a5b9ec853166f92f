"""FedTiny as a federation strategy: setup phases (adaptive BN, candidate selection by
averaged loss), the prune-and-grow schedule, the agent half, and one real federation."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from edge_agent.agent import EdgeAgent
from edge_agent.local import run_task
from models import make_synthetic
from models.state import build_from_state
from models.training import evaluate
from pruning.masks import apply_masks, prunable_weights
from pruning.schedules import CosineGrowRate
from sparse_kernels import ErrorFeedback, decode
from strategies import STRATEGIES
from strategies.fedtiny.ops import pool_from_state
from strategies.fedtiny.server import FedTiny, adjusted_layers, layer_groups

NAMES = ["features.3.weight", "classifier.1.weight", "classifier.3.weight", "classifier.5.weight"]  # lenet5, not the first conv


def _masked_state(w: dict[str, np.ndarray], masks: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.where(masks[k], v, np.float32(0)) if k in masks else v for k, v in w.items()}


def test_registered_with_one_setup_round_without_bn_and_two_with(h: Any) -> None:
    s = STRATEGIES["fedtiny"]()
    assert s.setup_rounds(h.weights_of("lenet5")) == 1
    assert s.setup_rounds(h.weights_of("resnet20")) == 2
    assert [s.phase(r, h.weights_of("resnet20")) for r in (1, 2, 3)] == ["bn", "select", "train"]
    assert [s.phase(r, h.weights_of("lenet5")) for r in (1, 2)] == ["select", "train"]


def test_schedule_is_cosine_and_adjusts_one_layer_at_a_time_last_first() -> None:
    assert CosineGrowRate(8, 0.1)(0) == pytest.approx(0.1)
    assert CosineGrowRate(8, 0.1)(4) == pytest.approx(0.05)
    assert CosineGrowRate(8, 0.1)(8) == pytest.approx(0.0, abs=1e-12)
    assert CosineGrowRate(8, 0.1)(9) == 0.0
    groups = layer_groups(NAMES, "layer")
    order = [adjusted_layers(t, groups, 1, 8) for t in range(1, 11)]
    assert order[:5] == [[NAMES[3]], [NAMES[2]], [NAMES[1]], [NAMES[0]], [NAMES[3]]]
    assert order[8:] == [[], []]  # after T_end nothing changes
    assert [adjusted_layers(t, groups, 3, 12) for t in (1, 2, 3, 4, 6)] == [[], [], [NAMES[3]], [], [NAMES[2]]]
    assert layer_groups(["layer1.0.conv1.weight", "layer1.1.conv2.weight", "layer2.0.conv1.weight"], "block") == [
        ["layer1.0.conv1.weight", "layer1.1.conv2.weight"], ["layer2.0.conv1.weight"]]


def test_selection_keeps_the_lowest_loss_candidate_first_layer_dense(h: Any) -> None:
    w = h.weights_of("lenet5")
    s = FedTiny(density=0.2, pool_size=4, seed=3)
    losses = np.array([2.3, 2.1, 2.5, 2.2], dtype=np.float32)
    res = s.aggregate(_ctx(h, 1, aux={"aux/loss": losses}), w, {}, {})
    pool = pool_from_state(w, NAMES, 0.2, 4, 3)
    assert res.metrics["chosen"] == 1
    for n in NAMES:
        np.testing.assert_array_equal(res.weights[n] != 0, pool[1][n])
        np.testing.assert_array_equal(res.state[f"mask/{n}"].astype(bool), pool[1][n])
    np.testing.assert_array_equal(res.weights["features.0.weight"], w["features.0.weight"])  # first layer dense
    assert res.metrics["density"] == pytest.approx(0.2, rel=0.03)
    json.dumps(s.task_params(2, res.weights, res.state))


def test_bn_round_averages_candidates_statistics_and_selection_installs_them(h: Any) -> None:
    w = h.weights_of("resnet20")
    s = FedTiny(density=0.3, pool_size=2)
    shapes = s.aux_shapes(1, w, {})
    assert shapes and all(k.startswith("aux/bn/") for k in shapes)
    aux = {k: np.full(v, 0.5 + int(k.split("/")[2]), dtype=np.float32) for k, v in shapes.items()}
    bn = s.aggregate(_ctx(h, 1, model="resnet20", aux=aux), w, {}, {})
    assert bn.weights is w and bn.metrics["setup"] == 1
    params = s.task_params(2, w, bn.state)
    assert set(params["bn"]) == {"0", "1"} and json.dumps(params)
    sel = s.aggregate(_ctx(h, 2, model="resnet20", aux={"aux/loss": np.array([3.0, 1.0], dtype=np.float32)}),
                      w, {}, bn.state)
    assert sel.metrics["chosen"] == 1
    np.testing.assert_array_equal(sel.weights["bn1.running_mean"], np.full_like(w["bn1.running_mean"], 1.5))


def _ctx(h: Any, rnd: int, *, model: str = "lenet5", total: int = 5, aux: dict[str, np.ndarray] | None = None) -> Any:
    import dataclasses

    return dataclasses.replace(h.context(rnd, total, model=model), aux=aux or {})


def test_prune_and_grow_round_moves_mass_in_the_adjusted_layer_only(h: Any) -> None:
    w = h.weights_of("lenet5")
    s = FedTiny(density=0.2, pool_size=2, every=1, t_end=4, grow_lr=0.1)
    sel = s.aggregate(_ctx(h, 1, total=5, aux={"aux/loss": np.array([1.0, 2.0], dtype=np.float32)}), w, {}, {})
    w1, state = sel.weights, sel.state
    params = s.task_params(2, w1, state)
    layer = NAMES[-1]  # last first
    assert list(params["grow"]) == [layer]
    n = params["grow"][layer]
    mask = state[f"mask/{layer}"].astype(bool)
    assert n == int(np.ceil(CosineGrowRate(4, 0.1)(1) * mask.sum()))
    g = np.zeros(mask.size, dtype=np.float32)
    pruned = np.flatnonzero(~mask.reshape(-1))
    g[pruned[: 2 * n]] = np.linspace(1.0, 2.0, 2 * n, dtype=np.float32)  # the largest are the last n
    res = s.aggregate(_ctx(h, 2, total=5, aux={f"aux/grow/{layer}": g.reshape(mask.shape)}), w1, {}, state)
    new_mask = res.state[f"mask/{layer}"].astype(bool).reshape(-1)
    grown = pruned[n: 2 * n]
    assert new_mask[grown].all()
    np.testing.assert_allclose(res.weights[layer].reshape(-1)[grown], -0.1 * g[grown], rtol=1e-6)
    active = np.abs(w1[layer].reshape(-1)).copy()
    active[~mask.reshape(-1)] = np.inf
    dropped = np.argsort(active, kind="stable")[:n]
    assert not new_mask[dropped].any() and (res.weights[layer].reshape(-1)[dropped] == 0).all()
    assert new_mask.sum() == mask.sum() and res.metrics["mask_changes"] == 2 * n
    for other in NAMES[:-1]:
        np.testing.assert_array_equal(res.state[f"mask/{other}"], state[f"mask/{other}"])


def test_agent_select_phase_uploads_each_candidates_local_loss(h: Any) -> None:
    w = h.weights_of("lenet5")
    data = make_synthetic(64, seed=2)
    task = h.task_for("fedtiny", {"phase": "select", "pool": {"k": 3, "density": 0.3, "seed": 1}, "bn": {}})
    out = run_task(task, w, data, ErrorFeedback())
    up = out.delta.to_dense()
    assert set(up) == {"aux/loss"} and out.report.train_seconds >= 0
    for c, masks in enumerate(pool_from_state(w, NAMES, 0.3, 3, 1)):
        model = build_from_state("lenet5", w, in_channels=1, num_classes=10)
        apply_masks(model, {n: torch.from_numpy(m) for n, m in masks.items()})
        assert up["aux/loss"][c] == pytest.approx(evaluate(model, data).loss, rel=1e-6)


def test_agent_train_phase_keeps_the_mask_and_sends_gradients_only_at_pruned_positions(h: Any) -> None:
    w = h.weights_of("lenet5")
    masks = pool_from_state(w, NAMES, 0.3, 1, 0)[0]
    w1 = _masked_state(w, masks)
    layer = NAMES[1]
    task = h.task_for("fedtiny", {"phase": "train", "grow": {layer: 50}}, rnd=3, max_steps=3,
                      upload_density=0.5, upload_values="fp16")
    up = run_task(task, w1, make_synthetic(96, seed=1), ErrorFeedback()).delta.to_dense()
    for n in NAMES:
        assert (up[n][~masks[n]] == 0).all()  # nothing uploaded off the mask
    tops = up[f"aux/grow/{layer}"]
    assert 0 < np.count_nonzero(tops) <= 50
    assert (tops[masks[layer]] == 0).all()  # only pruned positions
    assert {k for k in up if k.startswith("aux/")} == {f"aux/grow/{layer}"}
    assert set(prunable_weights(build_from_state("lenet5", w1, in_channels=1, num_classes=10),
                                include_first=False)) == set(NAMES)


def test_fedtiny_federation_end_to_end(coordinator: TestClient, make_agent: Callable[[int], EdgeAgent], h: Any) -> None:
    agents = [make_agent(0), make_agent(1)]
    fid = h.create_started(coordinator, rounds=3, strategy={"name": "fedtiny", "params": {
        "density": 0.2, "pool_size": 3, "every": 1, "t_end": 3}},
        training={"batch_size": 32, "lr": 0.05, "max_steps": 4, "upload_density": 0.2, "upload_values": "fp16"})
    rows = h.run_federation(coordinator, fid, agents, max_tasks=4)
    assert len(rows) == 4 and rows[0]["setup"] == 1  # 1 selection round + 3 training rounds
    assert [r["density"] for r in rows[1:]] == [pytest.approx(0.2, rel=0.03)] * 3
    assert [r["n_grow"] > 0 for r in rows[1:]] == [True, True, False]  # rate is 0 at t_end = 3
    models = {v: decode(coordinator.get(f"/v1/federations/{fid}/models/{v}", headers=h.ADMIN).content).to_dense()
              for v in (1, 2, 3)}
    changed = [n for n in NAMES if (models[1][n] != 0).tolist() != (models[2][n] != 0).tolist()]
    assert changed == [NAMES[-1]]  # round 1's adjustment: the last layer only
    held = agents[1].sync_model(fid, 4)
    assert sum(int(np.count_nonzero(held[n])) for n in NAMES) / sum(held[n].size for n in NAMES) == pytest.approx(
        0.2, rel=0.03)
