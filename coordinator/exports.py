"""The final model of a federation as a verified ONNX file plus its export report,
built on first request and cached beside the blobs (per model version)."""

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

    def paths(self, fid: str, version: int) -> tuple[Path, Path]:
        folder = self.root / fid / f"v{version}"
        return folder / "model.onnx", folder / "report.json"

    def get(self, fid: str, version: int, cfg: FederationCreate, weights: dict[str, np.ndarray]) -> tuple[Path, dict[str, Any]]:
        onnx_path, report_path = self.paths(fid, version)
        with self._lock:  # one export at a time: it measures latency
            if not report_path.exists():
                self._build(cfg, weights, onnx_path, report_path)
        return onnx_path, json.loads(report_path.read_text())

    def _build(self, cfg: FederationCreate, weights: dict[str, np.ndarray], onnx_path: Path, report_path: Path) -> None:
        from pruning.export import build_report  # heavy (onnx, onnxruntime): on demand

        onnx_path.parent.mkdir(parents=True, exist_ok=True)
        data = self.evaluator.test_data(cfg)
        report = build_report(
            self.evaluator.model_for(cfg), self.evaluator.model(cfg, weights), data, out_path=onnx_path,
            model_name=cfg.model, dense_weights_known=False, threads=self.threads, repeats=10,
            eval_limit=min(len(data), 2000),
        )
        tmp = report_path.with_suffix(".tmp")
        tmp.write_text(report.to_json())
        tmp.replace(report_path)  # the report's presence marks a finished export
