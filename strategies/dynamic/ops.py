"""How the static export ranks a gated layer's channels, as pure functions of per-channel
vectors (n,) over the channels a group still has. Higher = keep; only the order within a
group matters (`pruning.structured.prune_channels` cuts each group to a scheduled width)."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["gate_l2_scores", "usage_scores"]


def usage_scores(usage: torch.Tensor, l2: torch.Tensor) -> torch.Tensor:
    """The channels' ranks by usage (the fraction of samples whose gate kept the channel,
    ALGORITHMS.md §1's "how often the gate keeps them on local data"), ties broken by
    group L2 magnitude: 0 for the least used, n − 1 for the most used."""
    order = np.lexsort((l2.detach().cpu().double().numpy(), usage.detach().cpu().double().numpy()))
    ranks = np.empty(order.size, dtype=np.float64)
    ranks[order] = np.arange(order.size)
    return torch.from_numpy(ranks).to(l2.dtype)


def gate_l2_scores(gate: torch.Tensor, l2: torch.Tensor) -> torch.Tensor:
    """Mean gate ḡ = E[g·keep] times group L2 magnitude: the channel's expected output
    scale, what folding ḡ into the weights leaves of it."""
    return l2 * gate.to(l2.dtype)
