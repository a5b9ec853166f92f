"""FedDIP (Long et al., ICDM 2023): the torch building blocks of local training, dynamic
pruning with error feedback and incremental regularisation.

Client side, per round (the mask is the global model's zeros, `masks_from_zeros`)::

    with MaskedForward(model, masks):            # forward with w⊙m, gradient to dense w
        train_epochs(model, data, optimizer=opt,
                     regularizer=feddip_regularizer(masks, lam_schedule(t)))

The model keeps its *dense* weights after the block (pruned coordinates keep learning and
can come back at the next reconfiguration); what is sent is w⊙m (`apply_masks` on a copy).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import TracebackType

import torch
from torch import nn
from torch.nn.utils import parametrize

__all__ = ["MaskedForward", "feddip_regularizer"]


class _ErrorFeedbackMask(nn.Module):
    """weight ↦ weight⊙m in the forward pass; the backward is the identity (straight-through),
    so the dense weight receives the full gradient ∂L/∂(w⊙m) — FedDIP's error feedback."""

    mask: torch.Tensor

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.to(torch.bool), persistent=False)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        masked = weight * self.mask
        return weight + (masked - weight).detach()


class _PlainMask(nn.Module):
    """weight ↦ weight⊙m with the ordinary gradient: pruned coordinates get zero gradient."""

    mask: torch.Tensor

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.to(torch.bool), persistent=False)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask


class MaskedForward:
    """Context manager: inside it, `model` computes with w⊙m; outside, it is unchanged.

    error_feedback=True (FedDIP): the gradient of the masked weight is applied to the dense
    weight, so pruned coordinates keep learning. error_feedback=False: plain masked training,
    pruned coordinates get zero gradient. Implemented with `torch.nn.utils.parametrize`;
    the parameter objects are the same inside and outside, so an optimizer built before
    the block keeps working. Inside the block, `model.named_parameters()` shows the dense
    weights as ``<module>.parametrizations.weight.original``.
    """

    def __init__(self, model: nn.Module, masks: Mapping[str, torch.Tensor], *,
                 error_feedback: bool = True) -> None:
        self.model = model
        self.masks = dict(masks)
        self.error_feedback = error_feedback
        self._modules: list[tuple[nn.Module, str]] = []

    def __enter__(self) -> nn.Module:
        for name, mask in self.masks.items():
            module_name, _, attr = name.rpartition(".")
            module = self.model.get_submodule(module_name)
            param = getattr(module, attr)
            if mask.shape != param.shape:
                raise ValueError(f"mask {name!r} has shape {tuple(mask.shape)}, weight {tuple(param.shape)}")
            wrapper = _ErrorFeedbackMask(mask) if self.error_feedback else _PlainMask(mask)
            parametrize.register_parametrization(module, attr, wrapper.to(param.device))
            self._modules.append((module, attr))
        return self.model

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for module, attr in reversed(self._modules):
            # leave_parametrized=False: keep the dense weight (the error-feedback state).
            parametrize.remove_parametrizations(module, attr, leave_parametrized=False)
        self._modules.clear()


def feddip_regularizer(masks: Mapping[str, torch.Tensor], lam: float) -> Callable[[nn.Module], torch.Tensor]:
    """λ Σ_l ‖w_l ⊙ m_l‖₂ (the L2 norm, not squared) over the masked layers, as a
    `regularizer(model)` for `models.training.train_epochs`. Works inside and outside
    `MaskedForward` (it reads the dense weights either way)."""
    names = list(masks)

    def regularizer(model: nn.Module) -> torch.Tensor:
        terms = []
        for name in names:
            module_name, _, attr = name.rpartition(".")
            module = model.get_submodule(module_name)
            if parametrize.is_parametrized(module, attr):
                weight = getattr(module.parametrizations, attr).original
            else:
                weight = getattr(module, attr)
            terms.append(torch.linalg.vector_norm(weight * masks[name]))
        if lam == 0.0 or not terms:
            return torch.zeros((), device=terms[0].device if terms else None)
        return lam * torch.stack(terms).sum()

    return regularizer
