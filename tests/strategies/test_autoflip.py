"""AutoFLIP: exploration rounds, guidance scores from the second moment of the deltas,
the quantile mask, the agent re-applying it after every step, and one real federation."""

from __future__ import annotations

import contextlib
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
from sparse_kernels import ErrorFeedback, decode
from strategies import STRATEGIES
from strategies.autoflip.ops import guidance_scores
from strategies.autoflip.server import AutoFLIP, guidance_from_second_moment
from strategies.base import LocalHooks
from strategies.masking import density_of

NAMES = ["features.0.weight", "features.3.weight", "classifier.1.weight", "classifier.3.weight", "classifier.5.weight"]


def _client_deltas(w: dict[str, np.ndarray], k: int = 3, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{n: (0.05 * rng.standard_normal(v.shape)).astype(np.float32) for n, v in w.items()} for _ in range(k)]


def _moments(deltas: list[dict[str, np.ndarray]]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    mean = {n: np.mean([d[n] for d in deltas], axis=0) for n in deltas[0]}
    sq = {n: np.mean([d[n] ** 2 for d in deltas], axis=0) for n in deltas[0]}
    return mean, sq


def test_second_moment_gives_the_paper_guidance_scores(h: Any) -> None:
    base = h.weights_of()
    deltas = _client_deltas(base)
    _, sq = _moments(deltas)
    ours = guidance_from_second_moment(sq, NAMES)
    explored = [{n: torch.from_numpy(base[n] + d[n]) for n in NAMES} for d in deltas]
    paper = guidance_scores({n: torch.from_numpy(base[n]) for n in NAMES}, explored)
    for n in NAMES:
        np.testing.assert_allclose(ours[n], paper[n].numpy(), atol=1e-4)  # G = mean_k (θ_k − θ₀)², min–max
        assert ours[n].min() == 0.0 and ours[n].max() == pytest.approx(1.0)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_prunes_exactly_the_parameters_that_moved_least(h: Any, scope: str) -> None:
    assert STRATEGIES["autoflip"] is AutoFLIP
    s = AutoFLIP(explore_rounds=1, q=0.3, scope=scope)  # type: ignore[arg-type]
    w = h.weights_of()
    mean, sq = _moments(_client_deltas(w))
    res = s.aggregate(h.context(1, 5, mean_sq_delta=sq), w, mean, {})
    assert res.metrics["explore"] == 1 and res.metrics["pruned_now"] == 1
    pruned = {n: res.weights[n] == 0 for n in NAMES}
    if scope == "layer":
        for n in NAMES:
            order = np.argsort(sq[n].ravel(), kind="stable")
            k = round(0.3 * sq[n].size)
            assert pruned[n].sum() == k
            assert set(np.flatnonzero(pruned[n])) == set(order[:k])  # the k smallest mean squared deltas
    else:
        g = guidance_from_second_moment(sq, NAMES)
        flat = np.concatenate([g[n].ravel() for n in NAMES])
        is_pruned = np.concatenate([pruned[n].ravel() for n in NAMES])
        k = round(0.3 * flat.size)
        assert is_pruned.sum() == k
        assert flat[is_pruned].max() <= flat[~is_pruned].min()  # one quantile threshold on G
        for n in NAMES:  # within a tensor that means: the smallest mean squared deltas
            if pruned[n].any() and (~pruned[n]).any():
                assert sq[n][pruned[n]].max() <= sq[n][~pruned[n]].min()
    assert res.metrics["density"] == pytest.approx(0.7, abs=1e-4)
    for k_ in set(w) - set(NAMES):  # biases dense, plain FedAvg
        np.testing.assert_allclose(res.weights[k_], w[k_] + mean[k_], rtol=1e-6)


def test_exploration_rounds_are_fedavg_then_the_mask_holds(h: Any) -> None:
    s = AutoFLIP(explore_rounds=2, q=0.3)
    w = h.weights_of()
    state: dict[str, np.ndarray] = {}
    masks = None
    for t in range(1, 6):
        mean, sq = _moments(_client_deltas(w, seed=t))
        res = s.aggregate(h.context(t, 5, mean_sq_delta=sq), w, mean, state)
        json.dumps(res.metrics)
        assert res.metrics["explore"] == int(t <= 2)
        assert res.metrics["pruned_now"] == int(t == 2)
        if t < 2:
            assert res.metrics["density"] == 1.0 and not res.state
            for n in w:
                np.testing.assert_allclose(res.weights[n], w[n] + mean[n], rtol=1e-6)
        else:
            now = {n: res.weights[n] != 0 for n in NAMES}
            if masks is not None:
                for n in NAMES:
                    np.testing.assert_array_equal(now[n], masks[n])  # the mask never changes again
                    assert (res.weights[n][~masks[n]] == 0).all()  # exactly zero off-mask...
            masks = now  # ...although the mean delta was nonzero there
            assert res.metrics["density"] == pytest.approx(0.7, abs=1e-4)
        w, state = res.weights, res.state


def test_task_params_are_json_and_say_when_agents_train_pruned(h: Any) -> None:
    s = AutoFLIP(explore_rounds=2)
    w = h.weights_of()
    params = [s.task_params(r, w, {}) for r in range(1, 5)]
    assert [p["pruned"] for p in params] == [False, False, True, True]
    json.dumps(params)


def _pruned_start(h: Any) -> dict[str, np.ndarray]:
    w = h.weights_of()
    mean, sq = _moments(_client_deltas(w))
    return AutoFLIP(q=0.3).aggregate(h.context(1, 5, mean_sq_delta=sq), w, mean, {}).weights


def test_agent_after_step_keeps_pruned_weights_at_zero(h: Any) -> None:
    w1 = _pruned_start(h)
    model = build_from_state("lenet5", w1, in_channels=1, num_classes=10)
    hooks = h.task_hooks(h.task_for("autoflip", {"pruned": True}), model, w1, make_synthetic(16))
    assert hooks.after_step is not None and hooks.upload_support is not None
    for n in NAMES:
        np.testing.assert_array_equal(hooks.upload_support[n], w1[n] != 0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    steps = []

    def checked() -> None:
        assert hooks.after_step is not None
        hooks.after_step()
        params = dict(model.named_parameters())
        steps.append(all(bool((params[n].detach().numpy()[w1[n] == 0] == 0).all()) for n in NAMES))

    with hooks.context:
        train_epochs(model, make_synthetic(64, seed=0), optimizer=opt, batch_size=16, max_steps=4, after_step=checked)
    assert steps == [True] * 4  # after every optimiser step
    params = dict(model.named_parameters())
    moved = [bool((params[n].detach().numpy()[w1[n] != 0] != w1[n][w1[n] != 0]).any()) for n in NAMES]
    assert all(moved)  # the kept weights did train
    # without the hook, momentum SGD would move the pruned weights
    plain = build_from_state("lenet5", w1, in_channels=1, num_classes=10)
    train_epochs(plain, make_synthetic(64, seed=0), optimizer=torch.optim.SGD(plain.parameters(), lr=0.05),
                 batch_size=16, max_steps=2)
    p = dict(plain.named_parameters())
    assert any(bool((p[n].detach().numpy()[w1[n] == 0] != 0).any()) for n in NAMES)


def test_exploration_rounds_train_plainly_and_uploads_respect_the_mask(h: Any) -> None:
    w0 = h.weights_of()
    model = build_from_state("lenet5", w0, in_channels=1, num_classes=10)
    explore = h.task_hooks(h.task_for("autoflip", {"pruned": False}), model, w0, make_synthetic(16))
    assert isinstance(explore, LocalHooks)
    assert explore.after_step is None and explore.regularizer is None and explore.upload_support is None
    assert isinstance(explore.context, contextlib.nullcontext)
    w1 = _pruned_start(h)
    task = h.task_for("autoflip", {"pruned": True}, rnd=2, max_steps=3, upload_density=1.0, upload_values="fp16")
    delta = run_task(task, w1, make_synthetic(96, seed=1), ErrorFeedback()).delta.to_dense()
    for n in NAMES:
        assert (delta[n][w1[n] == 0] == 0).all()  # nothing uploaded off the mask
        assert (delta[n][w1[n] != 0] != 0).mean() > 0.2


def test_autoflip_federation_end_to_end(coordinator: TestClient, make_agent: Callable[[int], EdgeAgent], h: Any) -> None:
    agents = [make_agent(0), make_agent(1)]
    fid = h.create_started(coordinator, rounds=3, strategy={"name": "autoflip", "params": {"explore_rounds": 1, "q": 0.3}},
                           training={"batch_size": 32, "lr": 0.05, "max_steps": 4, "upload_values": "fp16"})
    rows = h.run_federation(coordinator, fid, agents, max_tasks=3)
    assert [r["explore"] for r in rows] == [1, 0, 0]
    assert [r["density"] for r in rows] == [pytest.approx(0.7, abs=1e-4)] * 3
    models = [decode(coordinator.get(f"/v1/federations/{fid}/models/{v}", headers=h.ADMIN).content).to_dense()
              for v in (1, 3)]
    for n in NAMES:
        np.testing.assert_array_equal(models[0][n] != 0, models[1][n] != 0)  # the mask held
    held = agents[1].sync_model(fid, 3)
    assert density_of(held, NAMES) == pytest.approx(0.7, abs=1e-4)
    assert rows[2]["bytes_up"] < rows[0]["bytes_up"]  # only kept coordinates travel after pruning
