"""Optional int8 static quantisation (QDQ) of an exported fp32 model, calibrated on real data.

Whether int8 is faster depends on the CPU (VNNI) and the model; `build_report` measures it
beside the fp32 file and only reports a gain where one was measured.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from pruning.export.onnx_export import INPUT_NAME, ExportError

__all__ = ["quantize_int8"]


class _BatchReader(CalibrationDataReader):
    """Feeds (N, C, H, W) float32 calibration samples in batches."""

    def __init__(self, x: np.ndarray, batch: int = 32) -> None:
        self._batches = iter([x[i : i + batch] for i in range(0, len(x), batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        part = next(self._batches, None)
        return None if part is None else {INPUT_NAME: np.ascontiguousarray(part, dtype=np.float32)}


def quantize_int8(fp32_path: str | Path, out_path: str | Path, calibration: np.ndarray) -> Path:
    """Write a QDQ int8 model (per-channel int8 weights, uint8 activations, MinMax calibration
    on `calibration` (N, C, H, W) float32) to `out_path`; no file is left on failure."""
    out_path = Path(out_path)
    if calibration.ndim != 4 or len(calibration) == 0:
        raise ExportError(f"int8 calibration needs a non-empty (N, C, H, W) batch, got {calibration.shape}")
    tmp_out = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    try:
        with tempfile.TemporaryDirectory(prefix="fedslim-int8-") as tmp:
            prepped = Path(tmp) / "prepped.onnx"
            quant_pre_process(str(fp32_path), str(prepped), skip_symbolic_shape=True)
            quantize_static(
                str(prepped), str(tmp_out), _BatchReader(calibration),
                quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            )
        os.replace(tmp_out, out_path)
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"int8 quantisation of {fp32_path} failed: {type(exc).__name__}: {exc}") from exc
    finally:
        tmp_out.unlink(missing_ok=True)
    return out_path
