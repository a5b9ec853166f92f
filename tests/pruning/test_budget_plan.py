"""The budget planner's policy on made-up estimates: no model, no torch tensors, exact
numbers (`plan_within` takes the estimate as a callable)."""

from __future__ import annotations

import pytest

from edge_agent.budget.plan import plan_within
from edge_agent.budget.sizes import BudgetExceeded, MemoryEstimate

# three freezable units in forward order; freezing one saves its share of the working set
UNITS = [("conv1", ("conv1.weight",)), ("conv2", ("conv2.weight",)), ("fc", ("fc.weight", "fc.bias"))]
PER_SAMPLE = {"conv1": 40, "conv2": 20, "fc": 4}  # bytes per sample each unit costs unfrozen


def fake_estimate(batch: int, frozen: tuple[str, ...]) -> MemoryEstimate:
    frozen_units = {name for name, params in UNITS if set(params) <= set(frozen)}
    activations = batch * sum(b for name, b in PER_SAMPLE.items() if name not in frozen_units)
    return MemoryEstimate(batch_size=batch, params_bytes=100, grads_bytes=0, optimizer_bytes=0,
                          activations_bytes=activations, input_bytes=0, workspace_bytes=0)


def test_largest_batch_that_fits_never_above_preferred() -> None:
    # 64 per sample + 100: batch 16 needs 1124, batch 8 needs 612
    plan = plan_within(1000, fake_estimate, lambda: UNITS, batch_sizes=(32, 16, 8, 4), preferred_batch=32)
    assert (plan.batch_size, plan.frozen, plan.estimate.total) == (8, (), 612)
    assert plan_within(10**9, fake_estimate, lambda: UNITS, preferred_batch=64).batch_size == 64


def test_units_are_asked_for_only_when_nothing_fits_unfrozen() -> None:
    def units() -> list[tuple[str, tuple[str, ...]]]:
        raise AssertionError("freezable units needed although a batch fits")

    assert plan_within(10**9, fake_estimate, units).frozen == ()


def test_freezes_the_fewest_leading_units() -> None:
    # batch 4 unfrozen: 356 > 300; conv1 frozen: 100 + 4·24 = 196 fits, then batch 8 = 292 fits too
    plan = plan_within(300, fake_estimate, lambda: UNITS, batch_sizes=(16, 8, 4), preferred_batch=16)
    assert plan.frozen == ("conv1.weight",) and plan.batch_size == 8


def test_refuses_with_what_would_fit() -> None:
    with pytest.raises(BudgetExceeded) as info:
        plan_within(110, fake_estimate, lambda: UNITS, batch_sizes=(4,), preferred_batch=4)
    err = info.value
    # the most it may freeze is all but the last unit: 100 + 4·4 = 116 > 110
    assert (err.needed_bytes, err.batch_size, err.frozen) == (116, 4, ("conv1.weight", "conv2.weight"))
    assert "frozen but fc" in str(err) and "budget 110 B" in str(err)
    with pytest.raises(BudgetExceeded) as no_freeze:
        plan_within(110, fake_estimate, lambda: UNITS, batch_sizes=(4,), preferred_batch=4, allow_freeze=False)
    assert no_freeze.value.frozen == () and no_freeze.value.needed_bytes == 356
