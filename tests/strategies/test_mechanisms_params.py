"""Survivors of bench.mutants in the strategies' constructors and memory estimates: each
bound is refused on its own (not only together with another), the boundary values are
accepted, and AutoFLIP's pruned phase declares the memory of its masks."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from models import make_synthetic
from models.state import build_from_state
from pruning.masks import masks_from_zeros
from strategies import build_strategy
from strategies.base import largest_bytes, masks_bytes


@pytest.mark.parametrize(("name", "params"), [
    ("dynamic", {"server_lr": 0.0}),  # alone: `or` of the three bounds, not `and`
    ("dynamic", {"finetune_rounds": -1}),
    ("dynamic", {"round_to": 0}),
    ("feddip", {"lam_steps": 0}),
    ("feddip", {"server_lr": 0.0}),
])
def test_each_bound_is_refused_alone(name: str, params: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        build_strategy(name, params)


@pytest.mark.parametrize(("name", "params"), [
    ("feddip", {"lam_steps": 1, "lam_max": 0.0}),  # one step, and no regulariser, are valid
    ("dynamic", {"finetune_rounds": 0, "round_to": 1}),
])
def test_boundary_values_are_accepted(name: str, params: dict[str, Any]) -> None:
    build_strategy(name, params)


def test_autoflip_pruned_phase_declares_its_masks_memory(h: Any) -> None:
    w = h.weights_of("lenet5", seed=2)
    w = {k: np.where(np.random.default_rng(0).random(v.shape) < 0.3, v, np.float32(0)) if k.endswith("weight")
         else v for k, v in w.items()}
    model = build_from_state("lenet5", w, in_channels=1, num_classes=10)
    hooks = h.task_hooks(h.task_for("autoflip", {"pruned": True}), model, w, make_synthetic(8, seed=0))
    masks = masks_from_zeros(build_from_state("lenet5", w, in_channels=1, num_classes=10), w)
    assert hooks.extra_memory_bytes == masks_bytes(masks) + largest_bytes(masks) > 0
