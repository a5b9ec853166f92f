"""A MobileNetV2-style network (Sandler et al. 2018) sized for 28×28 and 32×32 inputs.

Inverted residual blocks: a 1×1 expansion conv (×t), a 3×3 depthwise conv, then a linear
1×1 projection, each followed by BN (ReLU6 after the first two); a residual add where the
stride is 1 and the widths match. The ImageNet stem's stride 2 and the last two stages are
dropped (a 28×28 input would shrink to 1×1 after five halvings): the spatial path is
28 → 14 → 7 → 4 (32 → 16 → 8 → 4). Plain Conv2d/BatchNorm2d/ReLU6/Linear throughout, so
torch-pruning couples the expansion, depthwise and projection widths by itself and
`models.structure.reshape_to` rebuilds any pruned width from the weight shapes.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["InvertedResidual", "MobileNetV2Small", "mobilenetv2_small"]

# (expansion t, output channels c, repeats n, first stride s), as in the paper's Table 2
_SETTINGS: tuple[tuple[int, int, int, int], ...] = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 2, 2), (6, 64, 2, 2))


def _conv_bn(cin: int, cout: int, kernel: int, *, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, *, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(_conv_bn(cin, hidden, 1))  # expansion
        layers.append(_conv_bn(hidden, hidden, 3, stride=stride, groups=hidden))  # depthwise
        layers.append(_conv_bn(hidden, cout, 1, act=False))  # linear bottleneck: no ReLU6
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, cin, H, W) → (B, cout, H/s, W/s)
        out = self.block(x)
        return x + out if self.residual else out


class MobileNetV2Small(nn.Module):
    """stem 3×3 conv (stride 1) → 7 inverted residual blocks → 1×1 conv to 256 → pool → fc.

    134 k parameters; 7.1 M MACs at 1×28×28, 9.2 M at 3×32×32 (10 classes).
    """

    def __init__(self, *, in_channels: int = 1, num_classes: int = 10, image_size: int = 28,
                 width: int = 16, last: int = 256) -> None:
        super().__init__()
        del image_size  # global average pooling: any side ≥ 8 gives the same head
        blocks: list[nn.Module] = [_conv_bn(in_channels, width, 3)]
        cin = width
        for t, c, n, s in _SETTINGS:
            for i in range(n):
                blocks.append(InvertedResidual(cin, c, stride=s if i == 0 else 1, expand=t))
                cin = c
        blocks.append(_conv_bn(cin, last, 1))
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) → (B, classes)
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def mobilenetv2_small(**kw: int) -> MobileNetV2Small:
    return MobileNetV2Small(**kw)
