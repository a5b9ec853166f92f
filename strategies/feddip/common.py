"""What both halves of FedDIP share: the defaults of the parameters the agent half reads
from the task, and the round-0 model (a random ERK mask at density 1 − s0 over the
masked weights), which the server half installs and agents rebuild locally."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from strategies.base import RoundContext, Weights
from strategies.masking import apply_np_masks, masked_names

__all__ = ["S0", "SEED", "S_T", "erk_initial_masks", "erk_initial_weights", "initial_masks_from_params",
           "initial_weights_from_params"]

S0, S_T, SEED = 0.5, 0.9, 0  # initial and final sparsity, the ERK mask's seed


def erk_initial_weights(weights: Weights, ctx: RoundContext, *, T: int | None, s0: float, sT: float,
                        seed: int) -> Weights:
    """w⊙m with m a random ERK mask at density 1 − s_0 (`CubicSparsity(...).density(0)`)."""
    return apply_np_masks(weights, erk_initial_masks(weights, ctx, T=T, s0=s0, sT=sT, seed=seed))


def erk_initial_masks(weights: Weights, ctx: RoundContext, *, T: int | None, s0: float, sT: float,
                      seed: int) -> dict[str, np.ndarray]:
    """The round-0 mask: random ERK at density 1 − s_0 over the masked weights (seeded)."""
    import torch

    from pruning.masks import random_erk_masks
    from pruning.schedules import CubicSparsity

    names = masked_names(ctx, weights)
    gen = torch.Generator().manual_seed(seed)
    density = CubicSparsity(T if T is not None else ctx.total_rounds, s0, sT).density(0)
    masks = random_erk_masks({n: torch.from_numpy(np.asarray(weights[n])) for n in names}, density, generator=gen)
    return {n: m.numpy() for n, m in masks.items()}


def initial_weights_from_params(params: Mapping[str, Any], weights: Weights, ctx: RoundContext) -> Weights:
    """The agent's rebuild of the server's `FedDIP.initial_weights`, from the task params."""
    return apply_np_masks(weights, initial_masks_from_params(params, weights, ctx))


def initial_masks_from_params(params: Mapping[str, Any], weights: Weights, ctx: RoundContext) -> dict[str, np.ndarray]:
    """The agent's rebuild of the server's round-0 mask (`FedDIP.initial_state`)."""
    T = params.get("T")
    return erk_initial_masks(weights, ctx, T=None if T is None else int(T), s0=float(params.get("s0", S0)),
                             sT=float(params.get("sT", S_T)), seed=int(params.get("seed", SEED)))
