"""Parameter and MAC counting.

MACs are the multiply-accumulates of convolutions and linear layers, measured by running
one forward pass under `torch.utils.flop_counter.FlopCounterMode` and halving its FLOPs
(it counts 2 FLOPs per multiply-add and ignores BN, activations and pooling).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_macs", "count_params"]


def count_params(model: nn.Module) -> int:
    """Number of parameters (buffers such as BN running stats excluded)."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Conv + linear multiply-adds for one sample of `input_shape` (C, H, W)."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        x = torch.zeros((1, *input_shape), device=device)
        counter = FlopCounterMode(display=False)
        with counter:
            model(x)
        return counter.get_total_flops() // 2
    finally:
        model.train(was_training)
