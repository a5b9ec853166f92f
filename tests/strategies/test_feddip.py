"""FedDIP: the server's cubic schedule and global magnitude reconfiguration, the agent's
error feedback and incremental regularisation, and one real federation."""

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
from models import make_synthetic, train_epochs
from models.state import build_from_state
from pruning import CubicSparsity, erk_densities, masks_from_zeros
from sparse_kernels import ErrorFeedback, decode
from strategies import STRATEGIES, build_strategy
from strategies.feddip.ops import MaskedForward
from strategies.feddip.server import FedDIP
from strategies.masking import density_of, masked_names

NAMES = ["features.0.weight", "features.3.weight", "classifier.1.weight", "classifier.3.weight", "classifier.5.weight"]


def _random_delta(w: dict[str, np.ndarray], seed: int, scale: float = 0.05) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (scale * rng.standard_normal(v.shape)).astype(np.float32) for k, v in w.items()}


def test_registered_and_masks_only_conv_and_linear_weights(h: Any) -> None:
    assert STRATEGIES["feddip"] is FedDIP
    w = h.weights_of()
    assert masked_names(h.context(1, 10), w) == NAMES  # no biases (lenet5 has no BN)
    with pytest.raises(ValueError):
        build_strategy("feddip", {"sT": 1.5})


def test_round0_is_a_random_erk_mask_at_half_density(h: Any) -> None:
    w = h.weights_of()
    s = FedDIP(seed=1)
    w0 = s.initial_weights(w, h.context(0, 10))
    total = sum(w[n].size for n in NAMES)
    assert abs(density_of(w0, NAMES) - 0.5) <= len(NAMES) / total
    erk = erk_densities({n: w[n].shape for n in NAMES}, 0.5)
    for n in NAMES:
        kept = w0[n] != 0
        assert abs(kept.mean() - erk[n]) <= 1 / w[n].size + 1e-9  # ERK layer densities, exactly
        np.testing.assert_array_equal(w0[n][kept], w[n][kept])  # kept weights untouched
    assert erk["features.0.weight"] > erk["classifier.1.weight"]  # small layers denser
    for k in set(w) - set(NAMES):
        np.testing.assert_array_equal(w0[k], w[k])  # biases dense
    # random, not magnitude: some pruned weights are larger than some kept ones
    big = w["classifier.1.weight"]
    kept = w0["classifier.1.weight"] != 0
    assert np.abs(big[~kept]).max() > np.abs(big[kept]).min()
    again = FedDIP(seed=1).initial_weights(w, h.context(0, 10))
    other = FedDIP(seed=2).initial_weights(w, h.context(0, 10))
    assert all(np.array_equal(again[n], w0[n]) for n in NAMES)
    assert not all(np.array_equal(other[n], w0[n]) for n in NAMES)


@pytest.mark.parametrize("every", [1, 2])
def test_density_follows_the_cubic_schedule_and_masks_change_only_at_reconfiguration(h: Any, every: int) -> None:
    T = 10
    s = FedDIP(sT=0.9, reconfigure_every=every, seed=0)
    schedule = CubicSparsity(T, 0.5, 0.9)
    w = s.initial_weights(h.weights_of(), h.context(0, T))
    total = sum(w[n].size for n in NAMES)
    state: dict[str, np.ndarray] = {}
    prev_mask = {n: w[n] != 0 for n in NAMES}
    densities = []
    for t in range(1, T + 1):
        res = s.aggregate(h.context(t, T), w, _random_delta(w, t), state)
        mask = {n: res.state[f"mask/{n}"].astype(bool) for n in NAMES}
        for n in NAMES:
            assert (res.weights[n][~mask[n]] == 0).all()  # exactly zero off the mask
            assert (res.weights[n][mask[n]] != 0).all()  # the zeros ARE the mask
        last = (t // every) * every
        assert abs(res.metrics["density"] - schedule.density(last)) <= 1 / total
        changed = any(not np.array_equal(mask[n], prev_mask[n]) for n in NAMES)
        assert changed == (t % every == 0) == bool(res.metrics["reconfigured"])
        assert (res.metrics["mask_changes"] > 0) == changed
        densities.append(res.metrics["density"])
        json.dumps(res.metrics)
        w, state, prev_mask = res.weights, res.state, mask
    assert densities == sorted(densities, reverse=True)
    assert abs(densities[-1] - 0.1) <= 1 / total  # reaches 1 − s_T at T


def test_reconfiguration_is_global_magnitude_over_the_dense_aggregate(h: Any) -> None:
    s = FedDIP(sT=0.9, reconfigure_every=1, seed=0)
    w = s.initial_weights(h.weights_of(), h.context(0, 10))
    delta = _random_delta(w, 0)
    pruned = np.argwhere(w["classifier.1.weight"] == 0)[0]
    delta["classifier.1.weight"][tuple(pruned)] = 10.0  # a pruned coordinate that learned a lot
    res = s.aggregate(h.context(1, 10), w, delta, {})
    assert res.weights["classifier.1.weight"][tuple(pruned)] == pytest.approx(10.0, abs=0.5)  # it came back
    dense = {n: w[n] + delta[n] for n in NAMES}
    kept = np.concatenate([np.abs(dense[n][res.weights[n] != 0]) for n in NAMES])
    dropped = np.concatenate([np.abs(dense[n][res.weights[n] == 0]) for n in NAMES])
    assert kept.min() >= dropped.max()  # one global threshold
    per_layer = [float((res.weights[n] != 0).mean()) for n in NAMES]
    assert max(per_layer) - min(per_layer) > 0.05  # global scope: layers end up different
    for k in set(w) - set(NAMES):
        np.testing.assert_allclose(res.weights[k], w[k] + delta[k], rtol=1e-6)  # dense FedAvg


def test_task_params_lambda_schedule_and_json(h: Any) -> None:
    s = FedDIP(lam_max=1e-3)
    w = h.weights_of()
    p1 = s.task_params(1, w, {})
    assert p1 == {"lam": 0.0, "error_feedback": True}
    state = {"total_rounds": np.array([40])}
    lams = [s.task_params(r, w, state)["lam"] for r in range(1, 42)]
    assert lams[0] == 0.0 and lams[-1] == pytest.approx(1e-3)
    steps = sorted(set(lams))
    assert len(steps) == 21 and np.allclose(np.diff(steps), 1e-3 / 20)  # 20 equal steps
    assert lams == sorted(lams)
    json.dumps(s.task_params(7, w, state))
    assert FedDIP(T=40).task_params(3, w, {})["lam"] == pytest.approx(1e-3 / 20)  # λ_2 = λ_max·⌊2·20/40⌋/20


def _feddip_start(h: Any) -> tuple[FedDIP, dict[str, np.ndarray]]:
    s = FedDIP(seed=0, reconfigure_every=5)
    return s, s.initial_weights(h.weights_of(), h.context(0, 10))


def test_agent_error_feedback_keeps_pruned_coordinates_learning(h: Any) -> None:
    s, w0 = _feddip_start(h)
    task = h.task_for("feddip", s.task_params(5, w0, {"total_rounds": np.array([10])}))
    assert task.strategy.params["lam"] > 0
    model = build_from_state("lenet5", w0, in_channels=1, num_classes=10)
    hooks = h.task_hooks(task, model, w0, make_synthetic(16))
    assert isinstance(hooks.context, MaskedForward) and hooks.context.error_feedback
    assert hooks.upload_support is None  # the dense delta is uploaded
    masks = masks_from_zeros(model, w0)
    data = make_synthetic(64, seed=0)
    x = torch.from_numpy(data.images[:8]).permute(0, 3, 1, 2).float() / 255
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with hooks.context:
        train_epochs(model, data, optimizer=opt, batch_size=16, max_steps=4,
                     regularizer=hooks.regularizer, after_step=hooks.after_step)
        model.eval()
        with torch.no_grad():
            inside = model(x)
    params = dict(model.named_parameters())
    assert set(params) == set(w0)  # the parametrisation is gone: dense weights back
    assert not masks["features.0.weight"].all() or not masks["classifier.1.weight"].all()
    for n, m in masks.items():
        if m.all():
            continue  # ERK may leave a small layer dense
        pruned = params[n].detach()[~m]
        assert (pruned != 0).float().mean() > 0.2  # pruned coordinates kept learning (ReLU-dead inputs give 0)
    masked = build_from_state("lenet5", {k: v.detach().numpy() * (masks[k].numpy() if k in masks else 1)
                                          for k, v in model.state_dict().items()}, in_channels=1, num_classes=10)
    masked.eval()
    with torch.no_grad():
        torch.testing.assert_close(inside, masked(x))  # inside, the model computes with w⊙m


def test_without_error_feedback_pruned_coordinates_stay_put(h: Any) -> None:
    _, w0 = _feddip_start(h)
    task = h.task_for("feddip", {"lam": 1e-3, "error_feedback": False})
    model = build_from_state("lenet5", w0, in_channels=1, num_classes=10)
    hooks = h.task_hooks(task, model, w0, make_synthetic(16))
    masks = masks_from_zeros(model, w0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with hooks.context:
        train_epochs(model, make_synthetic(64, seed=0), optimizer=opt, batch_size=16, max_steps=4,
                     regularizer=hooks.regularizer)
    params = dict(model.named_parameters())
    for n, m in masks.items():
        assert (params[n].detach()[~m] == 0).all()


def test_regularizer_is_lambda_times_sum_of_masked_l2_norms(h: Any) -> None:
    _, w0 = _feddip_start(h)
    model = build_from_state("lenet5", w0, in_channels=1, num_classes=10)
    hooks = h.task_hooks(h.task_for("feddip", {"lam": 2e-3}), model, w0, make_synthetic(16))
    assert hooks.regularizer is not None
    expected = 2e-3 * sum(float(np.linalg.norm(w0[n])) for n in NAMES)
    assert float(hooks.regularizer(model).detach()) == pytest.approx(expected, rel=1e-5)
    assert h.task_hooks(h.task_for("feddip", {"lam": 0.0}), model, w0, make_synthetic(16)).regularizer is None


def test_run_task_uploads_the_dense_delta_including_pruned_coordinates(h: Any) -> None:
    s, w0 = _feddip_start(h)
    task = h.task_for("feddip", s.task_params(2, w0, {"total_rounds": np.array([10])}), max_steps=3)
    delta = run_task(task, w0, make_synthetic(96, seed=1), ErrorFeedback()).delta.to_dense()
    for n in NAMES:
        if (w0[n] == 0).any():
            assert (delta[n][w0[n] == 0] != 0).mean() > 0.2
    # and the server brings back none of that between reconfigurations
    res = s.aggregate(h.context(1, 10), w0, delta, {})
    assert not res.metrics["reconfigured"]
    for n in NAMES:
        assert (res.weights[n][w0[n] == 0] == 0).all()


def test_feddip_federation_end_to_end(coordinator: TestClient, make_agent: Callable[[int], EdgeAgent], h: Any) -> None:
    agents = [make_agent(0), make_agent(1)]
    fid = h.create_started(coordinator, rounds=3, strategy={"name": "feddip", "params": {"sT": 0.8, "reconfigure_every": 1}},
                           training={"batch_size": 32, "lr": 0.05, "max_steps": 4, "upload_density": 0.2,
                                     "upload_values": "fp16"})
    rows = h.run_federation(coordinator, fid, agents, max_tasks=3)
    assert rows[0]["bytes_down"] == 0  # agents rebuilt the ERK-masked initial model (sha256 checked)
    schedule = CubicSparsity(3, 0.5, 0.8)
    for row in rows:
        assert row["density"] == pytest.approx(schedule.density(row["round"]), abs=1e-3)
        assert row["participants"] == 2 and np.isfinite(row["loss"])
    server = decode(coordinator.get(f"/v1/federations/{fid}/models/3", headers=h.ADMIN).content).to_dense()
    held = agents[0].sync_model(fid, 3)
    for n in NAMES:
        np.testing.assert_array_equal(held[n] != 0, server[n] != 0)  # agents see the server's mask exactly
    assert density_of(server, NAMES) == pytest.approx(rows[-1]["density"])
