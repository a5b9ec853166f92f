"""Helpers of the unstructured mask strategies (FedDIP, FedTiny, AutoFLIP): which weights
they prune, masks kept in the strategy state, w⊙m with exact zeros, and the agent's read
of the mask.

The masks in the strategy state ("mask/<name>") are the truth: the coordinator serves them
per model version as an artifact of their own (`sparse_kernels.masks`, named by sha256 in
the task), applies them after the broadcast patch, and agents do the same with the
artifact, so what agents hold is exactly 0 where the mask says pruned whatever the
broadcast's compression. Server halves still return `apply_np_masks(...)` (the target
model, and the strategy's reported density, have exact zeros).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from strategies.base import RoundContext, Weights

if TYPE_CHECKING:  # the agent's read needs torch; the server helpers do not
    import torch
    from torch import nn

__all__ = [
    "MASK_PARAM",
    "MASK_PREFIX",
    "agent_masks",
    "apply_np_masks",
    "density_of",
    "masked_names",
    "masks_from_state",
    "masks_to_state",
    "pruned_names",
]

MASK_PREFIX = "mask/"
# The task's verified mask artifact (bytes), added to the strategy params by the agent
# (`edge_agent.local.with_mask`) before the hooks are built; never sent as JSON.
MASK_PARAM = "mask"
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


def agent_masks(params: Mapping[str, Any], model: nn.Module, weights: Weights,
                names: list[str]) -> dict[str, torch.Tensor]:
    """The agent half's keep-masks over `names`: from the task's mask artifact
    (`pruning.masks.masks_from_artifact`, validated against `model`). A task without one
    comes from a coordinator without mask artifacts, which broadcast exact fp32, so there
    the downloaded zeros are the mask."""
    import torch

    from pruning.masks import masks_from_artifact

    data = params.get(MASK_PARAM)
    if data is not None:
        return masks_from_artifact(model, bytes(data), names)
    return {n: torch.from_numpy(np.asarray(weights[n]) != 0) for n in names}


def apply_np_masks(weights: Weights, masks: dict[str, np.ndarray]) -> Weights:
    """w⊙m with pruned coordinates exactly 0 (not −0.0: plain np.where)."""
    out = dict(weights)
    for n, m in masks.items():
        out[n] = np.where(m, weights[n], np.float32(0)).astype(np.float32)
    return out
