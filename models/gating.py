"""Adaptive dynamic pruning (Yu et al. 2021): per-sample channel gating, FBS-style.

For a gated conv layer with input x (B, C_in, H, W)::

    s = GAP(x)                          # (B, C_in)
    g = ReLU(Linear(C_in → C_out)(s))   # (B, C_out); Kaiming-normal weight, bias 1
    g = g with all but the top round(ratio·C_out) entries per sample set to 0
    out = BN(conv(x)) · g[..., None, None]

The model's own ReLU follows (ReLU(a·g) = ReLU(a)·g since g ≥ 0), so the wrapped model
computes ReLU(BN(conv(x))·g) as specified. Zeroed channels have zero output and zero
gradient for their filters.

A gated model is a model transformation (`gate_model`), and it describes itself in its
state: each gate's `top_k` (channels kept per sample) is a float buffer that travels with
the weights, so `gate_as` (and `models.state.build_from_state`) can rebuild a gated model
from its weights alone. The gates' statistics (`usage`, `gate_sum`, `samples`) are not
persistent: they describe one agent's data, not the model.

`ungate` turns a gated model back into the plain zoo model, folding each channel's mean
gate into the layer (the static approximation), for a structured export.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

__all__ = [
    "GATE_KEY",
    "TOP_K_KEY",
    "ChannelGate",
    "GatedConvBN",
    "channel_usage",
    "effective_macs",
    "gate_as",
    "gate_model",
    "gated_layers",
    "gated_macs_fraction",
    "gated_widths",
    "mean_gate",
    "reset_gate_stats",
    "ungate",
    "zero_init_residual",
]

# state_dict suffixes of a gated layer: its gate's bias (C_out,) and its top_k ()
GATE_KEY = ".gate.fc.bias"
TOP_K_KEY = ".gate.top_k"


class ChannelGate(nn.Module):
    """Per-sample saliency of C_out channels from the C_in input channels; keeps the top
    round(ratio·C_out) (at least 1) per sample, zeroes the rest.

    Persistent buffer: `top_k` (), the number of channels kept per sample, as a float so
    that it travels with the model's float state (exact in fp16 up to 2048).
    Statistics (not persistent; in training and eval alike; `reset_usage()` clears them):
    `usage` (C_out,) counts per channel how many samples kept it, `gate_sum` (C_out,) sums
    the returned gate values g·keep, `samples` counts samples seen.
    """

    top_k: torch.Tensor
    usage: torch.Tensor
    gate_sum: torch.Tensor
    samples: torch.Tensor

    def __init__(self, c_in: int, c_out: int, ratio: float, *, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"ratio must be in (0, 1], got {ratio}")
        self.fc = nn.Linear(c_in, c_out)
        nn.init.kaiming_normal_(self.fc.weight, generator=generator)
        nn.init.constant_(self.fc.bias, 1.0)
        self.register_buffer("top_k", torch.tensor(float(max(1, round(ratio * c_out)))))
        self.register_buffer("usage", torch.zeros(c_out, dtype=torch.long), persistent=False)
        self.register_buffer("gate_sum", torch.zeros(c_out), persistent=False)
        self.register_buffer("samples", torch.zeros((), dtype=torch.long), persistent=False)

    @property
    def keep(self) -> int:
        """Channels kept per sample, from the `top_k` buffer (clamped to [1, C_out])."""
        return min(self.fc.out_features, max(1, round(float(self.top_k))))

    @property
    def ratio(self) -> float:
        return self.keep / self.fc.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, H, W) → (B, C_out)
        s = x.mean(dim=(2, 3))  # global average pool, (B, C_in)
        g = torch.relu(self.fc(s))
        top = torch.topk(g, self.keep, dim=1).indices  # (B, keep)
        keep = torch.zeros_like(g, dtype=torch.bool).scatter_(1, top, True)
        out = g * keep
        with torch.no_grad():
            self.usage += keep.sum(0)
            self.gate_sum += out.detach().sum(0)
            self.samples += g.shape[0]
        return out

    def reset_usage(self) -> None:
        self.usage.zero_()
        self.gate_sum.zero_()
        self.samples.zero_()


class GatedConvBN(nn.Module):
    """conv → (BN) → · gate. Replaces a conv (and its BN) in a model; the model's ReLU
    follows. `bn_name` is the attribute name the BN had beside the conv in their parent
    (now an Identity there), so that `ungate` can put it back.

    Records, for the last batch, the gate (`last_gate`, (B, C_out)) and how many input
    channels were nonzero per sample (`last_active_in`, (B,)), to count real MACs; and,
    since the last `reset_stats()`, the sum over samples of the per-sample MACs fraction
    (`macs_sum`, not persistent)."""

    macs_sum: torch.Tensor

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d | None, ratio: float, *,
                 bn_name: str | None = None, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.conv = conv
        self.bn = bn if bn is not None else nn.Identity()
        self.bn_name = bn_name if bn is not None else None
        self.gate = ChannelGate(conv.in_channels, conv.out_channels, ratio, generator=generator)
        self.register_buffer("macs_sum", torch.zeros((), dtype=torch.float64), persistent=False)
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
            # per-sample fraction of the dense MACs: (active in / C_in)·(active out / C_out)
            frac = self.last_active_in.double() * (self.last_gate > 0).sum(1).double()
            self.macs_sum += frac.sum() / (self.conv.in_channels * self.conv.out_channels)
        return out

    def reset_stats(self) -> None:
        self.gate.reset_usage()
        self.macs_sum.zero_()

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


def gate_model(model: nn.Module, ratio: float, *, skip: tuple[str, ...] = (),
               generator: torch.Generator | None = None) -> nn.Module:
    """Wrap every Conv2d of `model` in a `GatedConvBN`, in place; returns `model`.

    A conv immediately followed (in its parent's registration order) by a BatchNorm2d of
    matching width is fused with it: the BN becomes Identity and the wrapper gates BN
    output (zoo ResNets, VGG). A conv with no BN after it (fedavg_cnn, lenet5) is gated on
    its output directly. skip: conv names (as in named_modules) to leave ungated.
    generator: draws the gates' initial weights from it (reproducible even while other
    threads use the global RNG).
    """
    for parent_name, parent in list(model.named_modules()):
        if isinstance(parent, GatedConvBN):
            continue
        children = list(parent.named_children())
        for i, (child_name, child) in enumerate(children):
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            if not isinstance(child, nn.Conv2d) or full in skip:
                continue
            bn, bn_name = None, None
            if i + 1 < len(children):
                nxt_name, nxt = children[i + 1]
                if isinstance(nxt, nn.BatchNorm2d) and nxt.num_features == child.out_channels:
                    bn, bn_name = nxt, nxt_name
                    setattr(parent, nxt_name, nn.Identity())
            setattr(parent, child_name, GatedConvBN(child, bn, ratio, bn_name=bn_name, generator=generator))
    return model


def zero_init_residual(model: nn.Module) -> int:
    """Set γ = 0 in the last BatchNorm2d of every residual branch (Goyal et al. 2017; torchvision's
    `zero_init_residual`), in place; returns how many were set.

    Why: a gate starts at g = ReLU(W·s + 1) with Kaiming-normal W, a gain above 1 that
    multiplies every gated branch, and residual blocks add it up along the whole depth.
    Measured on ResNet-32 (Fashion-MNIST shape, batch 64, at init): logits 1.8e9 and a
    gradient norm 1.1e10 as specified, 0.57 and 0.50 with this (ResNet-20: 7.0e3 → 0.86).
    Each block then starts as the identity; the gates keep the specified init.
    A residual block is a module with a `shortcut` or `downsample` child (the zoo's and
    torchvision's names); its branch's last BN is its last BatchNorm2d child outside those.
    """
    count = 0
    for module in model.modules():
        if not any(hasattr(module, name) for name in ("shortcut", "downsample")):
            continue
        bns = [child for name, child in module.named_children()
               if name not in ("shortcut", "downsample") and isinstance(child, nn.BatchNorm2d)]
        if bns:
            nn.init.zeros_(bns[-1].weight)
            count += 1
    return count


def gated_widths(shapes: Mapping[str, Sequence[int] | np.ndarray]) -> dict[str, int]:
    """The gated layers a state describes (name → C_out), from its keys: pure, no model.
    `shapes` maps state_dict keys to shapes or to the arrays themselves."""
    out = {}
    for key, value in shapes.items():
        if key.endswith(GATE_KEY):
            shape = value.shape if isinstance(value, np.ndarray) else tuple(value)
            out[key.removesuffix(GATE_KEY)] = int(shape[0])
    return out


def gate_as(model: nn.Module, weights: Mapping[str, np.ndarray | Sequence[int]]) -> nn.Module:
    """Gate, in place, exactly the convs that the state `weights` has gates for (load the
    weights afterwards: that sets each gate's `top_k`). Returns `model`."""
    gated = set(gated_widths(weights))
    convs = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    unknown = gated - convs
    if unknown:
        raise KeyError(f"weights gate layers the model has no conv for: {sorted(unknown)[:5]}")
    return gate_model(model, 1.0, skip=tuple(sorted(convs - gated)))


def gated_layers(model: nn.Module) -> dict[str, GatedConvBN]:
    """The gated layers of `model` by module name, in registration order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, GatedConvBN)}


def reset_gate_stats(model: nn.Module) -> None:
    for layer in gated_layers(model).values():
        layer.reset_stats()


def channel_usage(model: nn.Module) -> dict[str, torch.Tensor]:
    """Per gated layer, the fraction of samples that kept each output channel, (C_out,)."""
    return {n: m.gate.usage.double() / max(int(m.gate.samples), 1) for n, m in gated_layers(model).items()}


def mean_gate(model: nn.Module) -> dict[str, torch.Tensor]:
    """Per gated layer, the mean over samples of each channel's gate value g·keep (0 for
    a sample that dropped it), (C_out,): the scale `ungate` folds into the layer."""
    return {n: m.gate.gate_sum.double() / max(int(m.gate.samples), 1) for n, m in gated_layers(model).items()}


def gated_macs_fraction(model: nn.Module) -> dict[str, float]:
    """Per gated layer, the mean over samples (since the last reset) of its conv's MACs
    over the dense conv's: active inputs × active outputs, as `effective_macs` counts."""
    return {n: float(m.macs_sum) / max(int(m.gate.samples), 1) for n, m in gated_layers(model).items()}


def effective_macs(model: nn.Module) -> dict[str, float]:
    """Per gated layer, mean per-sample MACs on the last batch (see GatedConvBN)."""
    return {n: m.effective_macs() for n, m in gated_layers(model).items()}


@torch.no_grad()
def ungate(model: nn.Module, gates: Mapping[str, torch.Tensor | np.ndarray]) -> nn.Module:
    """Replace, in place, every gated layer by its conv (and BN, back at its own name),
    with `gates[layer]` (C_out,) — the mean gate ḡ of each channel — folded in; returns
    `model`, whose state_dict keys are the plain model's again.

    BN(conv(x))·ḡ = (ḡγ)·x̂ + ḡβ: ḡ scales the BN affine; with no BN, (Wx + b)·ḡ scales
    the conv's filters and bias. Exact for a constant gate; for the per-sample gate it is
    the static approximation E[g]. A channel no sample kept (ḡ = 0) outputs 0.
    """
    layers = gated_layers(model)
    missing = sorted(set(layers) - set(gates))
    if missing:
        raise KeyError(f"no mean gate for gated layers {missing[:5]}")
    for name, layer in layers.items():
        g = torch.as_tensor(np.asarray(gates[name]), dtype=layer.conv.weight.dtype).to(layer.conv.weight.device)
        if g.shape != (layer.conv.out_channels,):
            raise ValueError(f"{name}: mean gate has shape {tuple(g.shape)}, expected ({layer.conv.out_channels},)")
        if (g < 0).any():
            raise ValueError(f"{name}: gates are ReLU outputs, a mean gate cannot be negative")
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        if isinstance(layer.bn, nn.BatchNorm2d):
            if layer.bn_name is None or not isinstance(getattr(parent, layer.bn_name, None), nn.Identity):
                raise ValueError(f"{name}: its BN's original place is unknown (gate it with gate_model)")
            if layer.bn.weight is None or layer.bn.bias is None:
                raise ValueError(f"{name}: cannot fold a gate into a BN without affine parameters")
            layer.bn.weight.mul_(g)
            layer.bn.bias.mul_(g)
            setattr(parent, layer.bn_name, layer.bn)
        else:
            layer.conv.weight.mul_(g[:, None, None, None])  # (C_out, C_in/groups, kh, kw)
            if layer.conv.bias is not None:
                layer.conv.bias.mul_(g)
        setattr(parent, child_name, layer.conv)
    return model
