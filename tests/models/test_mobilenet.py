"""Edge-class zoo models (MobileNetV2-style, 1-D conv and MLP for sensor windows): their
shape, structural pruning (rebuilt from weight shapes), ONNX parity with PyTorch, and a
federation each. The pruned-vs-zeroed oracle for them is in tests/pruning/test_levels.py."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from edge_agent.agent import AgentState, EdgeAgent
from edge_agent.client import CoordinatorClient
from models import build_model, count_macs, count_params
from models.datasets import make_synthetic_windows
from models.mobilenet import InvertedResidual
from models.state import build_from_state, to_numpy_state
from models.training import evaluate, train_epochs
from models.transforms import to_tensor
from pruning.export import export_onnx, make_session
from pruning.structured import prune_channels
from tests.helpers import ENROLL

# (model, in_channels, side): Fashion-MNIST-, CIFAR- and sensor-window-shaped inputs
CASES = [("mobilenetv2_small", 1, 28), ("mobilenetv2_small", 3, 32), ("sensor_cnn", 3, 28), ("sensor_mlp", 3, 28)]


def _randomized(model: nn.Module) -> nn.Module:
    """BN statistics away from 0/1, so that a BN sliced or exported wrongly shows."""
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.3)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return model.eval()


def test_mobilenet_is_inverted_residuals_with_depthwise_convs():
    model = build_model("mobilenetv2_small")
    blocks = [m for m in model.modules() if isinstance(m, InvertedResidual)]
    depthwise = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1]
    assert len(blocks) == 7 and len(depthwise) == 7
    assert sum(b.residual for b in blocks) == 4  # stride 1 with equal widths: the first block, and each stage's second
    assert any(isinstance(m, nn.ReLU6) for m in model.modules())
    assert 100_000 < count_params(model) < 200_000  # small enough for a Pi Zero 2's training budget


@pytest.mark.parametrize("name,channels,side", CASES)
def test_prunes_structurally_and_rebuilds_from_weight_shapes(name, channels, side):
    dense = _randomized(build_model(name, in_channels=channels, image_size=side))
    x = torch.randn(4, channels, side, side, generator=torch.Generator().manual_seed(2))
    pruned = prune_channels(copy.deepcopy(dense), x, ratio=0.5, round_to=8)

    shape = (channels, side, side)
    assert count_macs(pruned, shape) < 0.6 * count_macs(dense, shape)
    for m in pruned.modules():  # depthwise convs stay depthwise at their new width
        if isinstance(m, nn.Conv2d) and m.groups > 1:
            assert m.groups == m.in_channels == m.out_channels
    rebuilt = build_from_state(name, to_numpy_state(pruned), in_channels=channels, num_classes=10,
                               image_size=side).eval()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), pruned(x))


@pytest.mark.parametrize("pruned", [False, True], ids=["dense", "pruned"])
@pytest.mark.parametrize("name,channels,side", CASES)
def test_onnx_export_matches_torch(name, channels, side, pruned, tmp_path):
    model = _randomized(build_model(name, in_channels=channels, image_size=side))
    x = torch.randn(8, channels, side, side, generator=torch.Generator().manual_seed(3))
    if pruned:
        prune_channels(model, x, ratio=0.5, round_to=8)
    result = export_onnx(model, tmp_path / "m.onnx", x[:1], parity_input=x)
    assert result.parity_max_abs_diff <= 1e-4
    (got,) = make_session(tmp_path / "m.onnx").run(None, {"input": x[:3].numpy()})  # a batch never traced
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x[:3]).numpy(), atol=1e-4, rtol=0)


def test_sensor_cnn_reads_raw_windows_and_learns_shifted_sines():
    train = make_synthetic_windows(320, side=12, channels=3, seed=1)  # 144 samples per window
    test = make_synthetic_windows(200, side=12, channels=3, seed=1, split="test")
    model = build_model("sensor_cnn", in_channels=3, num_classes=train.num_classes)
    x = to_tensor(test.images[:2], test.name)  # (2, 3, 12, 12)
    with torch.no_grad():  # the laid-out window and the raw (B, C, L) window are one input
        torch.testing.assert_close(model.eval()(x), model(x.flatten(2)))

    train_epochs(model, train, optimizer=torch.optim.Adam(model.parameters(), lr=3e-3), epochs=1, batch_size=32)
    assert evaluate(model, test).accuracy > 0.8  # chance is 1/6


@pytest.mark.parametrize("name,windows", [("mobilenetv2_small", False), ("sensor_cnn", True), ("sensor_mlp", True)])
def test_federation_trains_the_model(name, windows, coordinator, start_federation, run_federation, tmp_path,
                                     one_thread):
    # sensor models train on windows (the coordinator's own test set stays the synthetic
    # images of the same (1, 28, 28) shape: only shapes matter to it here)
    data = make_synthetic_windows(400, channels=1, num_classes=10) if windows else None
    agents = []
    for i in range(2):
        client = CoordinatorClient(coordinator, max_tries=2, backoff_s=0.01)
        client.enroll(ENROLL, name=f"agent-{i}")
        if data is None:
            from models import make_synthetic

            part = make_synthetic(400, seed=0).subset(np.arange(i * 200, (i + 1) * 200))
        else:
            part = data.subset(np.arange(i * 200, (i + 1) * 200))
        agents.append(EdgeAgent(client, part, AgentState(tmp_path / f"agent-{i}")))
    fid = start_federation(model=name)

    rows = run_federation(fid, agents, max_tasks=2)
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["participants"] == 2 for r in rows)
    assert all(np.isfinite(r["train_loss"]) for r in rows)
