"""The final model of a federation as a verified ONNX file plus its export report,
built on first request and cached beside the blobs (per model version, and per width
level for federations with levels: one smaller model per class of device)."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np

from coordinator.evaluation import Evaluator
from coordinator.protocol import FederationCreate

__all__ = ["ExportCache"]


class ExportCache:
    def __init__(self, root: Path, evaluator: Evaluator, *, threads: int = 1) -> None:
        self.root, self.evaluator, self.threads = root, evaluator, threads
        self._lock = threading.Lock()

    def paths(self, fid: str, version: int, level: int | None = None) -> tuple[Path, Path]:
        folder = self.root / fid / f"v{version}"
        if level is not None:
            folder = folder / f"level{level}"
        return folder / "model.onnx", folder / "report.json"

    def get(self, fid: str, version: int, cfg: FederationCreate, weights: dict[str, np.ndarray],
            level: int | None = None) -> tuple[Path, dict[str, Any]]:
        """The export of `weights`, or of its width level `level` (first windows for
        `rolling`; BN statistics re-estimated for the slice). ValueError for a level the
        federation does not have."""
        onnx_path, report_path = self.paths(fid, version, level)
        with self._lock:  # one export at a time: it measures latency
            if not report_path.exists():
                self._build(cfg, weights, onnx_path, report_path, level)
        return onnx_path, json.loads(report_path.read_text())

    def _build(self, cfg: FederationCreate, weights: dict[str, np.ndarray], onnx_path: Path, report_path: Path,
               level: int | None) -> None:
        from pruning.export import build_report  # heavy (onnx, onnxruntime): on demand

        extra: dict[str, Any] = {}
        if level is not None:
            weights, extra = self._level(cfg, weights, level)
        model = self.evaluator.model(cfg, weights)
        if level is not None and cfg.levels is not None and cfg.levels.bn_calibration_samples:
            from pruning.levels import recalibrate_bn

            recalibrate_bn(model, self.evaluator.calibration_batches(cfg, cfg.levels.bn_calibration_samples))
        onnx_path.parent.mkdir(parents=True, exist_ok=True)
        # without a server test set: parity on seeded Gaussian inputs, accuracy n/a
        data = self.evaluator.test_data(cfg) if self.evaluator.has_test_set(cfg) else None
        report = build_report(
            self.evaluator.model_for(cfg), model, data, out_path=onnx_path, input_shape=self.evaluator.input_shape(cfg)
            if data is None else None, model_name=cfg.model, dense_weights_known=False, threads=self.threads,
            repeats=10, eval_limit=min(len(data), 2000) if data is not None else None,
        )
        tmp = report_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({**json.loads(report.to_json()), **extra}, indent=2))
        tmp.replace(report_path)  # the report's presence marks a finished export

    @staticmethod
    def _level(cfg: FederationCreate, weights: dict[str, np.ndarray], level: int) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        from pruning.levels import level_slices
        from sparse_kernels.reshape import apply_reshape

        spec = cfg.levels
        levels = level_slices(cfg.model, weights, spec.width_list() if spec else [1.0], rule=spec.rule if spec else "first",
                              rnd=0, in_channels=cfg.in_channels, num_classes=cfg.num_classes, image_size=cfg.image_size)
        if not 0 <= level < len(levels):
            raise ValueError(f"this federation has {len(levels)} width level(s); there is no level {level}")
        lv = levels[level]
        return apply_reshape(weights, lv.reshape), {"level": level, "width": lv.width, "level_macs": lv.macs}
