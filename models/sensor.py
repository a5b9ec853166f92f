"""Models for sensor windows: C channels (accelerometer axes, …) × L time steps.

The federation's input is (C, H, W) like an image's; a sensor window arrives laid out in
it row-major, so both models read any (B, C, *) input as (B, C, L) with L the product of
the trailing dims (a CSV window of 784 samples can ride the 1×28×28 path, and a true
(B, C, L) tensor works as is).

- `SensorConv1d`: three Conv1d-BN-ReLU blocks (kernel 5, strides 1/2/2), global average
  pooling over time, a linear classifier: translation-invariant in time, independent of L.
- `SensorMLP`: per-window features (the flattened window) → two hidden layers.
Both are plain Conv1d/BatchNorm1d/Linear, so torch-pruning and `reshape_to` handle them.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["SensorConv1d", "SensorMLP", "sensor_cnn", "sensor_mlp"]


def _as_windows(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2) if x.dim() > 3 else x  # (B, C, *) → (B, C, L)


class SensorConv1d(nn.Module):
    def __init__(self, *, in_channels: int = 1, num_classes: int = 10, image_size: int = 28,
                 widths: tuple[int, int, int] = (32, 64, 64)) -> None:
        super().__init__()
        del image_size  # pooled over time: any window length works
        layers: list[nn.Module] = []
        cin = in_channels
        for cout, stride in zip(widths, (1, 2, 2), strict=True):
            layers += [nn.Conv1d(cin, cout, 5, stride=stride, padding=2, bias=False), nn.BatchNorm1d(cout), nn.ReLU()]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, L) or (B, C, H, W) → (B, classes)
        return self.classifier(torch.flatten(self.pool(self.features(_as_windows(x))), 1))


class SensorMLP(nn.Module):
    def __init__(self, *, in_channels: int = 1, num_classes: int = 10, image_size: int = 28,
                 length: int | None = None, hidden: tuple[int, int] = (128, 64)) -> None:
        super().__init__()
        features = in_channels * (length or image_size * image_size)  # the window, flattened
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(features, hidden[0]), nn.ReLU(),
            nn.Linear(hidden[0], hidden[1]), nn.ReLU(),
            nn.Linear(hidden[1], num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, L) or (B, C, H, W) → (B, classes)
        return self.classifier(_as_windows(x))


def sensor_cnn(*, in_channels: int = 1, num_classes: int = 10, image_size: int = 28) -> SensorConv1d:
    return SensorConv1d(in_channels=in_channels, num_classes=num_classes, image_size=image_size)


def sensor_mlp(*, in_channels: int = 1, num_classes: int = 10, image_size: int = 28) -> SensorMLP:
    return SensorMLP(in_channels=in_channels, num_classes=num_classes, image_size=image_size)
