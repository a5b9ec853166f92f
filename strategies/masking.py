"""Server-side helpers of the unstructured mask strategies (FedDIP, FedTiny, AutoFLIP):
which weights they prune, masks kept in the strategy state, w⊙m with exact zeros.

The global model's zeros ARE the mask the agents read (`pruning.masks.masks_from_zeros`),
so every server half returns `apply_np_masks(...)`: pruned coordinates exactly 0.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from strategies.base import RoundContext, Weights

__all__ = [
    "MASK_PREFIX",
    "apply_np_masks",
    "density_of",
    "masked_names",
    "masks_from_state",
    "masks_to_state",
    "pruned_names",
]

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
    from pruning.masks import masked_weight_names

    return pruned_names(ctx, weights, masked_weight_names)


def density_of(weights: Weights, names: list[str]) -> float:
    """Fraction of nonzero entries among `names` (the masked weights)."""
    total = sum(weights[n].size for n in names)
    return sum(int(np.count_nonzero(weights[n])) for n in names) / max(total, 1)


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
