"""A third-party model for fedslim: registered by entry point, never sent over the wire.

The factory is called as `TinyCNN(in_channels=, num_classes=, image_size=)`. To prune
structurally and export to ONNX it sticks to Conv2d/BatchNorm2d/Linear/ReLU/pooling, and
to rebuild pruned widths from weight shapes every width comes from the constructor.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["TinyCNN"]
__version__ = "0.1.0"


class TinyCNN(nn.Module):
    """conv(→16)-BN-ReLU-pool → conv(→32)-BN-ReLU → global pool → fc."""

    def __init__(self, *, in_channels: int = 1, num_classes: int = 10, image_size: int = 28, width: int = 16) -> None:
        super().__init__()
        del image_size  # global average pooling: any input side works
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) → (B, classes)
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))
