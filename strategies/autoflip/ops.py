"""AutoFLIP (Internò et al. 2024): guidance scores from federated loss exploration.

Each client trains a scout copy of the shared base θ₀; the server scores every parameter by
how far the scouts moved it, G = mean_k (θ_k − θ₀)², min–max normalised per tensor, and
prunes the fraction q that moved least.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

import torch

from pruning.masks import Masks, magnitude_masks

__all__ = ["guidance_masks", "guidance_scores"]


@torch.no_grad()
def guidance_scores(
    base: Mapping[str, torch.Tensor],
    explored: Sequence[Mapping[str, torch.Tensor]],
    *,
    names: Iterable[str] | None = None,
) -> dict[str, torch.Tensor]:
    """G[name] = minmax(mean_k (explored[k][name] − base[name])²), in [0, 1] per tensor.

    names: which tensors to score (default: every floating-point tensor of `base`, so BN
    counters are skipped). A tensor that no client moved unevenly (max = min) scores 0.
    """
    if not explored:
        raise ValueError("guidance_scores needs at least one explored model")
    keys = list(names) if names is not None else [n for n, v in base.items() if v.is_floating_point()]
    scores = {}
    for name in keys:
        theta0 = base[name].float()
        g = torch.stack([(e[name].float() - theta0) ** 2 for e in explored]).mean(0)
        lo, hi = g.min(), g.max()
        scores[name] = (g - lo) / (hi - lo) if hi > lo else torch.zeros_like(g)
    return scores


def guidance_masks(
    scores: Mapping[str, torch.Tensor],
    q: float = 0.3,
    *,
    scope: Literal["global", "layer"] = "global",
) -> Masks:
    """Prune the fraction `q` of entries with the lowest guidance score (moved least).

    scope="global" (default, as the paper's single τ = quantile(G, q)): exactly round(q·N)
    entries over all tensors, comparable because scores are min–max normalised per tensor.
    scope="layer": exactly round(q·n) per tensor. Ties are broken arbitrarily but the
    count is exact. Returns keep-masks (True = kept).
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    # Keeping the (1 − q) highest scores is pruning the q lowest.
    total = sum(s.numel() for s in scores.values())
    if scope == "global":
        density = (total - round(q * total)) / max(total, 1)
        return magnitude_masks(scores, density, scope="global")
    return {n: magnitude_masks({n: s}, (s.numel() - round(q * s.numel())) / max(s.numel(), 1))[n]
            for n, s in scores.items()}
