"""Adaptive dynamic pruning: per-sample channel gates zero exactly the non-top channels,
their filters get zero gradient, MACs scale ≈ ratio², usage drives the static export."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models import build_model
from models.gating import (
    ChannelGate,
    GatedConvBN,
    channel_usage,
    effective_macs,
    gate_model,
    gated_layers,
)


def test_gate_keeps_the_top_channels_per_sample() -> None:
    gate = ChannelGate(6, 10, ratio=0.7)
    assert torch.all(gate.fc.bias == 1.0)
    x = torch.randn(5, 6, 4, 4)
    with torch.no_grad():
        g = gate(x)
        raw = torch.relu(gate.fc(x.mean(dim=(2, 3))))
    for b in range(5):
        kept = set(torch.topk(raw[b], 7).indices.tolist())
        assert set(g[b].nonzero().flatten().tolist()) <= kept  # ReLU may zero a kept one too
        for c in range(10):
            expected = raw[b, c] if c in kept else 0.0
            assert float(g[b, c]) == pytest.approx(float(expected))
    assert int(gate.usage.sum()) == 5 * 7 and int(gate.samples) == 5


def test_gated_layer_zeroes_channels_and_their_filter_gradients() -> None:
    layer = GatedConvBN(nn.Conv2d(4, 10, 3, padding=1, bias=False), nn.BatchNorm2d(10), ratio=0.5)
    x = torch.randn(1, 4, 6, 6)  # one sample: per-sample gating = per-batch gating
    out = layer(x)
    assert layer.last_gate is not None
    dropped = (layer.last_gate[0] == 0).nonzero().flatten()
    assert len(dropped) >= 5
    assert not out[0, dropped].any()  # dropped channels output exactly zero
    (out**2).sum().backward()
    w_grad = layer.conv.weight.grad
    assert w_grad is not None
    assert not w_grad[dropped].any()  # their filters get no gradient
    kept = (layer.last_gate[0] > 0).nonzero().flatten()
    assert w_grad[kept].abs().sum() > 0  # kept filters do
    gate_grad = layer.gate.fc.weight.grad
    assert gate_grad is not None and not gate_grad[dropped].any()


@pytest.mark.parametrize(
    ("name", "in_channels", "n_conv", "has_bn"),
    [
        ("resnet20", 3, 21, True),  # stem + 18 block convs + 2 shortcut convs
        ("vgg11_bn", 3, 8, True),
        ("lenet5", 1, 2, False),  # no BN: conv output gated directly
    ],
)
def test_gate_model_wraps_every_conv(name: str, in_channels: int, n_conv: int, has_bn: bool) -> None:
    model = gate_model(build_model(name, in_channels=in_channels), 0.7)
    layers = gated_layers(model)
    assert len(layers) == n_conv
    assert all(isinstance(m.bn, nn.BatchNorm2d) == has_bn for m in layers.values())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules()
                   if not any(m is layer.bn for layer in layers.values()))  # no BN left unfused
    size = 28 if in_channels == 1 else 32
    out = model(torch.randn(3, in_channels, size, size))
    assert out.shape == (3, 10)
    usage = channel_usage(model)
    for n, layer in layers.items():
        assert float(usage[n].sum()) == pytest.approx(layer.gate.keep)  # keep channels/sample


def test_gated_conv_macs_scale_with_ratio_squared() -> None:
    c, ratio = 20, 0.7
    first = GatedConvBN(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), ratio)
    second = GatedConvBN(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), ratio)
    model = nn.Sequential(first, nn.ReLU(), second, nn.ReLU())
    model(torch.randn(8, c, 8, 8))
    macs = effective_macs(model)
    assert macs["2"] / second.dense_macs() == pytest.approx((14 / 20) ** 2, abs=0.01)  # in and out gated
    assert macs["0"] / first.dense_macs() == pytest.approx(14 / 20, abs=0.01)  # only out gated
