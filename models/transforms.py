"""Normalisation and augmentation written with torch ops (no torchvision)."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["DATASET_STATS", "random_crop_flip", "to_tensor"]

# Per-channel mean and std of the training splits, in [0, 1] units.
DATASET_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "synthetic": ((0.5,), (0.3,)),
}


def to_tensor(images: np.ndarray, dataset: str, mean: tuple[float, ...] | None = None,
              std: tuple[float, ...] | None = None) -> torch.Tensor:
    """uint8 (N, H, W, C) → normalised float32 (N, C, H, W): x/255, then (x - mean)/std
    with the dataset's statistics unless `mean`/`std` are given. Float inputs (numeric
    features) skip the /255."""
    if mean is None or std is None:
        mean, std = DATASET_STATS.get(dataset, ((0.5,), (0.25,)))
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    if images.dtype == np.uint8:
        x = x.div_(255.0)
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return (x - m) / s


def random_crop_flip(x: torch.Tensor, *, pad: int = 4, generator: torch.Generator | None = None) -> torch.Tensor:
    """CIFAR augmentation on a batch (B, C, H, W): zero-pad, random crop back, random h-flip."""
    b, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    rows = (dy.view(b, 1) + torch.arange(h).view(1, h))  # (B, H)
    cols = (dx.view(b, 1) + torch.arange(w).view(1, w))  # (B, W)
    flip = torch.rand(b, generator=generator) < 0.5
    cols = torch.where(flip.view(b, 1), cols.flip(1), cols)
    bi = torch.arange(b).view(b, 1, 1)
    out = padded.permute(0, 2, 3, 1)[bi, rows.view(b, h, 1), cols.view(b, 1, w)]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()
