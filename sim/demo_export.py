"""The demo's last step: turn the federation's final model into a verified ONNX file and
an export report, through the agent's own `fedslim-agent export` command."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

__all__ = ["export_final"]


def export_final(args: argparse.Namespace, out: Path, final_model: bytes) -> dict[str, Any]:
    from models.state import build_from_state
    from pruning.export.checkpoint import save_checkpoint
    from sparse_kernels import MAX_MODEL_BYTES, decode

    in_channels = 3 if args.dataset == "cifar10" else 1
    weights = decode(final_model, max_bytes=MAX_MODEL_BYTES).to_dense()
    model = build_from_state(args.model, weights, in_channels=in_channels, num_classes=10)
    checkpoint = save_checkpoint(out / "final_checkpoint.npz", model, {
        "model": args.model, "in_channels": in_channels, "num_classes": 10, "image_size": None,
        "dataset": args.dataset,
    })
    onnx_path, report_path = out / "final_model.onnx", out / "export_report.json"
    cmd = [sys.executable, "-m", "edge_agent.cli", "export", "--checkpoint", str(checkpoint),
           "--out", str(onnx_path), "--report", str(report_path), "--threads", "2", "--repeats", "15"]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    if args.eval_samples:
        cmd += ["--eval-limit", str(args.eval_samples)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    (out / "logs" / "export.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"export failed: {done.stderr.strip()[-2000:]}")
    if not args.quiet:
        print(done.stdout)
    report = json.loads(report_path.read_text())
    return {
        "onnx_path": str(onnx_path),
        "dense_macs": report["dense_macs"],
        "pruned_macs": report["pruned_macs"],
        "macs_fraction": report["pruned_macs"] / report["dense_macs"],
        "parity_max_abs_diff": report["parity_max_abs_diff"],
        "ort_latency_ms": report["ort_latency_ms"],
        "latency_speedup_spread": report.get("latency_speedup_spread", {}),
        "load_average": report.get("load_average", {}),
        "onnx_accuracy": report["accuracy"].get("pruned"),
        "export_report": str(report_path),
    }
