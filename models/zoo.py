"""Model registry: `build_model(name, in_channels=, num_classes=)`.

All models are plain `nn.Module`s made of Conv/BatchNorm/Linear/ReLU/pooling so that
torch-pruning's dependency graph and the ONNX exporter handle them without special cases.
Names not in the zoo are looked up among installed plugins (`models.plugins`: the
`fedslim.models` entry-point group).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

from torch import nn

from models.cnn import FedAvgCNN, LeNet5
from models.mobilenet import mobilenetv2_small
from models.plugins import BUILTIN_ORIGIN, PluginError, find_plugin, plugin_names, structure_fingerprint
from models.resnet import resnet20, resnet32, resnet56
from models.sensor import sensor_cnn, sensor_mlp
from models.state import seeded_rng
from models.vgg import vgg11_bn

__all__ = ["MODEL_NAMES", "ModelIdentity", "build_model", "default_image_size", "model_identity"]

ModelFactory = Callable[..., nn.Module]

_REGISTRY: dict[str, ModelFactory] = {
    "fedavg_cnn": FedAvgCNN,
    "lenet5": LeNet5,
    "mobilenetv2_small": mobilenetv2_small,
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet56": resnet56,
    "sensor_cnn": sensor_cnn,
    "sensor_mlp": sensor_mlp,
    "vgg11_bn": vgg11_bn,
}
MODEL_NAMES: tuple[str, ...] = tuple(sorted(_REGISTRY))  # the built-in zoo; plugins come on top
_RESERVED = frozenset(_REGISTRY)


def default_image_size(in_channels: int) -> int:
    """Fashion-MNIST (1 channel) is 28×28, CIFAR (3 channels) is 32×32."""
    return 28 if in_channels == 1 else 32


def _resolve(name: str) -> tuple[ModelFactory, str]:
    """(factory, origin) for a zoo or plugin name; ValueError listing the valid names."""
    if name in _REGISTRY:
        return _REGISTRY[name], BUILTIN_ORIGIN
    plugin = find_plugin(name, reserved=_RESERVED)
    if plugin is None:
        valid = ", ".join(MODEL_NAMES)
        plugins = plugin_names(reserved=_RESERVED)
        raise ValueError(f"unknown model {name!r}; valid names: {valid}"
                         + (f"; installed plugins: {', '.join(plugins)}" if plugins else ""))
    return plugin.load(), plugin.origin


def _checked_args(in_channels: int, num_classes: int, image_size: int | None) -> dict[str, int]:
    if in_channels < 1 or num_classes < 2:
        raise ValueError(f"need in_channels >= 1 and num_classes >= 2, got {in_channels}, {num_classes}")
    return {"in_channels": in_channels, "num_classes": num_classes,
            "image_size": image_size or default_image_size(in_channels)}


def build_model(
    name: str, *, in_channels: int = 1, num_classes: int = 10, image_size: int | None = None
) -> nn.Module:
    """Build a zoo (or installed plugin) model by name; raises ValueError listing the valid names."""
    factory, origin = _resolve(name)
    kw = _checked_args(in_channels, num_classes, image_size)
    model = factory(**kw)
    if not isinstance(model, nn.Module):
        raise PluginError(f"model {name!r} ({origin}) built a {type(model).__name__}, not a torch nn.Module")
    return model


@dataclass(frozen=True)
class ModelIdentity:
    """What a model name builds at one input/class configuration."""

    fingerprint: str  # sha256 hex of the structure and origin
    origin: str  # "fedslim" (the zoo) or "distribution version" (a plugin)


def model_identity(
    name: str, *, in_channels: int = 1, num_classes: int = 10, image_size: int | None = None
) -> ModelIdentity:
    """What both sides of a federation must agree on before training `name`: the
    structure fingerprint of its fresh build (`models.plugins.structure_fingerprint`) and
    where it comes from ("fedslim" for the zoo, "distribution version" for a plugin)."""
    _, origin = _resolve(name)
    kw = _checked_args(in_channels, num_classes, image_size)
    return _identity(name, origin, kw["in_channels"], kw["num_classes"], kw["image_size"])


@lru_cache(maxsize=128)
def _identity(name: str, origin: str, in_channels: int, num_classes: int, image_size: int) -> ModelIdentity:
    # keyed by origin: a plugin upgraded in place (new version) is built afresh. Built on
    # the CPU (the meta device takes seconds per model to decompose its init ops) with the
    # global RNG forked and locked, so a concurrent seeded build draws what it would alone.
    factory, _ = _resolve(name)
    with seeded_rng(0):
        model = factory(in_channels=in_channels, num_classes=num_classes, image_size=image_size)
    if not isinstance(model, nn.Module):
        raise PluginError(f"model {name!r} ({origin}) built a {type(model).__name__}, not a torch nn.Module")
    return ModelIdentity(structure_fingerprint(model, origin), origin)
