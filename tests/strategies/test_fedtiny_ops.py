"""FedTiny: candidate pool densities, BN recalibration and averaging, top-k gradients at
pruned positions, prune-and-grow."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from models import build_model, evaluate, make_synthetic, train_epochs
from models.training import iterate_batches
from pruning import apply_masks, magnitude_masks, mask_density, prunable_weights
from strategies.fedtiny.ops import (
    PrunedGradientTopK,
    average_bn_stats,
    average_gradient_tops,
    candidate_pool,
    grow_counts,
    load_bn_stats,
    prune_and_grow,
    recalibrate_bn,
    topk_pruned_gradients,
)


def test_candidate_pool_layer_densities_and_global_tolerance() -> None:
    model = build_model("resnet20", in_channels=3)
    weights = prunable_weights(model, include_first=False)
    pool = candidate_pool(weights, 0.1, 4, np.random.default_rng(0))
    assert len(pool) == 4 and "conv1.weight" not in pool[0]  # first layer stays dense
    for masks in pool:
        assert abs(mask_density(masks) - 0.1) <= 0.02 * 0.1
        for name, m in masks.items():
            d = float(m.float().mean())
            assert d > 0 and 0.05 - 1e-3 <= d <= 0.15 + 1e-3  # target·(1 ± 0.5)
            kept = weights[name].detach().abs()[m]
            dropped = weights[name].detach().abs()[~m]
            assert kept.min() >= dropped.max()  # magnitude pruning per layer
    assert not all(torch.equal(pool[0][n], pool[1][n]) for n in pool[0])  # candidates differ


def _small_bn_cnn() -> nn.Module:
    """conv-BN-ReLU ×2 + linear: small enough to train in a second on 14×14 inputs."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 7 * 7, 10),
    )


def test_bn_recalibration_lowers_loss_of_pruned_model() -> None:
    data = make_synthetic(256, image_size=14, seed=3)
    model = _small_bn_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    train_epochs(model, data, optimizer=opt, batch_size=32, epochs=2)
    assert evaluate(model, data).accuracy > 0.5  # it learned something worth keeping
    masks = magnitude_masks(prunable_weights(model, include_first=False), 0.2)
    apply_masks(model, masks)  # BN statistics are now stale for the pruned weights
    stale = evaluate(model, data).loss
    stats = recalibrate_bn(model, (x for x, _ in iterate_batches(data, 64)))
    recalibrated = evaluate(model, data).loss
    assert recalibrated < 0.9 * stale
    assert set(stats) == {k for k in model.state_dict() if k.endswith(("running_mean", "running_var"))}
    assert torch.equal(stats["1.running_mean"], model[1].running_mean)
    assert model[1].momentum == 0.1 and not model.training  # restored (evaluate left it in eval)


def test_recalibration_is_the_mean_of_batch_statistics() -> None:
    bn_model = nn.Sequential(nn.BatchNorm2d(2))
    batches = [torch.randn(8, 2, 4, 4) * s + s for s in (1.0, 3.0)]
    stats = recalibrate_bn(bn_model, batches)
    batch_means = torch.stack([b.mean(dim=(0, 2, 3)) for b in batches])
    batch_vars = torch.stack([b.var(dim=(0, 2, 3), unbiased=True) for b in batches])
    assert torch.allclose(stats["0.running_mean"], batch_means.mean(0), atol=1e-5)
    assert torch.allclose(stats["0.running_var"], batch_vars.mean(0), atol=1e-4)


def test_average_bn_stats_weights_by_samples_and_loads() -> None:
    a = {"bn.running_mean": torch.tensor([0.0, 1.0]), "bn.running_var": torch.tensor([1.0, 1.0])}
    b = {"bn.running_mean": torch.tensor([4.0, 1.0]), "bn.running_var": torch.tensor([3.0, 5.0])}
    avg = average_bn_stats([(a, 30), (b, 10)])
    assert torch.allclose(avg["bn.running_mean"], torch.tensor([1.0, 1.0]))
    assert torch.allclose(avg["bn.running_var"], torch.tensor([1.5, 2.0]))
    model = nn.Module()
    model.bn = nn.BatchNorm2d(2)
    load_bn_stats(model, avg)
    assert torch.equal(model.bn.running_var, avg["bn.running_var"])


def test_topk_pruned_gradients_only_at_pruned_positions() -> None:
    grads = {"w": torch.tensor([9.0, -8.0, 0.5, -3.0, 2.0, 7.0])}
    masks = {"w": torch.tensor([True, False, False, False, False, True])}
    idx, val = topk_pruned_gradients(grads, masks, {"w": 2})["w"]
    assert sorted(idx.tolist()) == [1, 3]  # 9 and 7 are at kept positions: never sent
    assert sorted(val.tolist()) == [-8.0, -3.0]


def test_streaming_topk_matches_exact_top_when_gradients_agree() -> None:
    # Oracle: with a constant gradient direction the running buffer equals the top-n of the
    # epoch-summed dense gradient.
    model = nn.Linear(20, 5, bias=False)
    masks = {"weight": torch.rand(5, 20) < 0.3}
    x = torch.randn(1, 20)
    row_scale = torch.arange(1.0, 6.0)  # distinct |grad| entries: no ties in the top-k
    n_grow = {"weight": 6}
    with PrunedGradientTopK(model, masks, n_grow) as tops:
        for _ in range(3):
            model.zero_grad()
            (model(x) * row_scale).sum().backward()
    got = tops.result()["weight"]
    model.zero_grad()
    (model(x) * row_scale).sum().backward()
    assert model.weight.grad is not None
    exact = topk_pruned_gradients({"weight": model.weight.grad}, masks, n_grow)["weight"]
    assert sorted(got[0].tolist()) == sorted(exact[0].tolist())
    assert torch.allclose(got[1].abs().sort().values, exact[1].abs().sort().values)
    assert len(model.weight._post_accumulate_grad_hooks or {}) == 0  # hooks removed


def test_prune_and_grow_keeps_density_and_grows_exactly_the_top_gradients() -> None:
    w = torch.tensor([5.0, 0.0, 0.1, 0.0, 3.0, 0.0, 0.2, 0.0])
    mask = w != 0  # active: 0, 2, 4, 6
    weights, masks = {"w": w}, {"w": mask}
    tops = average_gradient_tops([
        {"w": (torch.tensor([1, 3, 5]), torch.tensor([0.1, -2.0, 1.0]))},
        {"w": (torch.tensor([3, 7]), torch.tensor([-2.0, 0.5]))},
    ])
    n = grow_counts(masks, 0.5)
    assert n == {"w": 2}  # ceil(0.5 · 4 nonzeros)
    new_masks, new_weights = prune_and_grow(weights, masks, tops, n)
    assert new_masks["w"].sum() == mask.sum()  # density constant
    assert new_masks["w"].tolist() == [True, False, False, True, True, True, False, False]
    assert new_weights["w"].tolist() == [5.0, 0.0, 0.0, 0.0, 3.0, 0.0, 0.0, 0.0]  # grown = 0
    assert torch.equal(masks["w"], mask)  # inputs untouched


def test_grow_counts_cosine_rate() -> None:
    masks = {"a": torch.tensor([True] * 10 + [False] * 90), "b": torch.tensor([True] * 3 + [False])}
    assert grow_counts(masks, 0.1) == {"a": 1, "b": 1}
    assert grow_counts(masks, 0.25) == {"a": 3, "b": 1}  # b: capped at its 1 pruned slot
    assert grow_counts(masks, 0.0) == {"a": 0, "b": 0}


@pytest.mark.parametrize("rate", [0.05, 0.2])
def test_prune_and_grow_on_a_model_preserves_layer_density(rate: float) -> None:
    model = build_model("lenet5")
    weights = {n: w.detach() for n, w in prunable_weights(model).items()}
    masks = magnitude_masks(weights, 0.2)
    grads = {n: torch.randn_like(w) for n, w in weights.items()}
    n_grow = grow_counts(masks, rate)
    tops = topk_pruned_gradients(grads, masks, n_grow)
    new_masks, new_weights = prune_and_grow(weights, masks, tops, n_grow)
    for name in masks:
        assert int(new_masks[name].sum()) == int(masks[name].sum())
        grown = new_masks[name] & ~masks[name]
        assert int(grown.sum()) == n_grow[name]
        assert set(grown.flatten().nonzero().flatten().tolist()) == set(tops[name][0].tolist())
        assert not new_weights[name][~new_masks[name]].any()
