"""Export a (channel-pruned) PyTorch model to ONNX, checked, and verified against ORT.

Exporter choice: torch 2.13 still ships the TorchScript-based ("legacy", `dynamo=False`)
exporter. For our conv/BN/linear models it emits opset 17 directly, folds BatchNorm into
the convs, and takes ~0.3 s per model; the `torch.export` path (`dynamo=True`) takes ~7 s,
bumps the opset to 18 and needs onnxscript. So "legacy" is the default and "dynamo" an
option for models the tracer cannot handle. Either way the file must pass
`onnx.checker.check_model(full_check=True)` and match PyTorch under ONNX Runtime on a real
batch (max |diff| ≤ atol, at the full batch and at batch 1 to prove the dynamic batch
axis), or `ExportError` is raised and nothing is left at `path`.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

__all__ = [
    "EXPORTERS",
    "ExportError",
    "ExportResult",
    "export_onnx",
    "make_session",
    "max_abs_diff",
]

EXPORTERS = ("legacy", "dynamo")
INPUT_NAME = "input"
OUTPUT_NAME = "logits"


class ExportError(RuntimeError):
    """The model cannot be exported faithfully; the message says why. No file is left."""


@dataclass(frozen=True)
class ExportResult:
    path: str
    opset: int
    exporter: str
    file_bytes: int
    parity_max_abs_diff: float  # max |ORT − torch| over the parity batch (and batch 1)
    parity_samples: int
    input_shape: tuple[int, ...]  # (C, H, W); the batch axis is dynamic
    input_name: str = INPUT_NAME
    output_name: str = OUTPUT_NAME

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_session(path: str | Path, *, threads: int | None = None) -> ort.InferenceSession:
    """CPU session with all graph optimisations (what a device runs) and fixed threads."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.inter_op_num_threads = 1
    if threads is not None:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        return float("inf")
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
    return float(diff.max()) if diff.size else 0.0


def export_onnx(
    model: nn.Module,
    path: str | Path,
    example_input: torch.Tensor,
    *,
    parity_input: torch.Tensor | None = None,
    atol: float = 1e-4,
    opset: int = 17,
    exporter: str = "legacy",
    threads: int | None = None,
) -> ExportResult:
    """Export `model` (eval mode) to `path` with a dynamic batch axis and verify it.

    `example_input` (B, C, H, W) drives tracing; `parity_input` (default: the example) is
    the batch of real inputs on which ORT must match PyTorch within `atol`.
    """
    if exporter not in EXPORTERS:
        raise ValueError(f"unknown exporter {exporter!r}; valid: {', '.join(EXPORTERS)}")
    if opset < 17:
        raise ValueError(f"opset must be >= 17, got {opset}")
    if example_input.dim() != 4:
        raise ValueError(f"example_input must be (B, C, H, W), got {tuple(example_input.shape)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    label = type(model).__name__
    was_training = model.training
    model.eval()
    try:
        _export(model, tmp, example_input, opset=opset, exporter=exporter, label=label)
        try:
            onnx.checker.check_model(str(tmp), full_check=True)
        except Exception as exc:  # onnx raises ValidationError / InferenceError subclasses
            raise ExportError(f"{label}: exported graph fails onnx.checker: {exc}") from exc
        graph = onnx.load(str(tmp), load_external_data=False)
        got_opset = max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx"))
        parity = parity_input if parity_input is not None else example_input
        diff = _parity(model, tmp, parity, threads=threads, label=label)
        if not diff <= atol:  # also catches NaN
            raise ExportError(
                f"{label}: ONNX Runtime output differs from PyTorch by max |diff| = {diff:.3g} "
                f"> {atol:g} on {len(parity)} inputs; refusing to write {path}"
            )
        os.replace(tmp, path)
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"{label}: export failed: {type(exc).__name__}: {exc}") from exc
    finally:
        model.train(was_training)
        tmp.unlink(missing_ok=True)
    return ExportResult(
        path=str(path),
        opset=got_opset,
        exporter=exporter,
        file_bytes=path.stat().st_size,
        parity_max_abs_diff=diff,
        parity_samples=len(parity),
        input_shape=tuple(int(d) for d in example_input.shape[1:]),
    )


# ---------------------------------------------------------------- helpers


@contextlib.contextmanager
def _quiet_exporter(exporter: str) -> Iterator[None]:
    """Silence the exporter's own notices (not the model's), narrowly by message."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"You are using the legacy TorchScript-based ONNX export", category=DeprecationWarning
        )
        warnings.filterwarnings("ignore", message=r"The feature will be removed", category=DeprecationWarning)
        if exporter == "dynamo":
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
        yield


def _export(model: nn.Module, tmp: Path, example: torch.Tensor, *, opset: int, exporter: str, label: str) -> None:
    kwargs: dict[str, Any]
    if exporter == "legacy":
        kwargs = {"dynamo": False, "dynamic_axes": {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}}
    else:
        batch = torch.export.Dim("batch", min=1, max=65536)
        kwargs = {"dynamo": True, "dynamic_shapes": ({0: batch},), "verbose": False, "external_data": False}
    try:
        with _quiet_exporter(exporter), torch.no_grad():
            torch.onnx.export(
                model, (example,), str(tmp), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                opset_version=opset, do_constant_folding=True, **kwargs,
            )
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = " (try exporter='dynamo')" if exporter == "legacy" else ""
        raise ExportError(f"{label}: cannot export to ONNX opset {opset}: {first}{hint}") from exc
    if not tmp.exists():
        raise ExportError(f"{label}: exporter wrote no file")


@torch.no_grad()
def _parity(model: nn.Module, onnx_path: Path, batch: torch.Tensor, *, threads: int | None, label: str) -> float:
    session = make_session(onnx_path, threads=threads)
    x = batch.detach().float().contiguous()
    diffs = []
    for part in (x, x[:1]):  # the whole batch, then batch 1: proves the dynamic axis
        expected = model(part).float().cpu().numpy()
        (got,) = session.run([OUTPUT_NAME], {INPUT_NAME: part.numpy()})
        if got.shape != expected.shape:
            raise ExportError(f"{label}: ORT output shape {got.shape} != PyTorch {expected.shape}")
        diffs.append(max_abs_diff(got, expected))
    return float(np.max(diffs))  # NaN-propagating: a NaN output fails the tolerance check
