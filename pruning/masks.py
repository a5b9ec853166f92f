"""Unstructured masks: which weights may be pruned, magnitude and random-ERK masks, applying
them, measuring density.

A mask set is ``dict[str, torch.BoolTensor]`` keyed by the state_dict name of the weight it
masks (``"layer1.0.conv1.weight"``), True = kept. Only conv and linear *weights* are ever
masked: BN parameters and biases stay dense in every method fedslim implements.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

import numpy as np
import torch
from torch import nn

__all__ = [
    "DENSE_LAYERS",
    "Masks",
    "apply_masks",
    "erk_densities",
    "magnitude_masks",
    "masked_weight_names",
    "masks_from_artifact",
    "masks_from_zeros",
    "mask_density",
    "prunable_weights",
    "random_erk_masks",
]

Masks = dict[str, torch.Tensor]  # name → bool tensor of the weight's shape, True = kept


def prunable_weights(
    model: nn.Module,
    *,
    include_first: bool = True,
    include_last: bool = True,
    exclude: Iterable[str] = (),
) -> dict[str, torch.Tensor]:
    """Conv and linear weights of `model` by state_dict name, in registration order.

    include_first / include_last: whether the first and last of those layers (stem conv,
    classifier) are included; methods that keep them dense pass False. exclude: name
    substrings to leave out (e.g. ``("shortcut",)`` keeps ResNet downsample convs dense).
    """
    skip = tuple(exclude)
    found: list[tuple[str, torch.Tensor]] = [(f"{name}.weight" if name else "weight", m.weight)
             for name, m in model.named_modules()
             if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))]
    last = len(found) - 1
    return {
        name: w for i, (name, w) in enumerate(found)
        if (include_first or i != 0) and (include_last or i != last)
        and not any(s in name for s in skip)
    }


def _keep_count(numel: int, density: float) -> int:
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density}")
    return min(numel, round(density * numel))


def _top_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of `scores`' shape with exactly the k largest entries True."""
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        mask[torch.topk(scores.flatten(), k, sorted=False).indices] = True
    return mask.view_as(scores)


@torch.no_grad()
def magnitude_masks(
    weights: Mapping[str, torch.Tensor],
    density: float | Mapping[str, float],
    *,
    scope: Literal["layer", "global"] = "layer",
) -> Masks:
    """Keep the largest-|w| entries: exactly round(density·n) per tensor ("layer", where
    `density` may be a per-name mapping) or round(density·N) over all tensors ("global",
    one threshold, so layers end up with different densities)."""
    if scope == "layer":
        out = {}
        for name, w in weights.items():
            d = density[name] if isinstance(density, Mapping) else density
            out[name] = _top_mask(w.detach().abs(), _keep_count(w.numel(), d))
        return out
    if scope != "global":
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
    if isinstance(density, Mapping):
        raise ValueError("global scope takes one density")
    names = list(weights)
    flat = torch.cat([weights[n].detach().abs().flatten().float() for n in names])
    keep = _top_mask(flat, _keep_count(flat.numel(), density))
    out, start = {}, 0
    for n in names:
        size = weights[n].numel()
        out[n] = keep[start : start + size].view(weights[n].shape)
        start += size
    return out


def erk_densities(
    shapes: Mapping[str, Sequence[int]], density: float, *, power_scale: float = 1.0
) -> dict[str, float]:
    """Erdős–Rényi-Kernel layer densities (Evci et al. 2020, RigL) with overall `density`.

    Layer l gets density ε·(Σ dims / Π dims)^power_scale, ε chosen so that the total kept
    count is density·N; layers whose density would exceed 1 are made dense and ε re-solved.
    """
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    numel = {n: math.prod(s) for n, s in shapes.items()}
    raw = {n: (sum(s) / math.prod(s)) ** power_scale for n, s in shapes.items()}
    dense: set[str] = set()
    while True:
        # Kept budget left for the sparse layers after the dense ones take all theirs.
        rhs = sum(density * numel[n] for n in shapes) - sum(numel[n] for n in dense)
        divisor = sum(raw[n] * numel[n] for n in shapes if n not in dense)
        if divisor == 0:
            return {n: 1.0 for n in shapes}
        epsilon = rhs / divisor
        over = [n for n in shapes if n not in dense and epsilon * raw[n] > 1.0]
        if not over:
            return {n: 1.0 if n in dense else epsilon * raw[n] for n in shapes}
        dense.update(over)


def random_erk_masks(
    weights: Mapping[str, torch.Tensor],
    density: float,
    *,
    generator: torch.Generator | None = None,
    power_scale: float = 1.0,
) -> Masks:
    """Random masks with ERK layer densities: exactly round(d_l·n_l) kept entries per layer,
    positions uniform at random (FedDIP's round-0 mask)."""
    densities = erk_densities({n: tuple(w.shape) for n, w in weights.items()}, density,
                              power_scale=power_scale)
    out = {}
    for name, w in weights.items():
        k = _keep_count(w.numel(), densities[name])
        mask = torch.zeros(w.numel(), dtype=torch.bool)
        mask[torch.randperm(w.numel(), generator=generator)[:k]] = True
        out[name] = mask.view(w.shape).to(w.device)
    return out


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Zero the masked-out entries of `model`'s parameters in place (no autograd)."""
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        try:
            p = params[name]
        except KeyError:
            raise KeyError(f"mask for {name!r} but the model has no such parameter") from None
        p.mul_(mask.to(p.dtype))


def mask_density(masks: Mapping[str, torch.Tensor]) -> float:
    """Kept fraction over all masked entries."""
    total = sum(m.numel() for m in masks.values())
    return sum(int(m.sum()) for m in masks.values()) / max(total, 1)


# Name substrings of conv weights that the unstructured mask methods (FedDIP, AutoFLIP)
# keep dense: ResNet downsample / shortcut convs.
DENSE_LAYERS: tuple[str, ...] = ("shortcut", "downsample")


def masked_weight_names(model: nn.Module) -> list[str]:
    """The weights FedDIP/AutoFLIP may prune: conv and linear weights, not BN, not biases,
    not downsample convs. Server and agent halves both call this, so they agree."""
    return list(prunable_weights(model, exclude=DENSE_LAYERS))


def masks_from_artifact(model: nn.Module, data: bytes, names: Sequence[str]) -> Masks:
    """Keep-masks (True = kept) from the task's mask artifact (`sparse_kernels.masks`),
    checked against `model`: exactly the weights `names` (the method's masked weights),
    each of its parameter's shape, indices in range. Raises a `CodecError` otherwise.

    The mask is the server's, not the zeros of what the agent downloaded: a lossy
    broadcast (fp16, top-k) can zero kept entries or leave regrown ones at 0."""
    from sparse_kernels.masks import decode_masks

    params = dict(model.named_parameters())
    masks = decode_masks(data, shapes={n: tuple(p.shape) for n, p in params.items()}, names=names)
    return {n: torch.from_numpy(masks[n]).to(params[n].device) for n in names}


def masks_from_zeros(model: nn.Module, weights: Mapping[str, np.ndarray]) -> Masks:
    """Keep-masks (True = kept) from the exact zeros of `weights`: right only for weights
    that reached the agent exactly (a model it rebuilt itself); a global model's mask comes
    from its artifact (`masks_from_artifact`)."""
    params = dict(model.named_parameters())
    return {n: torch.from_numpy(np.asarray(weights[n]) != 0).to(params[n].device)
            for n in masked_weight_names(model) if n in weights}
