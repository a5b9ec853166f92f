"""The structured pruner removes the *least* important channels of each coupled group.

Which channels survived is read the way the width levels read it: every parameter's .grad
is seeded with its flat positions before pruning, torch-pruning slices .grad with the
weight, and `kept_reshape` turns what is left into kept indices. A pruner that keeps the
most important channels' complement (argsort descending, or dropping the top) fails
both tests: the one-shot `ratio=` path and the iterative `target_macs=` path.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from models import build_model
from pruning.structured import channel_importance, kept_reshape, prune_channels


def _seed_positions(model: nn.Module) -> dict[str, np.ndarray]:
    for p in model.parameters():
        p.grad = torch.arange(p.numel(), dtype=torch.float32).reshape(p.shape)
    return {n: v.detach().numpy().copy() for n, v in model.state_dict().items()}


@pytest.mark.parametrize("layer", [
    "layer1.0.conv1",  # a block's inner conv: conv1 → bn1 → conv2's inputs
    "layer3.2.conv1",  # the widest stage
    "conv1",  # the stem: its group is stage 1's whole residual stream
])
def test_ratio_keeps_the_highest_scoring_channels_of_the_group(layer: str) -> None:
    torch.manual_seed(0)
    model = build_model("resnet20")
    x = torch.randn(2, 1, 28, 28)
    module = model.get_submodule(layer)
    scores = channel_importance(model, x, layers=[module])  # root name → (C,) group L2 importance
    assert len(scores) == 1
    (root, score), = scores.items()
    old = _seed_positions(model)

    prune_channels(model, x, ratio=0.5, layers=[module])

    kept = kept_reshape(model, old)[f"{root}.weight"][0]
    assert kept is not None and len(kept) == score.numel() // 2
    expect = sorted(torch.argsort(score, descending=True)[: len(kept)].tolist())
    assert kept == expect
    assert score[kept].min() > score[[i for i in range(score.numel()) if i not in kept]].max()


class _Plain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, 8, 8) → (B, 10)
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def test_target_macs_keeps_the_top_channels_through_every_cut() -> None:
    torch.manual_seed(0)
    model = _Plain()
    x = torch.randn(2, 1, 8, 8)
    old = _seed_positions(model)
    rng = np.random.default_rng(0)
    table = {"conv1": torch.from_numpy(rng.permutation(16).astype(np.float32)),
             "conv2": torch.from_numpy(rng.permutation(32).astype(np.float32))}
    names = {m: n for n, m in model.named_modules()}
    per_filter = {n: old[f"{n}.weight"][0].size for n in table}  # before any input channel is cut

    def importance(group: object) -> torch.Tensor:
        """A fixed score per *original* channel, read through the seeded positions, so it
        stays right after earlier cuts renumbered the channels."""
        root = group[0].dep.target.module  # type: ignore[index]
        name = names[root]
        original = (root.weight.grad.flatten(1)[:, 0] // per_filter[name]).long()  # (current C,)
        return table[name][original]

    reference = copy.deepcopy(model)
    prune_channels(model, x, target_macs=0.4, round_to=4, importance=importance)

    kept = kept_reshape(model, old)
    widths = []
    for name, score in table.items():
        dims = kept[f"{name}.weight"][0]
        assert dims is not None
        widths.append(len(dims))
        assert dims == sorted(torch.argsort(score, descending=True)[: len(dims)].tolist()), name
    assert widths[0] < 16 and widths[1] < 32  # both groups were cut, over several steps
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in reference.parameters())
