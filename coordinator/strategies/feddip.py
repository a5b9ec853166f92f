"""FedDIP (Long et al., ICDM 2023; ALGORITHMS.md §4): dynamic pruning with error feedback
and incremental regularisation, server half.

- Round 0 (`initial_weights`): a random ERK mask at density 1 − s0 (= 50%) over the
  masked weights (conv/linear weights; BN, biases and downsample convs dense).
- Closing round t: dense FedAvg w ← w + lr·Δ̄ (clients upload their *dense* delta, so
  pruned coordinates that learned locally under error feedback show up here); at a
  reconfiguration round (t = R, 2R, …) the mask is recomputed by **global** magnitude over
  the aggregated dense weights to density 1 − s_t, s_t = s_T + (s0 − s_T)(1 − t/T)³;
  otherwise the mask is kept. The result is w⊙m: pruned coordinates exactly 0, which is
  how agents learn the mask.
- The mask lives in the strategy state (``mask/<name>``, uint8): the aggregated dense
  weights are no longer zero at pruned positions, so they cannot tell it.
- `task_params`: λ_t of the incremental regulariser (0 → λ_max in 20 equal steps over T
  rounds; round r trains with λ_{r−1}) and ``error_feedback``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from coordinator.strategies.base import RoundContext, RoundResult, Strategy, Weights
from coordinator.strategies.fedavg import apply_mean_delta

__all__ = ["FedDIP", "auto_reconfigure_every", "density_of", "masked_names", "pruned_names"]

MASK_PREFIX = "mask/"
_NAMES_CACHE: dict[tuple[Any, ...], list[str]] = {}


def pruned_names(ctx: RoundContext, weights: Weights, select: Callable[[Any], list[str]]) -> list[str]:
    """The names `select(model)` picks, from the model `weights` builds, cached per
    structure: the mask strategies call this every round."""
    shapes = tuple((k, tuple(v.shape)) for k, v in weights.items())
    key = (select.__module__, select.__qualname__, ctx.model, ctx.in_channels, ctx.num_classes, ctx.image_size,
           shapes)
    if key not in _NAMES_CACHE:
        from models.state import build_from_state

        model = build_from_state(ctx.model, weights, in_channels=ctx.in_channels,
                                 num_classes=ctx.num_classes, image_size=ctx.image_size)
        _NAMES_CACHE[key] = [n for n in select(model) if n in weights]
    return _NAMES_CACHE[key]


def masked_names(ctx: RoundContext, weights: Weights) -> list[str]:
    """Names of the weights FedDIP/AutoFLIP prune: the same `masked_weight_names` the
    agents use."""
    from edge_agent.mask_hooks import masked_weight_names

    return pruned_names(ctx, weights, masked_weight_names)


def density_of(weights: Weights, names: list[str]) -> float:
    """Fraction of nonzero entries among `names` (the masked weights)."""
    total = sum(weights[n].size for n in names)
    return sum(int(np.count_nonzero(weights[n])) for n in names) / max(total, 1)


def auto_reconfigure_every(total_rounds: int) -> int:
    """R = 5 as in the paper for runs of ≥ 50 rounds; short runs reconfigure more often
    (every ⌊T/10⌋ rounds, at least every round) so that the schedule is followed."""
    return 5 if total_rounds >= 50 else max(1, total_rounds // 10)


def masks_to_state(masks: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {f"{MASK_PREFIX}{n}": m.astype(np.uint8) for n, m in masks.items()}


def masks_from_state(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k.removeprefix(MASK_PREFIX): v.astype(bool) for k, v in state.items() if k.startswith(MASK_PREFIX)}


def apply_np_masks(weights: Weights, masks: dict[str, np.ndarray]) -> Weights:
    """w⊙m with pruned coordinates exactly 0 (not −0.0: plain np.where)."""
    out = dict(weights)
    for n, m in masks.items():
        out[n] = np.where(m, weights[n], np.float32(0)).astype(np.float32)
    return out


class FedDIP(Strategy):
    name = "feddip"

    def __init__(self, *, T: int | None = None, s0: float = 0.5, sT: float = 0.9,
                 reconfigure_every: int | None = None, lam_max: float = 1e-3, lam_steps: int = 20,
                 error_feedback: bool = True, seed: int = 0, server_lr: float = 1.0) -> None:
        if T is not None and T < 1:
            raise ValueError("T must be >= 1")
        if not (0.0 <= s0 < 1.0 and 0.0 <= sT < 1.0):
            raise ValueError("need 0 <= s0 < 1 and 0 <= sT < 1")
        if reconfigure_every is not None and reconfigure_every < 1:
            raise ValueError("reconfigure_every must be >= 1")
        if lam_max < 0 or lam_steps < 1 or server_lr <= 0:
            raise ValueError("need lam_max >= 0, lam_steps >= 1, server_lr > 0")
        self.T, self.s0, self.sT = T, s0, sT
        self.reconfigure_every, self.lam_max, self.lam_steps = reconfigure_every, lam_max, lam_steps
        self.error_feedback, self.seed, self.server_lr = error_feedback, seed, server_lr

    # ------------------------------------------------------------------ schedules
    def total_rounds(self, ctx_total: int) -> int:
        return self.T if self.T is not None else ctx_total

    def every(self, total_rounds: int) -> int:
        return self.reconfigure_every or auto_reconfigure_every(self.total_rounds(total_rounds))

    def target_density(self, t: int, total_rounds: int) -> float:
        """1 − s_t: the density the mask has after closing round t (t = 0: the ERK mask)."""
        from edge_agent.pruning.schedules import CubicSparsity

        return CubicSparsity(self.total_rounds(total_rounds), self.s0, self.sT).density(t)

    def is_reconfiguration(self, t: int, total_rounds: int) -> bool:
        from edge_agent.pruning.schedules import is_reconfiguration_round

        return is_reconfiguration_round(t, every=self.every(total_rounds))

    def lam(self, rnd: int, total_rounds: int) -> float:
        """λ used while training round `rnd` (1-based): λ_{rnd−1}."""
        from edge_agent.pruning.schedules import IncrementalLambda

        return IncrementalLambda(self.total_rounds(total_rounds), self.lam_max, self.lam_steps)(rnd - 1)

    # ------------------------------------------------------------------ strategy
    def task_params(self, rnd: int, weights: Weights, state: dict[str, np.ndarray]) -> dict[str, Any]:
        total = self.T or (int(state["total_rounds"][0]) if "total_rounds" in state else None)
        # Round 1 of a federation with no explicit T: the state is still empty, but λ_0 = 0
        # for every T, so nothing is lost.
        lam = self.lam(rnd, total) if total else 0.0
        return {"lam": float(lam), "error_feedback": self.error_feedback}

    def initial_weights(self, weights: Weights, ctx: RoundContext) -> Weights:
        import torch

        from edge_agent.pruning.masks import random_erk_masks

        names = masked_names(ctx, weights)
        gen = torch.Generator().manual_seed(self.seed)
        masks = random_erk_masks({n: torch.from_numpy(np.asarray(weights[n])) for n in names},
                                 self.target_density(0, ctx.total_rounds), generator=gen)
        return apply_np_masks(weights, {n: m.numpy() for n, m in masks.items()})

    def aggregate(self, ctx: RoundContext, weights: Weights, mean_delta: Weights,
                  state: dict[str, np.ndarray]) -> RoundResult:
        names = masked_names(ctx, weights)
        masks = masks_from_state(state)
        if not masks:  # round 1: the incoming model is the round-0 ERK model, its zeros are the mask
            masks = {n: weights[n] != 0 for n in names}
        dense, _ = apply_mean_delta(weights, mean_delta, {}, server_lr=self.server_lr, momentum=0.0)
        t = ctx.round
        reconfigured = self.is_reconfiguration(t, ctx.total_rounds)
        changed = 0
        if reconfigured:
            import torch

            from edge_agent.pruning.masks import magnitude_masks

            new_masks = {n: m.numpy() for n, m in magnitude_masks(
                {n: torch.from_numpy(dense[n]) for n in names},
                self.target_density(t, ctx.total_rounds), scope="global").items()}
            changed = sum(int(np.count_nonzero(new_masks[n] != masks[n])) for n in names)
            masks = new_masks
        new = apply_np_masks(dense, masks)
        total = self.total_rounds(ctx.total_rounds)
        metrics: dict[str, Any] = {
            "density": density_of(new, names),
            "mask_density": sum(int(m.sum()) for m in masks.values()) / max(sum(m.size for m in masks.values()), 1),
            "target_density": self.target_density(t if reconfigured else self._last_reconfig(t, ctx.total_rounds),
                                                  ctx.total_rounds),
            "reconfigured": int(reconfigured), "mask_changes": changed,
            "lam": self.lam(t, total),
        }
        new_state = {**masks_to_state(masks), "total_rounds": np.array([ctx.total_rounds], dtype=np.int64)}
        return RoundResult(new, state=new_state, metrics=metrics)

    def _last_reconfig(self, t: int, total_rounds: int) -> int:
        every = self.every(total_rounds)
        return (t // every) * every
