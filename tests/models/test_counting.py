"""Parameter and MAC counts against figures computed by hand."""

from __future__ import annotations

import pytest
from torch import nn

from models import build_model, count_macs, count_params

# fedavg_cnn at 1×28×28, 10 classes.
#   conv1 1→32 5×5 pad 2: 28×28 out;  conv2 32→64 5×5: 14→10 out;  fc 64·5·5=1600 → 512 → 10
FEDAVG_PARAMS = (32 * 1 * 25 + 32) + (64 * 32 * 25 + 64) + (1600 * 512 + 512) + (512 * 10 + 10)
FEDAVG_MACS = 28 * 28 * 32 * 25 + 10 * 10 * 64 * 32 * 25 + 1600 * 512 + 512 * 10

# LeNet-5 at 1×28×28 (conv1 padded by 2 → 28×28 out) and at 3×32×32 (unpadded → 28×28 out);
# both reach 16×5×5 = 400 features, then 120 → 84 → 10.
_LENET_TAIL_PARAMS = (16 * 6 * 25 + 16) + (400 * 120 + 120) + (120 * 84 + 84) + (84 * 10 + 10)
_LENET_TAIL_MACS = 10 * 10 * 16 * 6 * 25 + 400 * 120 + 120 * 84 + 84 * 10
LENET_1CH_PARAMS = (6 * 1 * 25 + 6) + _LENET_TAIL_PARAMS
LENET_1CH_MACS = 28 * 28 * 6 * 1 * 25 + _LENET_TAIL_MACS
LENET_3CH_PARAMS = (6 * 3 * 25 + 6) + _LENET_TAIL_PARAMS
LENET_3CH_MACS = 28 * 28 * 6 * 3 * 25 + _LENET_TAIL_MACS


def test_fedavg_cnn_hand_figures_match_the_issue() -> None:
    # Guards the hand arithmetic itself: the issue states 876,938 parameters.
    assert FEDAVG_PARAMS == 876_938


@pytest.mark.parametrize(
    ("name", "channels", "side", "params", "macs"),
    [
        ("fedavg_cnn", 1, 28, FEDAVG_PARAMS, FEDAVG_MACS),  # the peer-comparison model
        ("lenet5", 1, 28, LENET_1CH_PARAMS, LENET_1CH_MACS),  # padded first conv
        ("lenet5", 3, 32, LENET_3CH_PARAMS, LENET_3CH_MACS),  # classic unpadded LeNet
    ],
)
def test_small_cnns_match_hand_counts(name: str, channels: int, side: int, params: int, macs: int) -> None:
    model = build_model(name, in_channels=channels, num_classes=10)

    assert count_params(model) == params
    assert count_macs(model, (channels, side, side)) == macs


def test_resnet32_is_about_047m_params_and_69m_macs() -> None:
    model = build_model("resnet32", in_channels=3, num_classes=10)

    params = count_params(model)
    macs = count_macs(model, (3, 32, 32))

    assert params == pytest.approx(0.47e6, rel=0.02)
    assert macs == pytest.approx(69e6, rel=0.02)


@pytest.mark.parametrize(
    ("layer", "input_shape", "macs"),
    [
        (nn.Linear(7, 3), (7,), 7 * 3),  # bias adds are not MACs
        (nn.Linear(7, 3, bias=False), (7,), 7 * 3),  # same without bias
        (nn.Conv2d(3, 4, 3, padding=1), (3, 8, 8), 8 * 8 * 4 * 3 * 9),  # "same" conv
        (nn.Conv2d(2, 5, 3, stride=2), (2, 9, 9), 4 * 4 * 5 * 2 * 9),  # strided, 9 → 4
        (nn.Conv2d(4, 4, 3, padding=1, groups=4), (4, 6, 6), 6 * 6 * 4 * 1 * 9),  # depthwise
    ],
)
def test_single_layer_macs(layer: nn.Module, input_shape: tuple[int, ...], macs: int) -> None:
    assert count_macs(layer, input_shape) == macs


@pytest.mark.parametrize(
    ("module", "params"),
    [
        (nn.Linear(7, 3), 7 * 3 + 3),  # weight + bias
        (nn.BatchNorm2d(8), 8 + 8),  # affine only; running stats are buffers
        (nn.Sequential(nn.ReLU(), nn.MaxPool2d(2)), 0),  # parameter-free
    ],
)
def test_count_params(module: nn.Module, params: int) -> None:
    assert count_params(module) == params


def test_count_macs_ignores_bn_pooling_and_keeps_training_mode() -> None:
    # Arrange: BN, ReLU and pooling add no MACs; the model starts in training mode.
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.MaxPool2d(2)).train()

    macs = count_macs(model, (1, 6, 6))

    assert macs == 4 * 4 * 2 * 1 * 9
    assert model.training
    assert int(model[1].num_batches_tracked) == 0  # counting ran in eval mode: BN stats untouched
