"""Server-side evaluation of global weights on the federation's test split (torch).

A federation with `data.dataset: none` has no split here: `has_test_set` says so, the
round's accuracy comes from the agents (`round_metrics.federated_evaluation`), and shapes
come from the federation's input spec."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from coordinator.protocol import FederationCreate
from models import ImageDataset, build_model, count_macs, evaluate, load_dataset
from models.state import build_from_state, seeded_weights
from models.training import iterate_batches
from models.zoo import default_image_size

__all__ = ["Evaluator"]


class Evaluator:
    def __init__(self, *, torch_threads: int = 1) -> None:
        import torch

        torch.set_num_threads(max(1, torch_threads))
        self._data: dict[tuple[Any, ...], ImageDataset] = {}
        self._lock = threading.Lock()

    def model_for(self, cfg: FederationCreate) -> Any:
        return build_model(cfg.model, in_channels=cfg.in_channels, num_classes=cfg.num_classes, image_size=cfg.image_size)

    def initial_weights(self, cfg: FederationCreate) -> dict[str, np.ndarray]:
        return seeded_weights(cfg.model, cfg.seed, in_channels=cfg.in_channels, num_classes=cfg.num_classes,
                              image_size=cfg.image_size)

    def model(self, cfg: FederationCreate, weights: dict[str, np.ndarray]) -> Any:
        return build_from_state(cfg.model, weights, in_channels=cfg.in_channels,
                                num_classes=cfg.num_classes, image_size=cfg.image_size)

    @staticmethod
    def has_test_set(cfg: FederationCreate) -> bool:
        return cfg.data.dataset != "none"

    @staticmethod
    def input_shape(cfg: FederationCreate) -> tuple[int, int, int]:
        """(C, H, W) of one sample: the input spec's, else the model's default size."""
        if cfg.data.input is not None:
            c, h, w = cfg.data.input.shape
            return (c, h, w)
        size = cfg.image_size or default_image_size(cfg.in_channels)
        return (cfg.in_channels, size, size)

    def test_data(self, cfg: FederationCreate) -> ImageDataset:
        if not self.has_test_set(cfg):
            raise ValueError("this federation has no server-side dataset (data.dataset is 'none')")
        key = (cfg.data.dataset, cfg.data.data_dir, cfg.data.eval_samples, cfg.seed)
        with self._lock:
            if key not in self._data:
                data = load_dataset(cfg.data.dataset, cfg.data.data_dir, "test", seed=cfg.seed)
                if cfg.data.eval_samples:
                    data = data.subset(np.arange(min(cfg.data.eval_samples, len(data))))
                self._data[key] = data
            return self._data[key]

    def calibration_batches(self, cfg: FederationCreate, samples: int) -> list[Any]:
        """The first `samples` training images (a fixed subset), as batches of 128: what BN
        statistics are re-estimated on (`pruning.levels.recalibrate_bn`)."""
        key = ("calibration", cfg.data.dataset, cfg.data.data_dir, samples, cfg.seed)
        with self._lock:
            if key not in self._data:
                data = load_dataset(cfg.data.dataset, cfg.data.data_dir, "train", seed=cfg.seed)
                self._data[key] = data.subset(np.arange(min(samples, len(data))))
            data = self._data[key]
        return [x for x, _ in iterate_batches(data, 128, shuffle=False)]

    def evaluate(self, cfg: FederationCreate, weights: dict[str, np.ndarray], *, calibrate: int = 0) -> Any:
        """Test accuracy and loss; with `calibrate` > 0 and BN layers, their statistics
        are first re-estimated on that many training samples (a width level's slice)."""
        model = self.model(cfg, weights)
        if calibrate > 0 and any("running_mean" in k for k in weights):
            from pruning.levels import recalibrate_bn

            recalibrate_bn(model, self.calibration_batches(cfg, calibrate))
        return evaluate(model, self.test_data(cfg))

    def macs(self, cfg: FederationCreate, weights: dict[str, np.ndarray]) -> int:
        shape = self.test_data(cfg).input_shape if self.has_test_set(cfg) else self.input_shape(cfg)
        return int(count_macs(self.model(cfg, weights), shape))
