"""AutoFLIP (Internò et al. 2024; ALGORITHMS.md §3): federated loss exploration → guidance
scores → quantile mask, server half.

- Rounds 1..explore_rounds are exploration: plain FedAvg, every client trains a "scout"
  from the shared base θ₀ (the round's global model). They are ordinary training rounds,
  so the exploration cost is real local work; those rounds carry ``"explore": 1`` in their
  metrics.
- Closing the last exploration round, the guidance score of every masked weight is
  G = mean_k (θ_k − θ₀)², min–max normalised per tensor (`guidance_scores` semantics).
  θ_k − θ₀ is client k's delta, so mean_k (θ_k − θ₀)² is exactly the service's second
  moment of the deltas, ``ctx.mean_sq_delta`` (sample-weighted; with equal sample counts
  it is the plain mean over clients). No explored model needs to be kept.
- mask = `guidance_masks(G, q, scope)`: the fraction q of entries that moved least is
  pruned. From then on the server returns w⊙m every round, and agents re-apply the mask
  after every optimiser step and upload only masked coordinates.

Caveat: the server sees what the agents uploaded; with top-k uploads, coordinates no
client sent score 0. Dense (fp16) uploads during exploration give the paper's scores; the
"autoflip" preset uploads densely for that reason.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from strategies.base import RoundContext, RoundResult, Strategy, Weights
from strategies.fedavg import apply_mean_delta
from strategies.masking import (
    apply_np_masks,
    density_of,
    masked_names,
    masks_from_state,
    masks_to_state,
)

__all__ = ["AutoFLIP", "guidance_from_second_moment"]


def guidance_from_second_moment(mean_sq_delta: Weights, names: list[str]) -> dict[str, np.ndarray]:
    """G[name] = minmax(mean_k δ_k²) per tensor, in [0, 1]; a tensor no client moved
    unevenly (max = min) scores 0 — as `strategies.autoflip.ops.guidance_scores`."""
    out = {}
    for n in names:
        g = np.asarray(mean_sq_delta[n], dtype=np.float64)
        lo, hi = g.min(), g.max()
        out[n] = ((g - lo) / (hi - lo) if hi > lo else np.zeros_like(g)).astype(np.float32)
    return out


class AutoFLIP(Strategy):
    name = "autoflip"
    wants_second_moment = True

    def __init__(self, *, explore_rounds: int = 1, q: float = 0.3,
                 scope: Literal["global", "layer"] = "global", server_lr: float = 1.0) -> None:
        if explore_rounds < 1:
            raise ValueError("explore_rounds must be >= 1")
        if not 0.0 <= q < 1.0:
            raise ValueError("q must be in [0, 1)")
        if scope not in ("global", "layer"):
            raise ValueError("scope must be 'global' or 'layer'")
        if server_lr <= 0:
            raise ValueError("server_lr must be > 0")
        self.explore_rounds, self.q, self.scope, self.server_lr = explore_rounds, q, scope, server_lr

    def task_params(self, rnd: int, weights: Weights, state: dict[str, np.ndarray]) -> dict[str, Any]:
        # The mask is decided when closing round `explore_rounds`; later rounds train pruned.
        return {"pruned": rnd > self.explore_rounds}

    def aggregate(self, ctx: RoundContext, weights: Weights, mean_delta: Weights,
                  state: dict[str, np.ndarray]) -> RoundResult:
        names = masked_names(ctx, weights)
        new, _ = apply_mean_delta(weights, mean_delta, {}, server_lr=self.server_lr, momentum=0.0)
        masks = masks_from_state(state)
        explore = ctx.round <= self.explore_rounds
        pruned_now = False
        if not masks and ctx.round >= self.explore_rounds:
            masks = self.guidance_masks(ctx, names)
            pruned_now = True
        if masks:
            new = apply_np_masks(new, masks)
        metrics: dict[str, Any] = {
            "density": density_of(new, names),
            "explore": int(explore),  # this round's local training was a scout exploration
            "pruned_now": int(pruned_now),
        }
        return RoundResult(new, state=masks_to_state(masks), metrics=metrics)

    def guidance_masks(self, ctx: RoundContext, names: list[str]) -> dict[str, np.ndarray]:
        import torch

        from strategies.autoflip.ops import guidance_masks

        if ctx.mean_sq_delta is None:
            raise ValueError("AutoFLIP needs ctx.mean_sq_delta (wants_second_moment)")
        scores = guidance_from_second_moment(ctx.mean_sq_delta, names)
        masks = guidance_masks({n: torch.from_numpy(s) for n, s in scores.items()}, self.q, scope=self.scope)
        return {n: m.numpy() for n, m in masks.items()}
