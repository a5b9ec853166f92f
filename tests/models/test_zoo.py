"""Model registry: every name builds for 1 or 3 channels and N classes."""

from __future__ import annotations

import pytest
import torch

from models import MODEL_NAMES, build_model

# (in_channels, image side): Fashion-MNIST is 1×28×28, CIFAR is 3×32×32.
INPUTS = [
    pytest.param(1, 28, id="1ch-28"),  # grayscale, the Fashion-MNIST path
    pytest.param(3, 32, id="3ch-32"),  # RGB, the CIFAR path
]


def test_registry_holds_the_issue_models() -> None:
    assert set(MODEL_NAMES) == {"fedavg_cnn", "lenet5", "resnet20", "resnet32", "resnet56", "vgg11_bn",
                                "mobilenetv2_small", "sensor_cnn", "sensor_mlp"}  # issue 12: edge-class models


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize(("channels", "side"), INPUTS)
def test_every_model_gives_batch_by_classes_logits(name: str, channels: int, side: int) -> None:
    # Arrange: an unusual class count, so a hard-coded 10 shows up.
    model = build_model(name, in_channels=channels, num_classes=7).eval()
    x = torch.randn(2, channels, side, side)  # (B, C, H, W)

    # Act
    with torch.no_grad():
        logits = model(x)

    # Assert
    assert logits.shape == (2, 7)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize(
    "name",
    [
        "resnet18",  # a real ResNet, but not one of ours
        "FedAvg_CNN",  # names are case-sensitive
        "",  # empty
    ],
)
def test_unknown_name_lists_the_valid_ones(name: str) -> None:
    with pytest.raises(ValueError, match="unknown model") as info:
        build_model(name)

    for valid in MODEL_NAMES:
        assert valid in str(info.value)


@pytest.mark.parametrize(
    ("in_channels", "num_classes"),
    [
        (0, 10),  # no input channels
        (1, 1),  # a single class is not a classifier
    ],
)
def test_bad_shapes_are_refused(in_channels: int, num_classes: int) -> None:
    with pytest.raises(ValueError, match="in_channels"):
        build_model("lenet5", in_channels=in_channels, num_classes=num_classes)
