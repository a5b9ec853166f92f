"""Agent-side halves of the unstructured mask strategies (FedDIP, AutoFLIP).

The global model's zeros ARE the mask: the server returns weights with every pruned
coordinate exactly 0, so an agent derives ``masks = {name: w != 0}`` over the masked
weights (conv and linear weights; BN, biases and downsample/shortcut convs stay dense, as
ALGORITHMS.md §4 asks). Server and agent agree on that set through `masked_weight_names`.

- FedDIP: local training computes with w⊙m but applies the gradient to the dense w
  (`MaskedForward(error_feedback=True)`), so pruned coordinates keep learning and can
  come back at the next reconfiguration; the loss gains λ_t Σ_l ‖w_l⊙m_l‖₂. The upload is
  the dense local delta (top-k by the federation's upload density).
- AutoFLIP: after the exploration rounds the mask is re-applied after every optimiser
  step and only masked coordinates are uploaded.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from coordinator.protocol import Task
from edge_agent.pruning.feddip import MaskedForward, feddip_regularizer
from edge_agent.pruning.masks import Masks, apply_masks, prunable_weights
from edge_agent.strategy_hooks import AGENT_HOOKS, HookFactory, LocalHooks
from models import ImageDataset

__all__ = ["DENSE_LAYERS", "autoflip_hooks", "feddip_hooks", "masked_weight_names", "masks_from_zeros"]

# Name substrings of conv weights that stay dense (ResNet downsample / shortcut convs).
DENSE_LAYERS: tuple[str, ...] = ("shortcut", "downsample")


def masked_weight_names(model: nn.Module) -> list[str]:
    """The weights FedDIP/AutoFLIP may prune: conv and linear weights, not BN, not biases,
    not downsample convs. Used by the server strategies too, so both sides agree."""
    return list(prunable_weights(model, exclude=DENSE_LAYERS))


def masks_from_zeros(model: nn.Module, weights: Mapping[str, np.ndarray]) -> Masks:
    """Keep-masks (True = kept) from the exact zeros of the global weights."""
    params = dict(model.named_parameters())
    return {n: torch.from_numpy(np.asarray(weights[n]) != 0).to(params[n].device)
            for n in masked_weight_names(model) if n in weights}


def feddip_hooks(task: Task, model: nn.Module, weights: dict[str, np.ndarray], data: ImageDataset) -> LocalHooks:
    params = task.strategy.params
    lam = float(params.get("lam", 0.0))
    error_feedback = bool(params.get("error_feedback", True))
    masks = masks_from_zeros(model, weights)
    # Only layers with pruned entries need the masked forward; the regulariser covers all
    # masked layers (for a dense layer w⊙m = w).
    sparse = {n: m for n, m in masks.items() if not bool(m.all())}
    return LocalHooks(
        regularizer=feddip_regularizer(masks, lam) if lam > 0 else None,
        context=MaskedForward(model, sparse, error_feedback=error_feedback),
        upload_support=None,  # dense delta: pruned coordinates that learned can come back
    )


def autoflip_hooks(task: Task, model: nn.Module, weights: dict[str, np.ndarray], data: ImageDataset) -> LocalHooks:
    if not task.strategy.params.get("pruned", False):
        return LocalHooks()  # exploration: plain local training (FedAvg)
    masks = masks_from_zeros(model, weights)
    apply_masks(model, masks)  # already zero; makes the invariant hold from step 0

    def after_step() -> None:
        apply_masks(model, masks)

    return LocalHooks(after_step=after_step,
                      upload_support={n: m.cpu().numpy() for n, m in masks.items()})


_FACTORIES: dict[str, HookFactory] = {
    "feddip": feddip_hooks,
    "autoflip": autoflip_hooks,
}
AGENT_HOOKS.update(_FACTORIES)
