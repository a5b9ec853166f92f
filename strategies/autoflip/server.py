"""AutoFLIP (Internò et al. 2024; ALGORITHMS.md §3): federated loss exploration → guidance
scores → quantile mask, server half.

- Rounds 1..explore_rounds explore, before the federation's training rounds (they are
  `setup_rounds`, as in the authors' code, where exploration precedes FL and does not
  move the global model). Each sampled client is a scout: from the shared θ₀ it trains
  for up to `explore_epochs` epochs with early stopping (`patience`) on a seeded local
  validation split (`val_fraction`) and uploads (θ_k − θ₀)² of every parameter as
  auxiliary statistics ("aux/sq/<tensor>", fp32), plus its extra local work. No delta is
  uploaded and θ₀ stays the global model, so later exploration rounds add more scouts from
  the same θ₀ (other clients, under partial participation).
- The service averages each round's squares over its scouts (by sample count, as FedAvg
  weighs clients); the strategy state sums those means over every exploration round
  ("guide/<tensor>"). Closing the last one: G = minmax(Σ) per tensor (`minmax_scores`:
  the paper's G = mean_k (θ_k − θ₀)², normalised — a constant factor changes nothing),
  mask = `guidance_masks(G, q, scope)` over the masked weights, and θ₀⊙m is the global
  model. From then on the server returns w⊙m every round; agents re-apply the mask after
  every optimiser step and upload only masked coordinates.

Why auxiliary uploads and not the service's second moment of the deltas (what this
strategy used before): the squares are then exactly the scouts' (θ_k − θ₀)² — never a
top-k selection of them, never scaled by the delta's norm clip, never mixed with an
error-feedback residual — and the global model need not move during exploration.

Metrics of an exploration round: ``setup``/``explore`` 1, and the scouts' extra local work
(sample-weighted means over the round's scouts): ``explore_epochs`` run,
``explore_steps`` run, ``explore_stopped`` (fraction that early stopping ended),
``explore_best_epoch``.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from strategies.autoflip.common import (
    EXPLORE_EPOCHS,
    PATIENCE,
    VAL_FRACTION,
    WORK_KEYS,
    scored_names,
    sq_key,
    work_key,
)
from strategies.base import RoundContext, RoundResult, Strategy, Weights
from strategies.fedavg import apply_mean_delta
from strategies.masking import (
    apply_np_masks,
    density_of,
    masked_names,
    masks_from_state,
    masks_to_state,
)

__all__ = ["GUIDE_PREFIX", "AutoFLIP"]

GUIDE_PREFIX = "guide/"  # state: Σ over exploration rounds of the round's mean (θ_k − θ₀)²


class AutoFLIP(Strategy):
    name = "autoflip"

    def __init__(self, *, explore_rounds: int = 1, explore_epochs: int = EXPLORE_EPOCHS, patience: int = PATIENCE,
                 val_fraction: float = VAL_FRACTION, seed: int = 0, q: float = 0.3,
                 scope: Literal["global", "layer"] = "global", server_lr: float = 1.0) -> None:
        if explore_rounds < 1 or explore_epochs < 1 or patience < 1:
            raise ValueError("explore_rounds, explore_epochs and patience must be >= 1")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError("val_fraction must be in [0, 1)")
        if not 0.0 <= q < 1.0:
            raise ValueError("q must be in [0, 1)")
        if scope not in ("global", "layer"):
            raise ValueError("scope must be 'global' or 'layer'")
        if server_lr <= 0:
            raise ValueError("server_lr must be > 0")
        self.explore_rounds, self.explore_epochs, self.patience = explore_rounds, explore_epochs, patience
        self.val_fraction, self.seed = val_fraction, seed
        self.q, self.scope, self.server_lr = q, scope, server_lr

    # ------------------------------------------------------------------ contract
    def setup_rounds(self, weights: Weights) -> int:
        return self.explore_rounds

    def task_params(self, rnd: int, weights: Weights, state: dict[str, np.ndarray]) -> dict[str, Any]:
        if rnd > self.explore_rounds:
            return {"pruned": True}
        return {"explore": {"epochs": self.explore_epochs, "patience": self.patience,
                            "val_fraction": self.val_fraction, "seed": self.seed}}

    def aux_shapes(self, rnd: int, weights: Weights, state: dict[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
        if rnd > self.explore_rounds:
            return {}
        return {**{sq_key(n): tuple(weights[n].shape) for n in scored_names(weights)},
                **{work_key(k): (1,) for k in WORK_KEYS}}

    def aggregate(self, ctx: RoundContext, weights: Weights, mean_delta: Weights,
                  state: dict[str, np.ndarray]) -> RoundResult:
        if ctx.round <= self.explore_rounds:
            return self._explore(ctx, weights, state)
        names = masked_names(ctx, weights)
        masks = masks_from_state(state)
        new, _ = apply_mean_delta(weights, mean_delta, {}, server_lr=self.server_lr, momentum=0.0)
        new = apply_np_masks(new, masks)
        return RoundResult(new, state=masks_to_state(masks),
                           metrics={"density": density_of(new, names), "explore": 0, "pruned_now": 0})

    # ------------------------------------------------------------------ exploration
    def _explore(self, ctx: RoundContext, weights: Weights, state: dict[str, np.ndarray]) -> RoundResult:
        """Fold this round's scouts into the guidance; closing the last exploration round,
        prune θ₀ by it. The global model stays θ₀ (no delta was uploaded)."""
        from strategies.autoflip.ops import accumulate_guidance

        names = scored_names(weights)
        guide = {k.removeprefix(GUIDE_PREFIX): v for k, v in state.items() if k.startswith(GUIDE_PREFIX)}
        metrics: dict[str, Any] = {"setup": 1, "explore": 1, "pruned_now": 0}
        # a round without scouts adds nothing (the service's mean of no upload is all zeros)
        if ctx.participants > 0 and all(sq_key(n) in ctx.aux for n in names):
            guide = accumulate_guidance(guide, {n: ctx.aux[sq_key(n)] for n in names})
            metrics.update({f"explore_{k}": float(ctx.aux[work_key(k)][0]) for k in WORK_KEYS
                            if work_key(k) in ctx.aux})
        if ctx.round < self.explore_rounds:
            metrics["density"] = 1.0
            return RoundResult(weights, state={GUIDE_PREFIX + n: g for n, g in guide.items()}, metrics=metrics)
        if not guide:
            raise ValueError("AutoFLIP: no scout reported in any exploration round; no guidance to prune by")
        masked = masked_names(ctx, weights)
        masks = self.guidance_masks(guide, masked)
        pruned = apply_np_masks(weights, masks)
        metrics.update(pruned_now=1, density=density_of(pruned, masked))
        return RoundResult(pruned, state=masks_to_state(masks), metrics=metrics)

    def guidance_masks(self, guide: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
        """Keep-masks of `names` from the accumulated guidance: G = minmax per tensor, the
        fraction q lowest pruned (one global threshold, or per tensor)."""
        import torch

        from strategies.autoflip.ops import guidance_masks, minmax_scores

        scores = minmax_scores(guide, names)
        masks = guidance_masks({n: torch.from_numpy(s) for n, s in scores.items()}, self.q, scope=self.scope)
        return {n: m.numpy() for n, m in masks.items()}
