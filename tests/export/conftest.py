"""Fixtures for the export tests: seeded torch, small synthetic images, a custom model
(depthwise convs, a concat and a residual add) that the zoo does not contain."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn

from models.datasets import ImageDataset, make_synthetic
from models.transforms import to_tensor


class BranchyNet(nn.Module):
    """stem → [1×1 conv | depthwise 3×3 → pointwise] → concat → conv (+ 1×1 shortcut) → fc."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.branch_a = nn.Sequential(nn.Conv2d(32, 16, 1), nn.ReLU())
        self.branch_b = nn.Sequential(
            nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False),  # depthwise
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.Conv2d(32, 24, 1),  # pointwise
            nn.ReLU(),
        )
        self.fuse = nn.Sequential(nn.Conv2d(40, 48, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(48))
        self.shortcut = nn.Sequential(nn.Conv2d(32, 48, 1, stride=2, bias=False), nn.BatchNorm2d(48))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(48, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) → (B, classes)
        s = self.stem(x)
        y = torch.cat([self.branch_a(s), self.branch_b(s)], dim=1)  # (B, 40, H, W)
        y = torch.relu(self.fuse(y) + self.shortcut(s))  # residual add
        return self.fc(torch.flatten(self.pool(y), 1))


def _randomize_bn(model: nn.Module) -> nn.Module:
    """Non-trivial BN affine parameters (so folding BN into convs is exercised), then
    running statistics calibrated on a batch, as a trained model has them (random-init
    deep ResNets otherwise produce logits in the thousands)."""
    gen = torch.Generator().manual_seed(1)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        m.weight.data.copy_(torch.rand(m.num_features, generator=gen) * 0.5 + 0.5)
        m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    if bns:
        model.train()
        with torch.no_grad():
            model(torch.randn(32, 1, 28, 28, generator=gen))
    return model.eval()


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture(scope="session")
def images() -> ImageDataset:
    """16 Fashion-MNIST-shaped synthetic test images (uint8 (N, 28, 28, 1))."""
    return make_synthetic(16, image_size=28, channels=1, split="test", seed=3)


@pytest.fixture(scope="session")
def batch(images: ImageDataset) -> torch.Tensor:
    return to_tensor(images.images, images.name)  # (16, 1, 28, 28)


@pytest.fixture
def branchy() -> type[BranchyNet]:
    return BranchyNet


@pytest.fixture
def randomize_bn() -> Callable[[nn.Module], nn.Module]:
    return _randomize_bn
