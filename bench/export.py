"""Dense vs structured-pruned ONNX export of CIFAR ResNets: MACs and measured latency.

    python -m bench.export [--quick] [--json] [--threads 1] [--round-to 16] [--target-macs 0.45]

Models are random-init (seeded) with BatchNorm statistics calibrated on 256 synthetic
CIFAR-shaped images (3×32×32): latency does not depend on the weights, and calibrated BN
keeps the logits O(1) so the 1e-4 parity check is meaningful. Accuracy is therefore not
reported here (see `fedslim-agent export` on a trained checkpoint for that). Pruning:
`prune_channels(target_macs=…, round_to=…)` with L2 group importance; the default channel
multiple is the CPU's SIMD block (16 with AVX-512, else 8). Dense and pruned files are
timed side by side in one process (interleaved repeats, median) by `build_report`.
Writes bench/results/export.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.datasets import make_synthetic
from models.transforms import to_tensor
from models.zoo import build_model
from pruning.export.report import build_report
from pruning.structured import prune_channels

RESULTS = Path(__file__).resolve().parent / "results" / "export.json"
TARGET_MACS_REDUCTION, TARGET_LATENCY_GAIN_BS64 = 2.0, 1.6


def simd_block() -> int:
    """16 floats per vector with AVX-512, 8 with AVX2 (Linux /proc/cpuinfo; 8 elsewhere)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return 8
    return 16 if " avx512f" in flags else 8


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


@torch.no_grad()
def calibrate_bn(model: nn.Module, images: torch.Tensor) -> nn.Module:
    """Running BN statistics from `images` (cumulative average), then eval mode."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    for part in images.split(64):
        model(part)
    return model.eval()


def run(args: argparse.Namespace) -> dict[str, Any]:
    calib = make_synthetic(256, image_size=32, channels=3, seed=0)
    test = make_synthetic(64, image_size=32, channels=3, seed=0, split="test")
    calib_x = to_tensor(calib.images, calib.name)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fedslim-bench-") as tmp:
        for name in args.models:
            torch.manual_seed(0)
            dense = calibrate_bn(build_model(name, in_channels=3, image_size=32), calib_x)
            pruned = prune_channels(copy.deepcopy(dense), calib_x[:8], target_macs=args.target_macs,
                                    round_to=args.round_to)
            calibrate_bn(pruned, calib_x)  # removed channels shift downstream statistics
            report = build_report(
                dense, pruned, test, out_path=Path(tmp) / f"{name}.onnx", model_name=name,
                threads=args.threads, warmup=args.warmup, repeats=args.repeats, eval_limit=0,
            )
            print(report.table(), file=sys.stderr if args.json else sys.stdout)
            print(file=sys.stderr if args.json else sys.stdout)
            d = report.to_dict()
            rows.append({
                "model": name,
                "dense_macs": d["dense_macs"],
                "pruned_macs": d["pruned_macs"],
                "macs_reduction": d["macs_reduction"],
                "params": d["params"],
                "file_bytes": d["file_bytes"],
                "parity_max_abs_diff": d["parity_max_abs_diff"],
                "ort_latency_ms": d["ort_latency_ms"],
                "torch_latency_ms": d["torch_latency_ms"],
                "ort_speedup_vs_torch": d["ort_speedup_vs_torch"],
                "latency_speedup": d["latency_speedup"],
                "pruned_widths": d["pruned_widths"],
                "warnings": d["warnings"],
                "meets_targets": {
                    "macs_reduction>=2": d["macs_reduction"] >= TARGET_MACS_REDUCTION,
                    "ort_bs64_speedup>=1.6": d["latency_speedup"]["bs64"] >= TARGET_LATENCY_GAIN_BS64,
                },
            })
    return {
        "command": " ".join(["python -m bench.export", *sys.argv[1:]]),
        "input_shape": [3, 32, 32],
        "weights": "random init (seed 0), BN calibrated on 256 synthetic images",
        "threads": args.threads,
        "round_to": args.round_to,
        "target_macs": args.target_macs,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "load_average_at_start": list(os.getloadavg()),
        "versions": {"torch": torch.__version__, "onnxruntime": __import__("onnxruntime").__version__},
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "results": rows,
    }


def summary(result: dict[str, Any]) -> str:
    head = ("model", "MACs cut", "ORT bs1 d/p ms", "ORT bs64 d/p ms", "bs1 gain", "bs64 gain",
            "eager/ORT bs64 d/p")
    lines = [head]
    for r in result["results"]:
        o, e = r["ort_latency_ms"], r["ort_speedup_vs_torch"]
        lines.append((
            r["model"], f"{r['macs_reduction']:.2f}x",
            f"{o['dense']['bs1']:.2f}/{o['pruned']['bs1']:.2f}",
            f"{o['dense']['bs64']:.1f}/{o['pruned']['bs64']:.1f}",
            f"{r['latency_speedup']['bs1']:.2f}x", f"{r['latency_speedup']['bs64']:.2f}x",
            f"{e['dense']['bs64']:.2f}x/{e['pruned']['bs64']:.2f}x",
        ))
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    text = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in lines]
    text.append(f"threads={result['threads']} round_to={result['round_to']} repeats={result['repeats']} "
                f"cpu={result['cpu']} load={result['load_average_at_start'][0]:.1f}")
    return "\n".join(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats (smoke run)")
    p.add_argument("--json", action="store_true", help="print the result JSON on stdout")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads for ORT and eager (default 1)")
    p.add_argument("--round-to", type=int, default=simd_block(), help="channel multiple (default: SIMD block)")
    p.add_argument("--target-macs", type=float, default=0.45, help="pruned MACs as a fraction of dense")
    p.add_argument("--models", nargs="+", default=["resnet32", "resnet56"])
    p.add_argument("--repeats", type=int)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.repeats is None:
        args.repeats = 5 if args.quick else 30
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(summary(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
