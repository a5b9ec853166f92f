"""Structured pruning's server half measures every pruning step against the *dense*
model's MACs, carried in its state across the rounds that do not prune (a survivor of
bench.mutants renamed that state key unnoticed: the next step then measured against the
already pruned model and pruned far too little)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from models import count_macs
from models.state import build_from_state
from strategies import build_strategy


def test_dense_macs_survive_a_round_without_pruning(h: Any) -> None:
    s = build_strategy("structured", {"target_macs": 0.5, "prune_steps": 2, "every": 2, "round_to": 2})
    w = h.weights_of("lenet5")
    dense = float(count_macs(build_from_state("lenet5", w, in_channels=1, num_classes=10), (1, 28, 28)))
    zero = {k: np.zeros_like(v) for k, v in w.items()}

    r1 = s.aggregate(h.context(1, 5), w, zero, {})  # step 0
    assert r1.structure_changed and float(r1.state["dense_macs"][0]) == dense
    r2 = s.aggregate(h.context(2, 5), r1.weights, {k: np.zeros_like(v) for k, v in r1.weights.items()}, r1.state)
    assert not r2.structure_changed
    assert float(r2.state["dense_macs"][0]) == dense  # carried, not re-measured on the pruned model
    r3 = s.aggregate(h.context(3, 5), r2.weights, {k: np.zeros_like(v) for k, v in r2.weights.items()}, r2.state)

    final = float(count_macs(build_from_state("lenet5", r3.weights, in_channels=1, num_classes=10), (1, 28, 28)))
    assert r3.metrics["dense_macs"] == dense
    assert final <= 0.5 * dense * 1.05  # the last step reaches the target of the dense model
    assert final == pytest.approx(0.5 * dense, rel=0.25)
