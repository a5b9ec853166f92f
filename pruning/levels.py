"""Width levels: nested structured sub-models of one global model, so that a device whose
memory cannot hold the whole model still trains part of it (HeteroFL, FjORD, FedRolex).

A level keeps the fraction `width` of the channels of every prunable group, chosen
dependency-aware by torch-pruning (residual adds, BN, concat and flatten → linear stay
consistent; widths rounded to the SIMD block as `prune_channels` rounds them; the
classifier keeps its outputs). Which channels a level keeps is the slicing rule:

- "first"      (HeteroFL, ICLR'21): the first k channels: static nested slices;
- "importance" (ordered by importance, FjORD's ordered dropout with the order taken from
               the trained model's channel L2 norms instead of training the order in);
- "rolling"    (FedRolex, NeurIPS'22): a window of k channels whose start moves by one
               channel per round, wrapping around, so every channel gets trained.

A level is data: a `Reshape` of the global weights (kept indices per tensor and dimension)
plus its MACs. The coordinator and the agent slice with `apply_reshape` and the
coordinator folds a slice's delta back with `SparseAccumulator.fold(slice=)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from models import count_macs
from models.state import build_from_state
from models.zoo import default_image_size
from pruning.structured import kept_reshape, prune_channels
from sparse_kernels.reshape import Reshape, slice_shapes
from sparse_kernels.types import Weights

__all__ = ["RULES", "Level", "SliceRule", "level_slices", "recalibrate_bn"]

SliceRule = Literal["first", "importance", "rolling"]
RULES: tuple[str, ...] = ("first", "importance", "rolling")


@dataclass(frozen=True)
class Level:
    width: float  # the requested fraction of channels per group (1.0: the global model)
    reshape: Reshape  # kept indices of the global weights ({} for the global model)
    shapes: dict[str, tuple[int, ...]]  # the slice's tensor shapes
    macs: int  # per sample


def level_slices(model: str, weights: Weights, widths: Sequence[float], *, rule: SliceRule = "first", rnd: int = 0,
                 round_to: int = 8, in_channels: int = 1, num_classes: int = 10,
                 image_size: int | None = None) -> list[Level]:
    """One `Level` per width (in the order given) — the sub-models of `weights` — except
    widths that round to the same channels as an earlier one (their index would name the
    same slice): level indices are positions in this list, on both sides of the wire."""
    if rule not in RULES:
        raise ValueError(f"unknown slicing rule {rule!r}; valid: {', '.join(RULES)}")
    size = image_size or default_image_size(in_channels)
    shape = (in_channels, size, size)
    shapes = {k: v.shape for k, v in weights.items()}
    levels: list[Level] = []
    for width in widths:
        if not 0 < width <= 1:
            raise ValueError(f"a width is a fraction in (0, 1], got {width}")
        net = build_from_state(model, weights, in_channels=in_channels, num_classes=num_classes, image_size=image_size)
        reshape: Reshape = {}
        if width < 1:
            # torch-pruning slices each parameter's .grad with the parameter: seeded with
            # flat positions, the grads come out as the kept positions (`kept_reshape`)
            for p in net.parameters():
                p.grad = torch.arange(p.numel(), dtype=torch.float32).reshape(p.shape)
            prune_channels(net, torch.zeros(1, *shape), ratio=1.0 - width, round_to=round_to,
                           importance=_scorer(rule, rnd))
            reshape = kept_reshape(net, weights)
        sliced = slice_shapes(shapes, reshape)
        if any(level.shapes == sliced for level in levels):
            continue
        levels.append(Level(float(width), reshape, sliced, int(count_macs(net, shape))))
    return levels


def _scorer(rule: SliceRule, rnd: int) -> Any:
    """torch-pruning group → score per channel of its root (the highest k are kept)."""
    if rule == "importance":
        return "l2"

    def by_position(group: Any) -> torch.Tensor:
        n = len(group[0].idxs)
        position = torch.arange(n, dtype=torch.float32)
        if rule == "rolling":
            position = (position - rnd % n) % n  # the window starts at channel rnd mod n
        return -position  # earlier positions first

    return by_position


@torch.no_grad()
def recalibrate_bn(net: torch.nn.Module, batches: Sequence[torch.Tensor]) -> bool:
    """Re-estimate every BatchNorm's running statistics of `net` on `batches` (HeteroFL's
    static BN: a slice's channels see other inputs than in the wider models whose
    statistics were averaged into it). False, and nothing changes, without BN."""
    norms = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms or not batches:
        return False
    saved = [(m.momentum, m.training) for m in norms]
    was_training = net.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches
    net.train()
    for x in batches:
        net(x)
    for m, (momentum, _) in zip(norms, saved, strict=True):
        m.momentum = momentum
    net.train(was_training)
    return True
