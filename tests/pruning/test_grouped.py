"""Grouped convolutions (ResNeXt / ShuffleNet style) prune per group, against the oracle:
the pruned model computes exactly what the original computes with the dropped channels'
inputs zeroed (eval mode), and `reshape_to` rebuilds the pruned structure."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from models import count_macs
from models.structure import StructureError, reshape_to, structure_of
from pruning.structured import kept_reshape, macs_fraction, prune_channels
from tests.pruning.test_levels import zero_dropped_inputs

SHAPE = (3, 16, 16)


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c)


class GroupedNet(nn.Module):
    """stem → ResNeXt bottleneck (1×1 → 3×3 conv, 4 groups → 1×1, + identity) → ShuffleNet
    pointwise group conv (8 groups, reading the residual stream) → pool → fc."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 32, 3, padding=1, bias=False), _bn(32), nn.ReLU())
        self.reduce = nn.Sequential(nn.Conv2d(32, 64, 1, bias=False), _bn(64), nn.ReLU())
        self.grouped = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1, groups=4, bias=False), _bn(64), nn.ReLU())
        self.expand = nn.Sequential(nn.Conv2d(64, 32, 1, bias=False), _bn(32))
        self.shuffle_pw = nn.Sequential(nn.Conv2d(32, 64, 1, stride=2, groups=8, bias=False), _bn(64), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) → (B, classes)
        s = self.stem(x)
        s = torch.relu(s + self.expand(self.grouped(self.reduce(s))))  # (B, 32, H, W)
        return self.fc(torch.flatten(self.pool(self.shuffle_pw(s)), 1))


def _randomized(model: nn.Module) -> nn.Module:
    """BN statistics and affine terms away from 0/1, so a wrongly sliced BN shows."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                for t in (m.running_mean, m.weight, m.bias):
                    t.copy_(torch.randn(t.shape, generator=gen) * 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return model.eval()


def _weights(model: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items() if v.is_floating_point()}


def _pruned_with_kept(model: nn.Module, x: torch.Tensor, **kw: object) -> tuple[nn.Module, dict]:
    """Prune a copy; torch-pruning slices .grad with each parameter, so grads seeded with
    flat positions come out as the kept positions (`kept_reshape`)."""
    pruned = copy.deepcopy(model)
    for p in pruned.parameters():
        p.grad = torch.arange(p.numel(), dtype=torch.float32).reshape(p.shape)
    prune_channels(pruned, x, **kw)  # type: ignore[arg-type]
    return pruned.eval(), kept_reshape(pruned, _weights(model))


@pytest.mark.parametrize("importance", ["l2", "bn", "random"])
def test_grouped_pruned_equals_original_with_dropped_inputs_zeroed(importance):
    original = _randomized(GroupedNet())
    x = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(1))
    pruned, kept = _pruned_with_kept(original, x, ratio=0.5, round_to=8, importance=importance)

    # every conv group keeps the same count, and the groups survive
    assert pruned.grouped[0].groups == 4 and pruned.grouped[0].out_channels == 32
    assert pruned.shuffle_pw[0].groups == 8 and pruned.shuffle_pw[0].in_channels == 16
    assert count_macs(pruned, SHAPE) < count_macs(original, SHAPE)

    zeroed = copy.deepcopy(original)
    zeroed.load_state_dict({k: torch.from_numpy(v) for k, v in zero_dropped_inputs(_weights(original), kept).items()},
                           strict=False)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), zeroed.eval()(x), rtol=1e-4, atol=1e-5)


def test_grouped_positions_match_across_groups():
    # the same in-group positions leave every group: that is what the consumer's in-channel slice assumes
    original = _randomized(GroupedNet())
    x = torch.randn(2, *SHAPE)
    _, kept = _pruned_with_kept(original, x, ratio=0.5, round_to=8)
    out_kept = np.array(kept["reduce.0.weight"][0])  # the grouped conv's inputs
    per_group = out_kept.reshape(4, -1) % 16  # 64 channels in 4 groups of 16
    assert (per_group == per_group[0]).all()
    assert kept["grouped.0.weight"][1] == per_group[0].tolist()


def test_grouped_pruned_structure_rebuilds_from_shapes():
    original = _randomized(GroupedNet())
    x = torch.randn(2, *SHAPE)
    pruned, _ = _pruned_with_kept(original, x, target_macs=0.5, round_to=8)
    assert macs_fraction(pruned, count_macs(original, SHAPE), SHAPE) <= 0.5

    rebuilt = reshape_to(GroupedNet(), structure_of(pruned)).eval()
    rebuilt.load_state_dict(pruned.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), pruned(x))
    assert rebuilt.grouped[0].groups == 4


def test_reshape_refuses_widths_that_do_not_split_into_the_groups():
    shapes = structure_of(GroupedNet())
    shapes["grouped.0.weight"] = (30, 16, 3, 3)  # 30 outputs cannot be 4 equal groups
    with pytest.raises(StructureError, match="groups"):
        reshape_to(GroupedNet(), shapes)


def test_fpgm_is_refused_on_grouped_convs_before_anything_changes():
    model = GroupedNet().eval()
    before = structure_of(model)
    with pytest.raises(ValueError, match="fpgm.*grouped"):
        prune_channels(model, torch.randn(2, *SHAPE), ratio=0.5, importance="fpgm")
    assert structure_of(model) == before
