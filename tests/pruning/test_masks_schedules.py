"""Masks (prunable set, magnitude, ERK, apply, density) and the pure schedules."""

from __future__ import annotations

import math

import pytest
import torch

from models import build_model
from pruning import (
    CosineGrowRate,
    CubicSparsity,
    IncrementalLambda,
    apply_masks,
    erk_densities,
    is_reconfiguration_round,
    magnitude_masks,
    mask_density,
    prunable_weights,
    random_erk_masks,
)


def test_prunable_weights_are_conv_and_linear_weights_only() -> None:
    model = build_model("resnet20", in_channels=3)
    names = list(prunable_weights(model))
    assert names[0] == "conv1.weight" and names[-1] == "fc.weight"
    assert all(n.endswith(".weight") and "bn" not in n for n in names)
    assert len(names) == 19 + 2 + 1  # 19 3×3 convs, 2 shortcut convs, fc
    inner = prunable_weights(model, include_first=False, include_last=False, exclude=("shortcut",))
    assert "conv1.weight" not in inner and "fc.weight" not in inner
    assert not any("shortcut" in n for n in inner) and len(inner) == 18


def test_layer_magnitude_masks_keep_exactly_the_largest() -> None:
    w = {"a": torch.tensor([[0.1, -5.0], [3.0, -0.2]]), "b": torch.arange(10.0)}
    masks = magnitude_masks(w, 0.5)
    assert masks["a"].tolist() == [[False, True], [True, False]]
    assert masks["b"].tolist() == [False] * 5 + [True] * 5


def test_global_magnitude_masks_use_one_threshold() -> None:
    w = {"small": torch.full((10,), 0.01), "big": torch.linspace(1, 2, 10)}
    masks = magnitude_masks(w, 0.5, scope="global")
    assert int(masks["small"].sum()) == 0 and bool(masks["big"].all())
    assert mask_density(masks) == 0.5


def test_erk_densities_hit_the_overall_density_and_favour_small_layers() -> None:
    shapes = {"conv1": (16, 3, 3, 3), "conv2": (64, 64, 3, 3), "fc": (10, 1024)}
    for density in (0.05, 0.3, 0.5):
        d = erk_densities(shapes, density)
        kept = sum(d[n] * math.prod(s) for n, s in shapes.items())
        assert kept == pytest.approx(density * sum(math.prod(s) for s in shapes.values()))
        assert all(0 < v <= 1 for v in d.values())
        # ERK: density ∝ (Σ dims / Π dims) among the layers that are not made dense.
        raw = {n: sum(s) / math.prod(s) for n, s in shapes.items()}
        assert d["conv2"] / raw["conv2"] == pytest.approx(d["fc"] / raw["fc"]) or d["fc"] == 1.0
    assert erk_densities(shapes, 0.5)["conv1"] == 1.0  # would exceed 1: made dense


def test_random_erk_masks_and_apply() -> None:
    model = build_model("lenet5")
    weights = prunable_weights(model)
    masks = random_erk_masks(weights, 0.5, generator=torch.Generator().manual_seed(1))
    assert mask_density(masks) == pytest.approx(0.5, abs=0.002)
    apply_masks(model, masks)
    nonzero = sum(int(torch.count_nonzero(w)) for n, w in prunable_weights(model).items() if n in masks)
    assert nonzero / sum(m.numel() for m in masks.values()) == pytest.approx(mask_density(masks), abs=1e-9)
    for name, w in prunable_weights(model).items():
        assert not w[~masks[name]].any()  # every pruned entry is zero


def test_cubic_schedule_values() -> None:
    s = CubicSparsity(total_rounds=100, initial=0.5, final=0.95)
    assert s(0) == 0.5 and s(100) == pytest.approx(0.95) and s(500) == pytest.approx(0.95)
    assert s(50) == pytest.approx(0.95 + (0.5 - 0.95) * 0.5**3)
    values = [s(t) for t in range(101)]
    assert all(a <= b for a, b in zip(values, values[1:], strict=False))  # monotone
    assert s.density(50) == pytest.approx(1 - s(50))


def test_incremental_lambda_rises_in_20_equal_steps() -> None:
    lam = IncrementalLambda(total_rounds=200, lam_max=1e-3)
    values = [lam(t) for t in range(201)]
    assert values[0] == 0.0 and values[-1] == pytest.approx(1e-3)
    levels = sorted(set(values))
    assert len(levels) == 21  # 0 and 20 steps
    assert all(b - a == pytest.approx(5e-5) for a, b in zip(levels, levels[1:], strict=False))
    assert lam(9) == 0.0 and lam(10) == pytest.approx(5e-5)  # a step every T/20 = 10 rounds


def test_cosine_grow_rate() -> None:
    rate = CosineGrowRate(end_round=100, initial=0.1)
    assert rate(0) == pytest.approx(0.1) and rate(50) == pytest.approx(0.05)
    assert rate(100) == 0.0 and rate(150) == 0.0
    assert rate(25) > rate(75) > 0


@pytest.mark.parametrize(
    ("every", "until", "expected"),
    [
        (5, None, (5, 10, 15)),  # FedDIP: every R rounds, not round 0
        (10, 20, (10, 20)),  # FedTiny: every ΔT until T_end inclusive
    ],
)
def test_reconfiguration_rounds(every: int, until: int | None, expected: tuple[int, ...]) -> None:
    rounds = tuple(t for t in range(25) if is_reconfiguration_round(t, every=every, until=until))
    assert rounds[: len(expected)] == expected
    assert not is_reconfiguration_round(0, every=every)
