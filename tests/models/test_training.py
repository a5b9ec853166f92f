"""Central training/evaluation helpers: learning, hooks, and a real Fashion-MNIST check."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from models import build_model, evaluate, load_fashion_mnist, make_synthetic, train_epochs

REAL_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def _sgd(model: nn.Module, lr: float = 0.05) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)


class _ConstantLogits(nn.Module):
    """Zero logits: argmax picks class 0, cross-entropy is ln(classes)."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.classes = classes
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(len(x), self.classes) + 0 * self.dummy


def test_evaluate_against_a_constant_model() -> None:
    data = make_synthetic(300, num_classes=4, seed=1)

    stats = evaluate(_ConstantLogits(4), data, batch_size=64)

    assert stats.samples == 300
    assert stats.accuracy == pytest.approx(float(np.mean(data.labels == 0)))
    assert stats.loss == pytest.approx(math.log(4), rel=1e-5)


def test_training_lifts_accuracy_well_above_chance() -> None:
    # Arrange: learnable synthetic classes; an untrained model sits near chance (0.1).
    train = make_synthetic(400, seed=0)
    test = make_synthetic(300, seed=0, split="test")
    model = build_model("lenet5")
    before = evaluate(model, test).accuracy

    # Act
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)  # SGD needs ~3x the steps here
    stats = train_epochs(model, train, optimizer=optimizer, epochs=2, batch_size=32)
    after = evaluate(model, test).accuracy

    # Assert
    assert before < 0.3
    assert after > 0.9
    assert stats.samples == 2 * 400
    assert stats.steps == 2 * math.ceil(400 / 32)
    assert stats.accuracy > 0.5
    assert stats.seconds > 0


def test_max_steps_stops_early() -> None:
    model = build_model("lenet5")

    stats = train_epochs(model, make_synthetic(200), optimizer=_sgd(model), epochs=5, batch_size=32, max_steps=3)

    assert stats.steps == 3
    assert stats.samples == 3 * 32


def test_after_step_runs_after_every_step_and_can_reapply_a_mask() -> None:
    # Arrange: the hook zeroes half of the first conv's filters, as a pruning mask would.
    model = build_model("lenet5")
    conv = model.features[0]
    calls = []

    def reapply_mask() -> None:
        calls.append(1)
        with torch.no_grad():
            conv.weight[:3] = 0

    # Act
    stats = train_epochs(model, make_synthetic(160), optimizer=_sgd(model), batch_size=32, after_step=reapply_mask)

    # Assert: once per step, and the last word was the mask's (momentum would revive them).
    assert len(calls) == stats.steps == 5
    assert torch.count_nonzero(conv.weight[:3]) == 0
    assert torch.count_nonzero(conv.weight[3:]) > 0


def test_regularizer_is_called_with_the_model_and_enters_the_gradient() -> None:
    # Arrange: two identical models; one trains with a strong L2 term on its classifier.
    data = make_synthetic(160)
    plain, regularized = build_model("lenet5"), build_model("lenet5")
    regularized.load_state_dict(plain.state_dict())
    seen = []

    def l2(model: nn.Module) -> torch.Tensor:
        seen.append(model)
        return 1.0 * sum(p.pow(2).sum() for p in model.classifier.parameters())

    # Act
    train_epochs(plain, data, optimizer=_sgd(plain), batch_size=32)
    stats = train_epochs(regularized, data, optimizer=_sgd(regularized), batch_size=32, regularizer=l2)

    # Assert
    assert len(seen) == stats.steps and all(m is regularized for m in seen)
    assert _classifier_norm(regularized) < 0.25 * _classifier_norm(plain)


def _classifier_norm(model: nn.Module) -> float:
    return sum(float(p.detach().norm()) for p in model.classifier.parameters())


def test_augmented_training_runs_on_rgb() -> None:
    model = build_model("lenet5", in_channels=3)
    data = make_synthetic(64, image_size=32, channels=3)

    stats = train_epochs(model, data, optimizer=_sgd(model), batch_size=32, augment=True)

    assert stats.steps == 2
    assert math.isfinite(stats.loss)


def test_progress_bar_writes_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    model = build_model("lenet5")

    train_epochs(model, make_synthetic(64), optimizer=_sgd(model), batch_size=32, progress=True)

    assert "step" in capsys.readouterr().err


needs_real_data = pytest.mark.skipif(
    not (REAL_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"real Fashion-MNIST not installed at {REAL_FASHION_MNIST} (apt-get install dataset-fashion-mnist)",
)


@needs_real_data
def test_real_fashion_mnist_files_parse() -> None:
    train = load_fashion_mnist(REAL_FASHION_MNIST, "train")
    test = load_fashion_mnist(REAL_FASHION_MNIST, "test")

    assert train.images.shape == (60_000, 28, 28, 1)
    assert test.images.shape == (10_000, 28, 28, 1)
    # Both splits are exactly balanced over the 10 classes.
    assert np.bincount(train.labels).tolist() == [6_000] * 10
    assert np.bincount(test.labels).tolist() == [1_000] * 10


# ~160 SGD steps of fedavg_cnn: 15-30 s on two idle cores, minutes when they are shared.
@pytest.mark.slow
@needs_real_data
def test_fedavg_cnn_one_epoch_on_a_fashion_mnist_subset() -> None:
    # Arrange: a seeded 10k/2k subset; the full-data 1-epoch figure (≥ 0.85) is in bench.central.
    rng = np.random.default_rng(0)
    train = load_fashion_mnist(REAL_FASHION_MNIST, "train")
    test = load_fashion_mnist(REAL_FASHION_MNIST, "test")
    train = train.subset(rng.choice(len(train), 10_000, replace=False))
    test = test.subset(rng.choice(len(test), 2_000, replace=False))
    model = build_model("fedavg_cnn")

    # Act
    train_epochs(model, train, optimizer=_sgd(model), epochs=1, batch_size=64, seed=0)
    accuracy = evaluate(model, test).accuracy

    # Assert: chance is 0.10.
    assert accuracy >= 0.75
