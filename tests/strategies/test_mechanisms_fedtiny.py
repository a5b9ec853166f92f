"""FedTiny's adaptive BN selection, checked against an oracle built from first principles
(the batch moments BN sees in a forward pass of the *masked* candidate), so that each of
these broken agents fails a test:

- re-estimating BN on the unmasked model (`_bn_statistics` recalibrating `model`, not
  the masked candidate): the statistics of layers after a pruned conv are wrong;
- not re-estimating at all (uploading the global model's running statistics);
- ignoring the averaged BN in the select phase (evaluating with the global statistics).

The model is resnet20 (BN after every conv); the local data fits one statistics batch,
so the oracle's moments are exactly what `recalibrate_bn` must produce.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from models import ImageDataset, make_synthetic
from models.state import build_from_state
from models.training import iterate_batches
from pruning.masks import apply_masks
from strategies.fedtiny.ops import fedtiny_weight_names, pool_from_state

POOL = {"k": 2, "density": 0.2, "seed": 4}
N = 48  # ≤ the agent's statistics batch (64): one batch, so the moments are exact


def _global_weights(h: Any) -> dict[str, np.ndarray]:
    """resnet20 weights whose BN running statistics are far from any data's moments, so an
    agent that uploads (or evaluates with) them instead of fresh ones is visible."""
    w = h.weights_of("resnet20", seed=1)
    for k in w:
        if k.endswith("running_mean"):
            w[k] = np.full_like(w[k], 3.0)
        elif k.endswith("running_var"):
            w[k] = np.full_like(w[k], 9.0)
    return w


def _model(w: dict[str, np.ndarray], masks: dict[str, np.ndarray] | None) -> nn.Module:
    model = build_from_state("resnet20", w, in_channels=1, num_classes=10)
    if masks is not None:
        apply_masks(model, {n: torch.from_numpy(m) for n, m in masks.items()})
    return model


def _batch(data: ImageDataset) -> tuple[torch.Tensor, torch.Tensor]:
    return next(iterate_batches(data, len(data)))


@torch.no_grad()
def _oracle_bn(model: nn.Module, x: torch.Tensor) -> dict[str, np.ndarray]:
    """Per BN layer, the mean and unbiased variance over (N, H, W) of its input in a
    train-mode forward pass (each BN normalising by its batch moments, as recalibration runs)."""
    moments: dict[str, np.ndarray] = {}
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            def hook(_m: nn.Module, inp: tuple[torch.Tensor, ...], _out: torch.Tensor, name: str = name) -> None:
                a = inp[0].double()  # (B, C, H, W)
                moments[f"{name}.running_mean"] = a.mean((0, 2, 3)).numpy()
                moments[f"{name}.running_var"] = a.var((0, 2, 3), unbiased=True).numpy()
            handles.append(m.register_forward_hook(hook))
    model.train()
    try:
        model(x)
    finally:
        for handle in handles:
            handle.remove()
    return moments


def _pool(w: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    names = fedtiny_weight_names(_model(w, None))
    return pool_from_state(w, names, POOL["density"], POOL["k"], POOL["seed"])


def test_bn_phase_uploads_each_masked_candidates_fresh_statistics(h: Any) -> None:
    w = _global_weights(h)
    data = make_synthetic(N, seed=2)
    x, _ = _batch(data)
    task = h.task_for("fedtiny", {"phase": "bn", "pool": POOL}, model="resnet20")
    hooks = h.task_hooks(task, _model(w, None), w, data)
    assert hooks.train is False and hooks.aux is not None
    up = hooks.aux()
    unmasked = _oracle_bn(_model(w, None), x)
    for c, masks in enumerate(_pool(w)):
        expect = _oracle_bn(_model(w, masks), x)
        got = {k.split("/", 3)[3]: v for k, v in up.items() if k.startswith(f"aux/bn/{c}/")}
        assert set(got) == set(expect)
        for k, v in expect.items():
            np.testing.assert_allclose(got[k], v, rtol=2e-4, atol=1e-5, err_msg=k)
        # the mask changes the statistics (else recalibrating the unmasked model would pass)
        gap = max(float(np.max(np.abs(unmasked[k] - v) / (np.abs(v) + 1e-3))) for k, v in expect.items())
        assert gap > 0.05


def test_select_phase_evaluates_each_candidate_with_the_averaged_statistics(h: Any) -> None:
    w = _global_weights(h)
    data = make_synthetic(N, seed=2)
    x, y = _batch(data)
    pool = _pool(w)
    # what the server would send: statistics of each candidate measured on other data
    other, _ = _batch(make_synthetic(N, seed=7, split="test"))
    averaged = [_oracle_bn(_model(w, masks), other) for masks in pool]
    params = {"phase": "select", "pool": POOL,
              "bn": {str(c): {k: v.tolist() for k, v in s.items()} for c, s in enumerate(averaged)}}
    task = h.task_for("fedtiny", params, model="resnet20")
    hooks = h.task_hooks(task, _model(w, None), w, data)
    assert hooks.train is False and hooks.aux is not None
    losses = hooks.aux()["aux/loss"]
    for c, masks in enumerate(pool):
        model = _model(w, masks)
        with torch.no_grad():
            own = float(nn.functional.cross_entropy(model.eval()(x), y))  # the global model's statistics
            for k, v in averaged[c].items():
                model.get_buffer(k).copy_(torch.from_numpy(v))
            expect = float(nn.functional.cross_entropy(model.eval()(x), y))
        assert losses[c] == pytest.approx(expect, rel=1e-4)
        assert abs(own - expect) > 0.05 * abs(expect)  # ignoring the averaged BN would show


def test_a_training_round_without_gradient_tops_leaves_the_masks_alone(h: Any) -> None:
    """Survivor of bench.mutants (the server's default for a missing ``aux/grow``): a
    round that closes with no statistics for the planned layer grows and drops nothing."""
    import dataclasses

    from strategies.fedtiny.server import FedTiny

    w = h.weights_of("lenet5")
    s = FedTiny(density=0.2, pool_size=2, every=1, t_end=4)
    sel = s.aggregate(dataclasses.replace(h.context(1, 5), aux={"aux/loss": np.array([1.0, 2.0], np.float32)}),
                      w, {}, {})
    assert s.task_params(2, sel.weights, sel.state)["grow"]  # a layer is planned this round
    res = s.aggregate(dataclasses.replace(h.context(2, 5), aux={}), sel.weights, {}, sel.state)
    assert res.metrics["mask_changes"] == 0
    for k, v in sel.state.items():
        if k.startswith("mask/"):
            np.testing.assert_array_equal(res.state[k], v)


def test_gradient_tops_of_a_single_step_are_that_steps_gradient() -> None:
    """Survivor of bench.mutants (the step count's floor of 1): after one backward, the
    tops are exactly the largest |grad| at pruned positions, not a fraction of them."""
    from strategies.fedtiny.ops import PrunedGradientTopK

    torch.manual_seed(0)
    model = nn.Linear(6, 5, bias=False)
    mask = torch.from_numpy(np.random.default_rng(0).random((5, 6)) < 0.5)
    with PrunedGradientTopK(model, {"weight": mask}, {"weight": 4}) as tops:
        model(torch.randn(3, 6)).square().sum().backward()
    idx, val = tops.result()["weight"]
    g = model.weight.grad.flatten()
    pruned = torch.nonzero(~mask.flatten()).flatten()
    expect = pruned[torch.argsort(g[pruned].abs(), descending=True)[:4]]
    assert idx.tolist() == expect.tolist()
    torch.testing.assert_close(val, g[expect])
