"""Dense vs pruned export report: params, MACs, file sizes, parity, latency, accuracy.

Latency is measured side by side in one process: every repeat runs each candidate once,
in turn (dense, pruned, int8…), so that load from other processes hits all of them alike;
we report the median of the repeats after a warm-up, the 10th–90th percentile spread, the
speed-up as the median of the per-repeat ratios (each from one pair run back to back)
and the load average around the timing, so that a reader can judge the machine. ORT sessions use ORT_ENABLE_ALL and
a fixed intra-op thread count; PyTorch eager runs under `torch.inference_mode` with the
same `torch.set_num_threads`.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from models.counting import count_macs, count_params
from models.datasets import ImageDataset
from models.transforms import to_tensor
from pruning.export.onnx_export import INPUT_NAME, OUTPUT_NAME, export_onnx, make_session

__all__ = ["BATCH_SIZES", "ExportReport", "build_report", "measure_interleaved", "time_interleaved"]

BATCH_SIZES = {"bs1": 1, "bs64": 64}
# A MACs cut of at least this fraction should show up as at least this latency gain.
_MACS_CUT, _LATENCY_GAIN = 0.05, 0.05

Timings = dict[str, dict[str, float]]  # candidate -> {"bs1": ms, "bs64": ms}


@dataclass
class ExportReport:
    model: str
    input_shape: list[int]
    onnx_path: str
    opset: int
    exporter: str
    params: dict[str, int]
    dense_macs: int
    pruned_macs: int
    macs_reduction: float  # dense / pruned
    file_bytes: dict[str, int]
    parity_max_abs_diff: float
    dense_parity_max_abs_diff: float
    parity_samples: int
    parity_inputs: str  # where the parity batch came from
    ort_latency_ms: Timings  # {"dense": {"bs1", "bs64"}, "pruned": {...}}
    torch_latency_ms: Timings  # PyTorch eager, same threads
    ort_speedup_vs_torch: Timings  # eager ms / ORT ms
    latency_speedup: dict[str, float]  # ORT dense ms / ORT pruned ms, per batch size
    accuracy: dict[str, float | None]  # through ORT on the exported files
    eval_samples: int
    threads: int
    warmup: int
    repeats: int
    pruned_widths: dict[str, int]  # out channels of every Conv2d/Linear of the pruned model
    int8: dict[str, Any] | None = None
    # 10th and 90th percentile of the repeats, same layout as ort_latency_ms
    ort_latency_spread_ms: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    # per batch size: [p10, median, p90] of dense/pruned over the repeats (pairs run back to back)
    latency_speedup_spread: dict[str, list[float]] = field(default_factory=dict)
    load_average: dict[str, list[float]] = field(default_factory=dict)  # {"before": [1, 5, 15 min], "after": ...}
    warnings: list[str] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def table(self) -> str:
        """Human-readable summary, one row per quantity."""
        def acc(v: float | None) -> str:
            return "n/a" if v is None else f"{100 * v:.2f}%"

        lat, eag = self.ort_latency_ms, self.torch_latency_ms
        rows = [
            ("", "dense", "pruned", "ratio"),
            ("params", f"{self.params['dense']:,}", f"{self.params['pruned']:,}",
             f"{self.params['dense'] / max(self.params['pruned'], 1):.2f}x"),
            ("MACs", f"{self.dense_macs:,}", f"{self.pruned_macs:,}", f"{self.macs_reduction:.2f}x"),
            ("ONNX bytes", f"{self.file_bytes['dense']:,}", f"{self.file_bytes['pruned']:,}",
             f"{self.file_bytes['dense'] / max(self.file_bytes['pruned'], 1):.2f}x"),
        ]
        spread, ratio = self.ort_latency_spread_ms, self.latency_speedup_spread
        for bs in BATCH_SIZES:
            def ms(k: str, bs: str = bs) -> str:
                p = spread.get(k, {}).get(bs)
                return f"{lat[k][bs]:.3f}" + (f" ({p[0]:.3f}–{p[1]:.3f})" if p else "")
            r = ratio.get(bs)
            rows.append((f"ORT ms {bs}", ms("dense"), ms("pruned"),
                         f"{self.latency_speedup[bs]:.2f}x" + (f" ({r[0]:.2f}–{r[2]:.2f})" if r else "")))
        for bs in BATCH_SIZES:
            rows.append((f"eager ms {bs}", f"{eag['dense'][bs]:.3f}", f"{eag['pruned'][bs]:.3f}",
                         f"{eag['dense'][bs] / eag['pruned'][bs]:.2f}x"))
        for bs in BATCH_SIZES:
            rows.append((f"eager/ORT {bs}", f"{self.ort_speedup_vs_torch['dense'][bs]:.2f}x",
                         f"{self.ort_speedup_vs_torch['pruned'][bs]:.2f}x", ""))
        rows.append(("accuracy", acc(self.accuracy.get("dense")), acc(self.accuracy.get("pruned")),
                     f"n={self.eval_samples}"))
        rows.append(("parity |diff|", f"{self.dense_parity_max_abs_diff:.2e}",
                     f"{self.parity_max_abs_diff:.2e}", f"n={self.parity_samples}"))
        if self.int8:
            q = self.int8
            rows.append(("int8 ORT ms bs1/bs64", "", f"{q['ort_latency_ms']['bs1']:.3f}/{q['ort_latency_ms']['bs64']:.3f}",
                         f"{q['speedup_vs_pruned_fp32']['bs64']:.2f}x vs fp32"))
            rows.append(("int8 accuracy", "", acc(q.get("accuracy")), f"{q['file_bytes']:,} B"))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        load = self.load_average.get("before")
        lines = [
            f"{self.model} {tuple(self.input_shape)} → {self.onnx_path} (opset {self.opset}, "
            f"{self.exporter}, {self.threads} intra-op threads, median (p10–p90) of {self.repeats} "
            f"interleaved repeats" + (f", load average {load[0]:.2f}" if load else "") + ")"
        ]
        lines += ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
                  for r in rows]
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def time_interleaved(
    candidates: Mapping[str, Callable[[], object]], *, warmup: int, repeats: int
) -> dict[str, list[float]]:
    """Milliseconds of every call of each candidate, timed in turn within every repeat
    (repeat i of one candidate ran right next to repeat i of the others)."""
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {k: [] for k in candidates}
    for _ in range(max(repeats, 1)):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - start) * 1e3)
    return samples


def measure_interleaved(
    candidates: Mapping[str, Callable[[], object]], *, warmup: int, repeats: int
) -> dict[str, float]:
    """Median milliseconds per call of each candidate, timed in turn within every repeat."""
    return {k: statistics.median(v) for k, v in time_interleaved(candidates, warmup=warmup, repeats=repeats).items()}


def percentiles(xs: list[float], qs: tuple[float, ...]) -> list[float]:
    """Linear-interpolated percentiles (0–100) of `xs`."""
    return [float(np.percentile(np.asarray(xs, dtype=np.float64), q)) for q in qs]


def build_report(
    dense_model: nn.Module,
    pruned_model: nn.Module,
    data: ImageDataset | None,
    *,
    out_path: str | Path,
    model_name: str = "",
    input_shape: tuple[int, int, int] | None = None,
    calibration: ImageDataset | None = None,
    dense_weights_known: bool = True,
    threads: int = 2,
    warmup: int = 3,
    repeats: int = 20,
    eval_limit: int | None = None,
    parity_batch: int = 64,
    int8: bool = False,
    atol: float = 1e-4,
    opset: int = 17,
    exporter: str = "legacy",
) -> ExportReport:
    """Export `pruned_model` to `out_path` (and the dense one to a temporary file), verify
    both, and measure them. `data` (test split) gives the parity batch and accuracy; with
    None, parity runs on seeded Gaussian inputs and accuracy is n/a. `dense_weights_known`
    False (a checkpoint that was pruned before export) reports dense accuracy as n/a."""
    if input_shape is None:
        if data is None:
            raise ValueError("need data or input_shape")
        input_shape = data.input_shape
    shape = tuple(int(d) for d in input_shape)
    if data is not None:
        parity_x = to_tensor(data.images[:parity_batch], data.name)
        parity_inputs = f"{data.name} ({len(parity_x)} images)"
    else:
        parity_x = torch.randn((parity_batch, *shape), generator=torch.Generator().manual_seed(0))
        parity_inputs = f"seeded Gaussian ({parity_batch} samples)"
    batches = {bs: _tile(parity_x, n) for bs, n in BATCH_SIZES.items()}

    out_path = Path(out_path)
    with tempfile.TemporaryDirectory(prefix="fedslim-export-") as tmp:
        dense_res = export_onnx(dense_model, Path(tmp) / "dense.onnx", parity_x[:1], parity_input=parity_x,
                                atol=atol, opset=opset, exporter=exporter, threads=threads)
        pruned_res = export_onnx(pruned_model, out_path, parity_x[:1], parity_input=parity_x,
                                 atol=atol, opset=opset, exporter=exporter, threads=threads)
        sessions = {"dense": make_session(dense_res.path, threads=threads),
                    "pruned": make_session(pruned_res.path, threads=threads)}
        int8_info: dict[str, Any] | None = None
        if int8:
            # lazy: onnxruntime.quantization is heavy and only needed here
            from pruning.export.quantize import quantize_int8

            calib = calibration if calibration is not None else data
            calib_x = (to_tensor(calib.images[:256], calib.name) if calib is not None else parity_x).numpy()
            q_path = out_path.with_name(out_path.stem + ".int8.onnx")
            quantize_int8(pruned_res.path, q_path, calib_x)
            sessions["int8"] = make_session(q_path, threads=threads)
            int8_info = {"path": str(q_path), "file_bytes": q_path.stat().st_size,
                         "calibration_samples": len(calib_x)}

        ort_ms: Timings = {k: {} for k in sessions}
        ort_spread: dict[str, dict[str, list[float]]] = {k: {} for k in sessions}
        speedup_spread: dict[str, list[float]] = {}
        load_before = list(os.getloadavg())
        for bs, x in batches.items():
            feed = {INPUT_NAME: x.numpy()}
            timed = time_interleaved(
                {k: partial(s.run, [OUTPUT_NAME], feed) for k, s in sessions.items()},
                warmup=warmup, repeats=repeats)
            for k, v in timed.items():
                ort_ms[k][bs] = statistics.median(v)
                ort_spread[k][bs] = percentiles(v, (10, 90))
            pair_ratios = [d / max(p, 1e-9) for d, p in zip(timed["dense"], timed["pruned"], strict=True)]
            speedup_spread[bs] = percentiles(pair_ratios, (10, 50, 90))
        load_after = list(os.getloadavg())
        eager_ms = _eager_latency({"dense": dense_model, "pruned": pruned_model}, batches,
                                  threads=threads, warmup=warmup, repeats=repeats)
        accuracy: dict[str, float | None] = {"dense": None, "pruned": None}
        eval_samples = 0
        if data is not None and eval_limit != 0:  # eval_limit=0: skip accuracy
            subset = data if eval_limit is None else data.subset(np.arange(min(eval_limit, len(data))))
            eval_samples = len(subset)
            for k, s in sessions.items():
                if k == "dense" and not dense_weights_known:
                    continue
                accuracy[k] = _ort_accuracy(s, subset)
        dense_bytes = Path(dense_res.path).stat().st_size

    if int8_info is not None:
        int8_info["ort_latency_ms"] = ort_ms.pop("int8")
        int8_info["accuracy"] = accuracy.pop("int8", None)
        int8_info["speedup_vs_pruned_fp32"] = {
            bs: ort_ms["pruned"][bs] / int8_info["ort_latency_ms"][bs] for bs in BATCH_SIZES}
    dense_macs, pruned_macs = count_macs(dense_model, shape), count_macs(pruned_model, shape)
    latency_speedup = {bs: ort_ms["dense"][bs] / ort_ms["pruned"][bs] for bs in BATCH_SIZES}
    report = ExportReport(
        model=model_name or type(pruned_model).__name__,
        input_shape=list(shape),
        onnx_path=str(out_path),
        opset=pruned_res.opset,
        exporter=exporter,
        params={"dense": count_params(dense_model), "pruned": count_params(pruned_model)},
        dense_macs=dense_macs,
        pruned_macs=pruned_macs,
        macs_reduction=dense_macs / max(pruned_macs, 1),
        file_bytes={"dense": dense_bytes, "pruned": pruned_res.file_bytes},
        parity_max_abs_diff=pruned_res.parity_max_abs_diff,
        dense_parity_max_abs_diff=dense_res.parity_max_abs_diff,
        parity_samples=pruned_res.parity_samples,
        parity_inputs=parity_inputs,
        ort_latency_ms=ort_ms,
        torch_latency_ms=eager_ms,
        ort_speedup_vs_torch={k: {bs: eager_ms[k][bs] / ort_ms[k][bs] for bs in BATCH_SIZES} for k in eager_ms},
        latency_speedup=latency_speedup,
        accuracy=accuracy,
        eval_samples=eval_samples,
        threads=threads,
        warmup=warmup,
        repeats=repeats,
        pruned_widths=_widths(pruned_model),
        int8=int8_info,
        ort_latency_spread_ms={k: v for k, v in ort_spread.items() if k != "int8"},
        latency_speedup_spread=speedup_spread,
        load_average={"before": load_before, "after": load_after},
        versions={"torch": torch.__version__, "onnxruntime": ort.__version__},
    )
    report.warnings.extend(_warnings(report))
    return report


# ---------------------------------------------------------------- helpers


def _tile(x: torch.Tensor, n: int) -> torch.Tensor:
    """A batch of exactly n samples from x (repeated if x has fewer)."""
    reps = -(-n // len(x))
    return x.repeat(reps, 1, 1, 1)[:n].contiguous()


def _eager_latency(
    models: Mapping[str, nn.Module], batches: Mapping[str, torch.Tensor], *, threads: int, warmup: int, repeats: int
) -> Timings:
    previous = torch.get_num_threads()
    modes = {k: m.training for k, m in models.items()}
    torch.set_num_threads(threads)
    out: Timings = {k: {} for k in models}
    try:
        with torch.inference_mode():
            for m in models.values():
                m.eval()
            for bs, x in batches.items():
                timed = measure_interleaved({k: partial(m, x) for k, m in models.items()},
                                            warmup=warmup, repeats=repeats)
                for k, v in timed.items():
                    out[k][bs] = v
    finally:
        torch.set_num_threads(previous)
        for k, m in models.items():
            m.train(modes[k])
    return out


def _ort_accuracy(session: ort.InferenceSession, data: ImageDataset, batch: int = 256) -> float:
    correct = 0
    for start in range(0, len(data), batch):
        x = to_tensor(data.images[start : start + batch], data.name).numpy()
        (logits,) = session.run([OUTPUT_NAME], {INPUT_NAME: x})
        correct += int((np.asarray(logits).argmax(1) == data.labels[start : start + batch]).sum())
    return correct / max(len(data), 1)


def _widths(model: nn.Module) -> dict[str, int]:
    return {name: (m.out_channels if isinstance(m, nn.Conv2d) else m.out_features)
            for name, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)}


def _warnings(r: ExportReport) -> list[str]:
    out: list[str] = []
    if r.pruned_macs >= r.dense_macs:
        out.append("pruned model has no fewer MACs than the dense one (no pruning requested?)")
        return out
    if r.pruned_macs <= (1 - _MACS_CUT) * r.dense_macs:
        for bs, gain in r.latency_speedup.items():
            if gain < 1 + _LATENCY_GAIN:
                out.append(
                    f"{r.macs_reduction:.2f}x fewer MACs but only {gain:.2f}x ORT latency gain at {bs}: "
                    "check that channel counts are multiples of the SIMD block (--round-to 16 on AVX-512)"
                )
    if r.int8:
        for bs, gain in r.int8["speedup_vs_pruned_fp32"].items():
            if gain < 1.0:
                out.append(f"int8 model is slower than fp32 at {bs} ({gain:.2f}x); ship the fp32 file")
    return out
