"""Agent half of FedDIP: local training computes with w⊙m but applies the gradient to the
dense w (`MaskedForward(error_feedback=True)`), so pruned coordinates keep learning and
can come back at the next reconfiguration; the loss gains λ_t Σ_l ‖w_l⊙m_l‖₂. The upload
is the dense local delta (top-k by the federation's upload density).

The mask is the task's mask artifact (`strategies.masking.agent_masks`), never the zeros
of the downloaded model (a lossy broadcast could move them). Reads from the task's params:
``lam`` (λ_t, sent each round), ``error_feedback`` and the artifact.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from torch import nn

from models import ImageDataset
from pruning.masks import masked_weight_names
from strategies.base import LocalHooks, largest_bytes, masks_bytes
from strategies.feddip.ops import MaskedForward, feddip_regularizer
from strategies.masking import agent_masks

__all__ = ["feddip_hooks"]


def feddip_hooks(params: Mapping[str, Any], model: nn.Module, weights: dict[str, np.ndarray],
                 data: ImageDataset) -> LocalHooks:
    lam = float(params.get("lam", 0.0))
    error_feedback = bool(params.get("error_feedback", True))
    masks = agent_masks(params, model, weights, [n for n in masked_weight_names(model) if n in weights])
    # Only layers with pruned entries need the masked forward; the regulariser covers all
    # masked layers (for a dense layer w⊙m = w).
    sparse = {n: m for n, m in masks.items() if not bool(m.all())}

    def extra(frozen: tuple[str, ...]) -> int:
        trains = set(masks) - set(frozen)
        return (masks_bytes(masks)  # the boolean masks
                + largest_bytes(sparse)  # the forward's (w⊙m − w) temporary
                # w⊙m per trainable sparse layer, which the layer saves for backward
                + masks_bytes({n: m for n, m in sparse.items() if n in trains}, itemsize=4)
                # the regulariser's w⊙m per trainable layer, saved by the norm's backward
                + (masks_bytes({n: m for n, m in masks.items() if n in trains}, itemsize=4) if lam > 0 else 0))

    return LocalHooks(
        extra_memory_bytes=extra(()),
        extra_memory_frozen=extra,
        regularizer=feddip_regularizer(masks, lam) if lam > 0 else None,
        context=MaskedForward(model, sparse, error_feedback=error_feedback),
        upload_support=None,  # dense delta: pruned coordinates that learned can come back
    )
