"""Model registry: `build_model(name, in_channels=, num_classes=)`.

All models are plain `nn.Module`s made of Conv2d/BatchNorm2d/Linear/ReLU/pooling so that
torch-pruning's dependency graph and the ONNX exporter handle them without special cases.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from models.cnn import FedAvgCNN, LeNet5
from models.resnet import resnet20, resnet32, resnet56
from models.vgg import vgg11_bn

__all__ = ["MODEL_NAMES", "build_model", "default_image_size"]

ModelFactory = Callable[..., nn.Module]

_REGISTRY: dict[str, ModelFactory] = {
    "fedavg_cnn": FedAvgCNN,
    "lenet5": LeNet5,
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet56": resnet56,
    "vgg11_bn": vgg11_bn,
}
MODEL_NAMES: tuple[str, ...] = tuple(sorted(_REGISTRY))


def default_image_size(in_channels: int) -> int:
    """Fashion-MNIST (1 channel) is 28×28, CIFAR (3 channels) is 32×32."""
    return 28 if in_channels == 1 else 32


def build_model(
    name: str, *, in_channels: int = 1, num_classes: int = 10, image_size: int | None = None
) -> nn.Module:
    """Build a zoo model by name; raises ValueError listing the valid names."""
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}"
        ) from None
    if in_channels < 1 or num_classes < 2:
        raise ValueError(f"need in_channels >= 1 and num_classes >= 2, got {in_channels}, {num_classes}")
    size = image_size or default_image_size(in_channels)
    return factory(in_channels=in_channels, num_classes=num_classes, image_size=size)
