"""VGG-11 with BatchNorm, CIFAR-style (one linear classifier on a 512-d feature).

Four 2× max-pools instead of five, then global average pooling, so that 28×28 inputs
(Fashion-MNIST) work as well as 32×32 (CIFAR).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["VGG", "vgg11_bn"]

_VGG11 = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512)


class VGG(nn.Module):
    def __init__(self, cfg: tuple[int | str, ...], *, in_channels: int = 3, num_classes: int = 10, image_size: int = 32) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for item in cfg:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                assert isinstance(item, int)
                layers += [nn.Conv2d(channels, item, 3, padding=1, bias=False), nn.BatchNorm2d(item), nn.ReLU(inplace=True)]
                channels = item
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def vgg11_bn(**kw: int) -> VGG:
    return VGG(_VGG11, **kw)
