"""Fixtures for the models tests: fixed seeds, two torch threads, a clean environment,
and small Fashion-MNIST / CIFAR-10 directories generated on disk."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from models.datasets import write_cifar_batch, write_idx

REAL_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def _seeded_two_threads(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # CI shares two cores; more threads only adds contention.
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    monkeypatch.delenv("FEDSLIM_FASHION_MNIST_DIR", raising=False)
    yield
    torch.set_num_threads(threads)


def write_fashion_dir(root: Path, *, n_train: int = 12, n_test: int = 5, gz: bool = True, seed: int = 0) -> dict[str, np.ndarray]:
    """Write the four Fashion-MNIST IDX files under `root`; return what was written."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    root.mkdir(parents=True, exist_ok=True)
    for stem, array in arrays.items():
        write_idx(root / (stem + (".gz" if gz else "")), array)
    return arrays


@pytest.fixture
def make_fashion_dir() -> Callable[..., dict[str, np.ndarray]]:
    """`make_fashion_dir(root, n_train=, n_test=, gz=)` writes a tiny Fashion-MNIST."""
    return write_fashion_dir


@pytest.fixture
def cifar_dir(tmp_path: Path) -> tuple[Path, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Five train batches of 3 images and a test batch of 2, all distinct random pixels."""
    rng = np.random.default_rng(1)
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    batches = {}
    for name, n in [*((f"data_batch_{i}", 3) for i in range(1, 6)), ("test_batch", 2)]:
        images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)  # (N, H, W, C)
        labels = rng.integers(0, 10, n)
        write_cifar_batch(root / name, images, labels)
        batches[name] = (images, labels)
    return root, batches
