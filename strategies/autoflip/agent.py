"""Agent half of AutoFLIP: exploration rounds train plainly (every client a scout from the
round's global model); once the task says ``pruned``, the mask — the task's mask artifact
(`strategies.masking.agent_masks`) — is re-applied after every optimiser step and only
masked coordinates are uploaded."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from torch import nn

from models import ImageDataset
from pruning.masks import apply_masks, masked_weight_names
from strategies.base import LocalHooks, largest_bytes, masks_bytes
from strategies.masking import agent_masks

__all__ = ["autoflip_hooks"]


def autoflip_hooks(params: Mapping[str, Any], model: nn.Module, weights: dict[str, np.ndarray],
                   data: ImageDataset) -> LocalHooks:
    if not params.get("pruned", False):
        return LocalHooks()  # exploration: plain local training (FedAvg)
    masks = agent_masks(params, model, weights, [n for n in masked_weight_names(model) if n in weights])
    apply_masks(model, masks)  # already zero; makes the invariant hold from step 0

    def after_step() -> None:
        apply_masks(model, masks)

    # the boolean masks, and apply_masks' float copy of one mask after each step
    extra = masks_bytes(masks) + largest_bytes(masks)
    return LocalHooks(after_step=after_step, upload_support={n: m.cpu().numpy() for n, m in masks.items()},
                      extra_memory_bytes=extra)
