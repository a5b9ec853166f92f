"""AutoFLIP: scouts explore from θ₀ with early stopping, the guidance from every exploration
round's squared displacements, the quantile mask, the agent re-applying it after every
step, and one real federation. Each test names the mutation it kills."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordinator.aggregation import RoundUpdates
from coordinator.protocol import AggregationSpec
from edge_agent.agent import EdgeAgent
from edge_agent.local import run_task
from models import make_synthetic, train_epochs
from models.state import build_from_state, to_numpy_state
from sparse_kernels import DeltaMeta, ErrorFeedback, ModelDelta, SparseTensor, decode
from strategies import STRATEGIES
from strategies.autoflip.common import WORK_KEYS, scored_names, sq_key, work_key
from strategies.autoflip.ops import guidance_scores, minmax_scores, squared_displacement
from strategies.autoflip.server import AutoFLIP
from strategies.base import Weights
from strategies.masking import density_of

NAMES = ["features.0.weight", "features.3.weight", "classifier.1.weight", "classifier.3.weight", "classifier.5.weight"]


# ------------------------------------------------------------------ server: the guidance
def _scout_round(w0: Weights, displacements: list[dict[str, np.ndarray]], samples: list[int],
                 rnd: int) -> Weights:
    """What the service hands the strategy for one exploration round: each scout's upload
    of (θ_k − θ₀)² (`squared_displacement`, as the agent computes it) folded by the real
    accumulator, sample-weighted. Returns ctx.aux."""
    names = scored_names(w0)
    shapes = {sq_key(n): w0[n].shape for n in names} | {work_key(k): (1,) for k in WORK_KEYS}
    ups = RoundUpdates((rnd, 1), shapes, AggregationSpec(), None)
    for i, (d, n_k) in enumerate(zip(displacements, samples, strict=True)):
        sq = squared_displacement({n: w0[n] + d[n] for n in names}, w0, names)
        tensors = [SparseTensor.from_dense_nonzero(sq_key(n), v) for n, v in sq.items()]
        tensors += [SparseTensor.from_dense_nonzero(work_key(k), np.array([i + 1.0], np.float32)) for k in WORK_KEYS]
        assert ups.add(f"a{i}", ModelDelta(DeltaMeta(num_samples=n_k), tuple(tensors)), n_k, digest=str(i), nbytes=1)
    _, aux, _ = ups.reduce("zero")
    return aux


def _oracle_guidance(rounds: list[tuple[list[dict[str, np.ndarray]], list[int]]], names: list[str]) -> dict:
    """G = minmax over each tensor of Σ_rounds Σ_k n_k d_k² / Σ_k n_k, in float64 numpy."""
    total = {n: sum(np.average(np.stack([d[n].astype(np.float64) ** 2 for d in ds]), axis=0, weights=ns)
                    for ds, ns in rounds) for n in names}
    return {n: (g - g.min()) / (g.max() - g.min()) for n, g in total.items()}


def _oracle_pruned(g: dict[str, np.ndarray], q: float) -> dict[str, np.ndarray]:
    flat = np.concatenate([g[n].ravel() for n in NAMES])
    cut = np.zeros(flat.size, bool)
    cut[np.argsort(flat, kind="stable")[:round(q * flat.size)]] = True
    out, at = {}, 0
    for n in NAMES:
        out[n] = cut[at:at + g[n].size].reshape(g[n].shape)
        at += g[n].size
    return out


def _explore(h: Any, s: AutoFLIP, w0: Weights,
             rounds: list[tuple[list[dict[str, np.ndarray]], list[int]]]) -> tuple[Any, list[Any]]:
    state: dict[str, np.ndarray] = {}
    results = []
    for r, (ds, ns) in enumerate(rounds, start=1):
        ctx = dataclasses.replace(h.context(r, 5, participants=len(ds)), aux=_scout_round(w0, ds, ns, r))
        res = s.aggregate(ctx, w0, {n: np.zeros_like(v) for n, v in w0.items()}, state)
        results.append(res)
        state = res.state
    return results[-1], results


def _displacements(w0: Weights, rng: np.random.Generator, k: int, scale: float) -> list[dict[str, np.ndarray]]:
    return [{n: (scale * rng.standard_normal(v.shape)).astype(np.float32) for n, v in w0.items()} for _ in range(k)]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**16), rounds=st.integers(1, 3), scouts=st.integers(1, 4),
       q=st.sampled_from([0.1, 0.3, 0.6]), data=st.data())
def test_guidance_is_the_numpy_oracle_of_every_scouts_squared_displacement(
        h: Any, seed: int, rounds: int, scouts: int, q: float, data: st.DataObject) -> None:
    # Kills: uploading or folding θ_k − θ₀ unsquared, ignoring the sample weights, scoring
    # fewer than every parameter, normalising over all tensors at once, a mask that is not
    # the q-quantile of G, and a global model that moves during exploration.
    w0 = h.weights_of()
    rng = np.random.default_rng(seed)
    plan = [(_displacements(w0, rng, scouts, float(rng.uniform(0.01, 0.2))),
             data.draw(st.lists(st.integers(1, 500), min_size=scouts, max_size=scouts))) for _ in range(rounds)]
    final, steps = _explore(h, AutoFLIP(explore_rounds=rounds, q=q), w0, plan)
    names = scored_names(w0)
    assert set(names) >= set(NAMES) and len(names) == len(w0)  # lenet5 has no BN: every tensor scored
    for r, res in enumerate(steps[:-1], start=1):  # the accumulated guidance, before normalising
        ours = {k.removeprefix("guide/"): v for k, v in res.state.items()}
        want = _oracle_guidance(plan[:r], names)
        np.testing.assert_allclose(minmax_scores(ours, names)[NAMES[0]], want[NAMES[0]], atol=1e-5)
        for n in w0:
            np.testing.assert_array_equal(res.weights[n], w0[n])  # θ₀ stays the global model
    g = _oracle_guidance(plan, names)
    pruned = _oracle_pruned(g, q)
    for n in NAMES:
        np.testing.assert_array_equal(final.weights[n] == 0, pruned[n])
        np.testing.assert_array_equal(final.weights[n][~pruned[n]], w0[n][~pruned[n]])  # θ₀ ⊙ m
    assert final.metrics["pruned_now"] == 1 and final.metrics["density"] == pytest.approx(1 - q, abs=1e-4)


def test_every_exploration_round_counts_not_only_the_last(h: Any) -> None:
    # Kills: the guidance replaced by each round's scouts (only the last round counts), or
    # only the first. Round 1's scouts move the first half of each tensor a lot, round 2's
    # the second half a little: both rounds' scouts decide the mask.
    w0 = h.weights_of()
    rng = np.random.default_rng(3)
    halves = []
    for big_first in (True, False):
        ds = _displacements(w0, rng, 2, 0.01)
        for d in ds:
            for v in d.values():
                flat = v.reshape(-1)
                half = slice(0, flat.size // 2) if big_first else slice(flat.size // 2, None)
                flat[half] *= 10.0 if big_first else 3.0
        halves.append((ds, [100, 100]))
    final, _ = _explore(h, AutoFLIP(explore_rounds=2, q=0.3), w0, halves)
    names = scored_names(w0)
    both, last, first = (_oracle_pruned(_oracle_guidance(p, names), 0.3) for p in (halves, halves[1:], halves[:1]))
    assert any((both[n] != last[n]).any() for n in NAMES) and any((both[n] != first[n]).any() for n in NAMES)
    for n in NAMES:
        np.testing.assert_array_equal(final.weights[n] == 0, both[n])


def test_exploration_rounds_are_setup_then_the_mask_holds(h: Any) -> None:
    # Kills: exploration rounds that count among the training rounds, or train the global
    # model; a mask that changes after the exploration; pruned entries that come back.
    assert STRATEGIES["autoflip"] is AutoFLIP
    s = AutoFLIP(explore_rounds=2, q=0.3)
    w0 = h.weights_of()
    assert s.setup_rounds(w0) == 2
    rng = np.random.default_rng(0)
    final, steps = _explore(h, s, w0, [(_displacements(w0, rng, 2, 0.05), [10, 30]) for _ in range(2)])
    assert [r.metrics["setup"] for r in steps] == [1, 1] and [r.metrics["pruned_now"] for r in steps] == [0, 1]
    assert steps[0].metrics["explore_epochs"] == pytest.approx((1 * 10 + 2 * 30) / 40)  # the scouts' work, reported
    json.dumps(steps[0].metrics)
    masks = {n: final.weights[n] != 0 for n in NAMES}
    w, state = final.weights, final.state
    for t in (3, 4):
        mean = {n: (0.05 * rng.standard_normal(v.shape)).astype(np.float32) for n, v in w.items()}
        res = s.aggregate(h.context(t, 5), w, mean, state)
        assert res.metrics["explore"] == 0 and "setup" not in res.metrics
        for n in NAMES:
            np.testing.assert_array_equal(res.weights[n] != 0, masks[n])  # exactly zero off-mask, same mask
            np.testing.assert_allclose(res.weights[n][masks[n]], w[n][masks[n]] + mean[n][masks[n]], rtol=1e-6)
        w, state = res.weights, res.state


def test_task_params_and_aux_uploads_follow_the_phase(h: Any) -> None:
    # Kills: agents not told to explore (or told to after it), the upload not sized for
    # every parameter, or aux uploads still expected from training rounds.
    s = AutoFLIP(explore_rounds=2, explore_epochs=7, patience=2, val_fraction=0.2, seed=5)
    w = h.weights_of()
    params = [s.task_params(r, w, {}) for r in range(1, 5)]
    json.dumps(params)
    assert params[0] == params[1] == {"explore": {"epochs": 7, "patience": 2, "val_fraction": 0.2, "seed": 5}}
    assert params[2] == params[3] == {"pruned": True}
    shapes = s.aux_shapes(1, w, {})
    assert {k: v for k, v in shapes.items() if k.startswith("aux/sq/")} == {sq_key(n): w[n].shape for n in w}
    assert s.aux_shapes(3, w, {}) == {}


def test_a_round_without_scouts_never_prunes_blindly(h: Any) -> None:
    # Kills: pruning by all-zero guidance (an arbitrary 30%) when no scout reported (the
    # service's mean over no upload is zeros of every aux shape).
    w = h.weights_of()
    s = AutoFLIP()
    ctx = dataclasses.replace(h.context(1, 5, participants=0),
                              aux={k: np.zeros(v, np.float32) for k, v in s.aux_shapes(1, w, {}).items()})
    with pytest.raises(ValueError, match="no scout"):
        s.aggregate(ctx, w, {}, {})


# ------------------------------------------------------------------ agent: the scout
def _explore_task(h: Any, **explore: Any) -> Any:
    spec = {"epochs": 3, "patience": 1, "val_fraction": 0.25, "seed": 0, **explore}
    return h.task_for("autoflip", {"explore": spec}, batch_size=16, lr=0.05, upload_values="fp16")


def test_scout_uploads_its_squared_displacement_and_work_in_fp32_and_no_delta(h: Any) -> None:
    # Kills: a scout that uploads a delta (the global model would move, the residual would
    # fill), squares encoded at the task's fp16 (small moves underflow to 0), a parameter
    # left unscored, or work figures that are not what ran.
    w0 = h.weights_of()
    task = _explore_task(h, epochs=2)
    feedback = ErrorFeedback()
    result = run_task(task, w0, make_synthetic(80, seed=1), feedback)
    sent = decode(result.body).to_dense()
    assert set(sent) == {sq_key(n) for n in w0} | {work_key(k) for k in WORK_KEYS}  # aux only
    for n in w0:
        np.testing.assert_array_equal(sent[sq_key(n)], result.delta.to_dense()[sq_key(n)])  # fp32: exact
        assert (sent[sq_key(n)] >= 0).all() and sent[sq_key(n)].any()
    assert not feedback.residual  # the residual waits for a training round
    assert result.report.num_samples == 60  # the train split (80 less 25% held out) weighs the scout
    assert sent[work_key("steps")][0] == sent[work_key("epochs")][0] * 4  # ceil(60 / 16) steps per epoch
    assert 1 <= sent[work_key("epochs")][0] <= 2


def test_scout_squares_are_the_numpy_oracle_of_its_own_training(h: Any) -> None:
    # Kills: squares of something other than θ_k − θ₀ (the delta with a residual, θ_k
    # itself, |θ_k − θ₀|), and a scout trained on the held-out samples too.
    w0 = h.weights_of()
    data = make_synthetic(40, seed=2)
    model = build_from_state("lenet5", w0, in_channels=1, num_classes=10)
    hooks = h.task_hooks(_explore_task(h, epochs=1), model, w0, data)
    assert hooks.fit is not None and hooks.aux is not None and not hooks.upload_delta
    stats = hooks.fit(model, data, optimizer=torch.optim.SGD(model.parameters(), lr=0.05), epochs=9, batch_size=8,
                      seed=0)
    assert stats.samples == 30 and stats.steps == 4  # one scout epoch over 30 train samples, not the task's 9
    aux = hooks.aux()
    local = to_numpy_state(model)
    for n in w0:
        np.testing.assert_array_equal(aux[sq_key(n)], (local[n] - w0[n]) ** 2)
    assert aux[work_key("epochs")][0] == 1 and aux[work_key("best_epoch")][0] == 1


def test_agent_after_step_keeps_pruned_weights_at_zero(h: Any) -> None:
    # Kills: a training-round hook that does not re-apply the mask after every step.
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


def _pruned_start(h: Any) -> Weights:
    w0 = h.weights_of()
    final, _ = _explore(h, AutoFLIP(q=0.3), w0, [(_displacements(w0, np.random.default_rng(0), 2, 0.05), [1, 1])])
    return dict(final.weights)


def test_uploads_after_pruning_respect_the_mask(h: Any) -> None:
    # Kills: training-round uploads of pruned coordinates.
    w1 = _pruned_start(h)
    task = h.task_for("autoflip", {"pruned": True}, rnd=2, max_steps=3, upload_density=1.0, upload_values="fp16")
    delta = run_task(task, w1, make_synthetic(96, seed=1), ErrorFeedback()).delta.to_dense()
    for n in NAMES:
        assert (delta[n][w1[n] == 0] == 0).all()  # nothing uploaded off the mask
        assert (delta[n][w1[n] != 0] != 0).mean() > 0.2


def test_autoflip_federation_end_to_end(coordinator: TestClient, make_agent: Callable[[int], EdgeAgent], h: Any) -> None:
    # Kills: the exploration phase failing over the real protocol (aux validation, the
    # fp32 body, setup-round bookkeeping) or its work missing from the round metrics.
    agents = [make_agent(0), make_agent(1)]
    fid = h.create_started(coordinator, rounds=2, strategy={"name": "autoflip", "params": {
        "explore_rounds": 1, "q": 0.3, "explore_epochs": 3}},
        training={"batch_size": 32, "lr": 0.05, "max_steps": 4, "upload_values": "fp16"})
    rows = h.run_federation(coordinator, fid, agents, max_tasks=3)
    assert [r["explore"] for r in rows] == [1, 0, 0] and rows[0]["setup"] == 1
    assert 1 <= rows[0]["explore_epochs"] <= 3 and 0 < rows[0]["explore_steps"] <= 4  # max_steps caps a scout too
    assert [r["density"] for r in rows] == [pytest.approx(0.7, abs=1e-4)] * 3
    models = [decode(coordinator.get(f"/v1/federations/{fid}/models/{v}", headers=h.ADMIN).content).to_dense()
              for v in (0, 1, 3)]
    for n in NAMES:
        kept = models[1][n] != 0
        np.testing.assert_array_equal(models[1][n][kept], models[0][n][kept])  # θ₀ ⊙ m: exploration moved nothing
        np.testing.assert_array_equal(kept, models[2][n] != 0)  # the mask held
    held = agents[1].sync_model(fid, 3)
    assert density_of(held, NAMES) == pytest.approx(0.7, abs=1e-4)


def test_second_moment_no_longer_needed() -> None:
    # Kills: the service still folding every round's squares for AutoFLIP (an O(model)
    # accumulator the scouts' aux uploads replaced).
    assert AutoFLIP.wants_second_moment is False


def test_guidance_of_one_round_is_the_papers_formula(h: Any) -> None:
    # Kills: the federation's guidance drifting from `guidance_scores` on explored models
    # (equal sample counts: the sample-weighted mean is the paper's plain mean over scouts).
    w0 = h.weights_of()
    ds = _displacements(w0, np.random.default_rng(1), 3, 0.05)
    aux = _scout_round(w0, ds, [50, 50, 50], 1)
    ours = minmax_scores({n: aux[sq_key(n)] for n in NAMES}, NAMES)
    paper = guidance_scores({n: torch.from_numpy(w0[n]) for n in NAMES},
                            [{n: torch.from_numpy(w0[n] + d[n]) for n in NAMES} for d in ds])
    for n in NAMES:
        np.testing.assert_allclose(ours[n], paper[n].numpy(), atol=1e-4)
