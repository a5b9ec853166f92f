"""AutoFLIP (Internò et al. 2024): federated loss exploration and its guidance scores.

Each client trains a scout copy of the shared base θ₀ for a few epochs with early stopping
(`train_scout`); the server scores every parameter by how far the scouts moved it,
G = mean_k (θ_k − θ₀)², min–max normalised per tensor, and prunes the fraction q that
moved least (`guidance_masks`). `guidance_scores` is the formula on explored models; the
federation computes the same from the scouts' uploaded squares (`squared_displacement`,
summed over exploration rounds by `accumulate_guidance`, normalised by `minmax_scores`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from models.datasets import ImageDataset
from models.training import TrainStats, evaluate, train_epochs
from pruning.masks import Masks, magnitude_masks
from sparse_kernels.types import Weights

__all__ = ["ScoutRun", "accumulate_guidance", "guidance_masks", "guidance_scores", "minmax_scores",
           "squared_displacement", "stop_early", "train_scout", "validation_split"]


# ------------------------------------------------------------------ the agent's scout
def validation_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) indices of `n` local samples: a seeded permutation with
    round(fraction·n) held out — at least one when fraction > 0, never all of them."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {fraction}")
    order = np.random.default_rng(seed).permutation(n)
    held = min(max(round(fraction * n), 1 if fraction > 0 else 0), max(n - 1, 0))
    return np.sort(order[held:]), np.sort(order[:held])


def stop_early(val_losses: Sequence[float], patience: int) -> bool:
    """True when the last `patience` epochs brought no validation loss below the best of
    the epochs before them (a tie is no improvement)."""
    if patience < 1:
        raise ValueError("patience must be >= 1")
    best = int(np.argmin(val_losses))  # the first minimum
    return len(val_losses) - 1 - best >= patience


@dataclass(frozen=True)
class ScoutRun:
    stats: TrainStats  # over every epoch run; samples = the train split's size (the scout's weight)
    epochs: int  # epochs run
    steps: int  # optimiser steps run
    stopped: bool  # early stopping ended it (not the epoch or step cap)
    best_epoch: int  # 1-based epoch of the lowest validation loss; 0 without a validation split
    val_losses: tuple[float, ...]


def train_scout(model: nn.Module, train: ImageDataset, val: ImageDataset, *, optimizer: torch.optim.Optimizer,
                epochs: int, patience: int, batch_size: int, seed: int, max_steps: int | None = None,
                regularizer: Callable[[nn.Module], torch.Tensor] | None = None,
                after_step: Callable[[], None] | None = None) -> ScoutRun:
    """Train `model` (θ₀ → θ_k) on `train` for up to `epochs` epochs, stopping once
    `patience` epochs in a row bring no lower loss on `val`. The model stays where the
    last epoch left it (as the authors' scouts do; restoring the best epoch would hold a
    second model). Validation runs at the training batch, without gradients: below the
    training peak that the agent's memory plan covers."""
    losses: list[float] = []
    loss_sum = correct = 0.0
    samples = steps = epochs_run = 0
    seconds, stopped = 0.0, False
    for epoch in range(epochs):
        left = None if max_steps is None else max_steps - steps
        if left is not None and left <= 0:
            break
        st = train_epochs(model, train, optimizer=optimizer, epochs=1, batch_size=batch_size,
                          seed=seed * 1000 + epoch, max_steps=left, regularizer=regularizer, after_step=after_step)
        loss_sum += st.loss * st.samples
        correct += st.accuracy * st.samples
        samples, steps, seconds = samples + st.samples, steps + st.steps, seconds + st.seconds
        epochs_run += 1
        if len(val):
            losses.append(evaluate(model, val, batch_size=batch_size).loss)
            if stop_early(losses, patience):
                stopped = True
                break
    stats = TrainStats(loss_sum / max(samples, 1), correct / max(samples, 1), len(train), steps, seconds)
    best = int(np.argmin(losses)) + 1 if losses else 0
    return ScoutRun(stats, epochs_run, steps, stopped, best, tuple(losses))


def squared_displacement(local: Weights, base: Weights, names: Iterable[str]) -> dict[str, np.ndarray]:
    """(θ_k − θ₀)² per tensor, float32: what one scout uploads."""
    return {n: np.square(np.asarray(local[n], np.float32) - np.asarray(base[n], np.float32)) for n in names}


# ------------------------------------------------------------------ the server's guidance
def accumulate_guidance(total: Mapping[str, np.ndarray], round_mean: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Σ over exploration rounds of each round's mean over its scouts of (θ_k − θ₀)²: each
    round adds scouts from the same θ₀ (float64 so that many rounds lose nothing)."""
    return {n: np.asarray(total.get(n, 0.0), np.float64) + np.asarray(v, np.float64) for n, v in round_mean.items()}


def minmax_scores(guidance: Mapping[str, np.ndarray], names: Iterable[str]) -> dict[str, np.ndarray]:
    """minmax(guidance[name]) per tensor, float32 in [0, 1]; a tensor no scout moved
    unevenly (max = min) scores 0 — as `guidance_scores`. Scaling the guidance (a sum
    over rounds instead of a mean) changes nothing."""
    out = {}
    for n in names:
        g = np.asarray(guidance[n], dtype=np.float64)
        lo, hi = g.min(), g.max()
        out[n] = ((g - lo) / (hi - lo) if hi > lo else np.zeros_like(g)).astype(np.float32)
    return out


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
