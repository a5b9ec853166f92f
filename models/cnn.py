"""Small CNNs: the classic FedAvg CNN (McMahan et al. 2017) and LeNet-5."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["FedAvgCNN", "LeNet5"]


class FedAvgCNN(nn.Module):
    """conv(→32, 5×5, pad 2)-ReLU-pool → conv(32→64, 5×5)-ReLU-pool → fc(→512)-ReLU → fc.

    876,938 parameters at 1×28×28 with 10 classes (the model of the Flower comparison).
    """

    def __init__(self, *, in_channels: int = 1, num_classes: int = 10, image_size: int = 28) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        side = (image_size // 2 - 4) // 2  # 28 → 14 → 10 → 5
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * side * side, 512),
            nn.ReLU(inplace=True),
            nn.Linear(512, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) → (B, classes)
        return self.classifier(self.features(x))


class LeNet5(nn.Module):
    """LeNet-5 (ReLU, max-pool). The first conv is padded for 28×28 inputs so that both
    28×28 and 32×32 reach the classic 16×5×5 feature map."""

    def __init__(self, *, in_channels: int = 1, num_classes: int = 10, image_size: int = 28) -> None:
        super().__init__()
        pad = 2 if image_size == 28 else 0
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=pad),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        side = ((image_size + 2 * pad - 4) // 2 - 4) // 2
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * side * side, 120),
            nn.ReLU(inplace=True),
            nn.Linear(120, 84),
            nn.ReLU(inplace=True),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
