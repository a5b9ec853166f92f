"""Adaptive dynamic pruning (Yu et al. 2021): per-sample channel gating, FBS-style.

For a gated conv layer with input x (B, C_in, H, W)::

    s = GAP(x)                          # (B, C_in)
    g = ReLU(Linear(C_in → C_out)(s))   # (B, C_out); Kaiming-normal weight, bias 1
    g = g with all but the top round(ratio·C_out) entries per sample set to 0
    out = BN(conv(x)) · g[..., None, None]

The model's own ReLU follows (ReLU(a·g) = ReLU(a)·g since g ≥ 0), so the wrapped model
computes ReLU(BN(conv(x))·g) as specified. Zeroed channels have zero output and zero
gradient for their filters. Gates count how often each channel is kept (`usage`), which
`static_keep_channels` turns into a static structured-pruning decision.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = [
    "ChannelGate",
    "GatedConvBN",
    "channel_usage",
    "effective_macs",
    "gate_model",
    "gated_layers",
    "static_keep_channels",
]


class ChannelGate(nn.Module):
    """Per-sample saliency of C_out channels from the C_in input channels; keeps the top
    round(ratio·C_out) (at least 1) per sample, zeroes the rest.

    Buffers: `usage` (C_out,) counts per channel how many samples kept it; `samples` counts
    samples seen (in training and eval alike; `reset_usage()` clears both).
    """

    usage: torch.Tensor
    samples: torch.Tensor

    def __init__(self, c_in: int, c_out: int, ratio: float) -> None:
        super().__init__()
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"ratio must be in (0, 1], got {ratio}")
        self.ratio = ratio
        self.keep = max(1, round(ratio * c_out))
        self.fc = nn.Linear(c_in, c_out)
        nn.init.kaiming_normal_(self.fc.weight)
        nn.init.constant_(self.fc.bias, 1.0)
        self.register_buffer("usage", torch.zeros(c_out, dtype=torch.long))
        self.register_buffer("samples", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, H, W) → (B, C_out)
        s = x.mean(dim=(2, 3))  # global average pool, (B, C_in)
        g = torch.relu(self.fc(s))
        top = torch.topk(g, self.keep, dim=1).indices  # (B, keep)
        keep = torch.zeros_like(g, dtype=torch.bool).scatter_(1, top, True)
        with torch.no_grad():
            self.usage += keep.sum(0)
            self.samples += g.shape[0]
        return g * keep

    def reset_usage(self) -> None:
        self.usage.zero_()
        self.samples.zero_()


class GatedConvBN(nn.Module):
    """conv → (BN) → · gate. Replaces a conv (and its BN) in a model; the model's ReLU
    follows. Records, for the last batch, the gate (`last_gate`, (B, C_out)) and how many
    input channels were nonzero per sample (`last_active_in`, (B,)), to count real MACs."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d | None, ratio: float) -> None:
        super().__init__()
        self.conv = conv
        self.bn = bn if bn is not None else nn.Identity()
        self.gate = ChannelGate(conv.in_channels, conv.out_channels, ratio)
        self.last_gate: torch.Tensor | None = None
        self.last_active_in: torch.Tensor | None = None
        self.last_out_hw: tuple[int, int] = (0, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, H, W) → (B, C_out, H', W')
        g = self.gate(x)
        out = self.bn(self.conv(x)) * g[:, :, None, None]
        with torch.no_grad():
            self.last_gate = g.detach()
            self.last_active_in = (x.detach().abs().amax(dim=(2, 3)) > 0).sum(1)
            self.last_out_hw = (out.shape[2], out.shape[3])
        return out

    def effective_macs(self) -> float:
        """Mean per-sample MACs of the conv on the last batch, counting only nonzero input
        channels and kept output channels (what a gather-based kernel would compute)."""
        if self.last_gate is None or self.last_active_in is None:
            raise RuntimeError("run a forward pass first")
        kh, kw = self.conv.kernel_size
        out_active = (self.last_gate > 0).sum(1).double()
        in_active = self.last_active_in.double() / self.conv.groups
        h, w = self.last_out_hw
        return float((in_active * out_active).mean()) * kh * kw * h * w

    def dense_macs(self) -> int:
        kh, kw = self.conv.kernel_size
        h, w = self.last_out_hw
        return self.conv.in_channels // self.conv.groups * self.conv.out_channels * kh * kw * h * w


def gate_model(model: nn.Module, ratio: float, *, skip: tuple[str, ...] = ()) -> nn.Module:
    """Wrap every Conv2d of `model` in a `GatedConvBN`, in place; returns `model`.

    A conv immediately followed (in its parent's registration order) by a BatchNorm2d of
    matching width is fused with it: the BN becomes Identity and the wrapper gates BN
    output (zoo ResNets, VGG). A conv with no BN after it (fedavg_cnn, lenet5) is gated on
    its output directly. skip: conv names (as in named_modules) to leave ungated.
    """
    for parent_name, parent in list(model.named_modules()):
        if isinstance(parent, GatedConvBN):
            continue
        children = list(parent.named_children())
        for i, (child_name, child) in enumerate(children):
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            if not isinstance(child, nn.Conv2d) or full in skip:
                continue
            bn = None
            if i + 1 < len(children):
                nxt_name, nxt = children[i + 1]
                if isinstance(nxt, nn.BatchNorm2d) and nxt.num_features == child.out_channels:
                    bn = nxt
                    setattr(parent, nxt_name, nn.Identity())
            setattr(parent, child_name, GatedConvBN(child, bn, ratio))
    return model


def gated_layers(model: nn.Module) -> dict[str, GatedConvBN]:
    """The gated layers of `model` by module name, in registration order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, GatedConvBN)}


def channel_usage(model: nn.Module) -> dict[str, torch.Tensor]:
    """Per gated layer, the fraction of samples that kept each output channel, (C_out,)."""
    return {n: m.gate.usage.double() / max(int(m.gate.samples), 1) for n, m in gated_layers(model).items()}


def effective_macs(model: nn.Module) -> dict[str, float]:
    """Per gated layer, mean per-sample MACs on the last batch (see GatedConvBN)."""
    return {n: m.effective_macs() for n, m in gated_layers(model).items()}


def static_keep_channels(
    usage: torch.Tensor | dict[str, torch.Tensor], keep_fraction: float, *, round_to: int = 8
) -> torch.Tensor | dict[str, torch.Tensor]:
    """Channels to keep in a static structured export: the most-used ones.

    Per layer keeps n = ceil(keep_fraction·C / round_to)·round_to channels (at most C; the
    SIMD-friendly widths of DESIGN.md), returned as sorted channel indices. Ties are
    broken by lower index. Accepts one usage vector or a dict of them.
    """
    if isinstance(usage, dict):
        return {n: _keep_one(u, keep_fraction, round_to) for n, u in usage.items()}
    return _keep_one(usage, keep_fraction, round_to)


def _keep_one(usage: torch.Tensor, keep_fraction: float, round_to: int) -> torch.Tensor:
    if not 0.0 < keep_fraction <= 1.0:
        raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
    c = usage.numel()
    step = max(1, round_to)
    n = min(c, math.ceil(keep_fraction * c / step - 1e-9) * step)
    # Stable ordering: sort by usage descending, index ascending among equals.
    order = torch.argsort(-usage.double(), stable=True)
    return torch.sort(order[:n]).values
