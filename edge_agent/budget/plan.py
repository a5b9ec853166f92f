"""Plan local training within a budget. The policy (`plan_within`) is a pure function of
an estimate callable and the model's freezable units, testable with made-up numbers;
`plan_training` wires it to the real estimate for a model."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from edge_agent.budget.sizes import BudgetExceeded, MemoryEstimate, format_size

if TYPE_CHECKING:
    from torch import nn

    from models.memory import OptimizerName

__all__ = ["Estimate", "TrainingPlan", "Units", "plan_training", "plan_within", "shrunk_batch", "with_hooks",
           "with_optimizer_state"]


@dataclass(frozen=True)
class TrainingPlan:
    """How to train within a budget: batch size, frozen parameter names, and the estimate."""

    batch_size: int
    frozen: tuple[str, ...]
    estimate: MemoryEstimate

    def apply(self, model: nn.Module) -> None:
        """Set requires_grad=False on the frozen parameters (build the optimizer after this,
        over `p for p in model.parameters() if p.requires_grad`)."""
        frozen = set(self.frozen)
        for name, p in model.named_parameters():
            p.requires_grad_(name not in frozen)


# (batch size, frozen parameter names) → the estimated working set
Estimate = Callable[[int, tuple[str, ...]], MemoryEstimate]
# freezable units in forward order: (module name, its parameters' full names)
Units = Sequence[tuple[str, tuple[str, ...]]]


def with_hooks(estimate: Estimate, hooks_bytes: int | Callable[[tuple[str, ...]], int]) -> Estimate:
    """`estimate` plus the strategy hooks' own training memory (`LocalHooks.extra_memory_bytes`,
    or `extra_memory_frozen`: bytes as a function of the frozen names), so the plan is made
    for the training that will run, not for the plain model."""
    if isinstance(hooks_bytes, int) and hooks_bytes < 0:
        raise ValueError(f"hooks_bytes must be >= 0, got {hooks_bytes}")

    def estimate_with_hooks(batch: int, frozen: tuple[str, ...]) -> MemoryEstimate:
        extra = hooks_bytes(frozen) if callable(hooks_bytes) else hooks_bytes
        return replace(estimate(batch, frozen), hooks_bytes=extra)

    return estimate_with_hooks


def with_optimizer_state(estimate: Estimate, optimizer_memory: Callable[[tuple[str, ...]], tuple[int, int]]) -> Estimate:
    """`estimate` with the (gradients, optimizer state) bytes the hooks' own optimizer holds
    (FedTiny's KeptSGD: both at kept coordinates only) instead of the dense counts."""

    def estimate_with_state(batch: int, frozen: tuple[str, ...]) -> MemoryEstimate:
        grads, state = optimizer_memory(frozen)
        return replace(estimate(batch, frozen), grads_bytes=grads, optimizer_bytes=state)

    return estimate_with_state


def shrunk_batch(batch: int, measured_bytes: int, budget_bytes: int, *, min_batch: int = 4) -> int | None:
    """The re-plan after the first steps: half the batch (never below `min_batch`) when the
    measured peak is over the budget; None when it is within, or the batch cannot shrink."""
    if measured_bytes <= budget_bytes or batch <= min_batch:
        return None
    return max(min_batch, batch // 2)


def plan_training(
    model: nn.Module,
    input_shape: Sequence[int],
    budget_bytes: int,
    *,
    batch_sizes: Iterable[int] = (128, 64, 32, 16, 8, 4),
    preferred_batch: int = 64,
    optimizer: OptimizerName = "sgd_momentum",
    allow_freeze: bool = True,
    hooks_bytes: int | Callable[[tuple[str, ...]], int] = 0,
    optimizer_memory: Callable[[tuple[str, ...]], tuple[int, int]] | None = None,
) -> TrainingPlan:
    """Plan one agent's local training within `budget_bytes` of working set.

    1. The largest batch ≤ `preferred_batch` (from `batch_sizes`) whose estimate fits.
    2. If none fits even at the smallest batch, freeze the fewest leading layers (in forward
       order; they get no gradients, no optimizer state and save no activations) that make
       the smallest batch fit, then take the largest batch that fits with that freeze.
       At least the last layer stays trainable. Fewer frozen layers win over a bigger batch.
    3. Otherwise raise `BudgetExceeded` naming the smallest working set found.

    hooks_bytes: the strategy's own training memory (`LocalHooks.extra_memory_bytes`),
    added to every estimate (it does not shrink with the batch or with freezing).
    optimizer_memory: (gradient, optimizer state) bytes of the hooks' own optimizer per
    frozen set (`LocalHooks.optimizer_memory`), replacing the estimate's dense counts.
    """
    from models.memory import estimate_training_memory, freeze_units

    # Counting on "meta" allocates nothing; a model whose forward reads values (the gated
    # models of `dynamic` call .item()) cannot run there and is counted on a real CPU pass
    # over a copy (before training, so outside the measured peak).
    device = ["meta"]

    def estimate(batch: int, frozen: tuple[str, ...]) -> MemoryEstimate:
        trainable = None if not frozen else {n for n, _ in model.named_parameters()} - set(frozen)
        try:
            return estimate_training_memory(model, input_shape, batch, optimizer=optimizer, trainable=trainable,
                                            device=device[0])
        except (RuntimeError, NotImplementedError):
            if device[0] != "meta":
                raise
            device[0] = "cpu"
            return estimate_training_memory(model, input_shape, batch, optimizer=optimizer, trainable=trainable,
                                            device="cpu")

    planned = with_hooks(estimate, hooks_bytes)
    if optimizer_memory is not None:
        planned = with_optimizer_state(planned, optimizer_memory)
    return plan_within(budget_bytes, planned,
                       lambda: freeze_units(model, input_shape, device=device[0]),
                       batch_sizes=batch_sizes,
                       preferred_batch=preferred_batch, allow_freeze=allow_freeze)


def plan_within(budget_bytes: int, estimate: Estimate, units: Callable[[], Units], *,
                batch_sizes: Iterable[int] = (128, 64, 32, 16, 8, 4), preferred_batch: int = 64,
                allow_freeze: bool = True) -> TrainingPlan:
    """The planning policy of `plan_training`, over any `estimate(batch, frozen)` and the
    freezable `units()` (asked for only when no batch fits unfrozen). Pure."""
    candidates = sorted({b for b in batch_sizes if b <= preferred_batch}, reverse=True)
    if not candidates:
        candidates = [min(batch_sizes)]

    def largest_fit(frozen: tuple[str, ...]) -> TrainingPlan | None:
        for batch in candidates:
            est = estimate(batch, frozen)
            if est.total <= budget_bytes:
                return TrainingPlan(batch, frozen, est)
        return None

    plan = largest_fit(())
    if plan is not None:
        return plan
    smallest = candidates[-1]
    dense_need = estimate(smallest, ())
    unit_list = units()

    def frozen_prefix(k: int) -> tuple[str, ...]:
        return tuple(n for _, names in unit_list[:k] for n in names)

    best_k, best_est = 0, dense_need
    if allow_freeze and len(unit_list) > 1:
        # Memory falls (weakly) as more leading units freeze: binary-search the fewest.
        lo, hi = 1, len(unit_list) - 1
        most = estimate(smallest, frozen_prefix(hi))
        best_k, best_est = hi, most
        if most.total <= budget_bytes:
            while lo < hi:
                mid = (lo + hi) // 2
                if estimate(smallest, frozen_prefix(mid)).total <= budget_bytes:
                    hi = mid
                else:
                    lo = mid + 1
            plan = largest_fit(frozen_prefix(lo))
            if plan is not None:
                return plan
    if best_k:
        trainable_units = ", ".join(name for name, _ in unit_list[best_k:]) or "none"
        detail = (f"needs {format_size(best_est.total)} at batch {smallest} with all layers "
                  f"frozen but {trainable_units} ({format_size(dense_need.total)} with none frozen)")
    else:
        detail = f"needs {format_size(dense_need.total)} at batch {smallest}"
    raise BudgetExceeded(
        f"local training does not fit the memory budget: {detail}; budget "
        f"{format_size(budget_bytes)}. It would fit with a budget of at least "
        f"{format_size(best_est.total)}, or a smaller (structured-pruned) model. "
        f"Smallest working set: {best_est.describe()}",
        budget_bytes=budget_bytes,
        needed_bytes=best_est.total,
        batch_size=smallest,
        frozen=frozen_prefix(best_k),
    )
