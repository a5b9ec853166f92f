"""`fedslim-agent export`: checkpoint → (optionally channel-pruned) ONNX file + report."""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

import numpy as np
import torch

from models.datasets import DatasetError, ImageDataset, load_dataset
from models.structure import structure_of
from models.transforms import to_tensor
from models.zoo import build_model
from pruning.export.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from pruning.export.onnx_export import EXPORTERS, ExportError
from pruning.export.report import build_report
from pruning.structured import IMPORTANCES, prune_channels

__all__ = ["build_parser", "export_main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedslim-agent export",
        description="Export a checkpoint to ONNX (channel-pruned if asked), verify it against "
        "ONNX Runtime and write a dense-vs-pruned report (MACs, latency, accuracy).",
    )
    p.add_argument("--checkpoint", required=True, type=Path, help=".npz checkpoint (save_checkpoint format)")
    p.add_argument("--out", required=True, type=Path, help="ONNX file to write")
    p.add_argument("--report", required=True, type=Path, help="JSON report to write")
    p.add_argument("--model", help="zoo model name (default: the checkpoint's meta)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--prune-ratio", type=float, help="remove this fraction of channels per group")
    how.add_argument("--target-macs", type=float, help="prune until MACs ≤ this fraction of the checkpoint's")
    p.add_argument("--round-to", type=int, default=8, help="channel multiple (8 AVX2, 16 AVX-512; default 8)")
    p.add_argument("--importance", default="l2", choices=sorted(IMPORTANCES))
    p.add_argument("--dataset", help="dataset for parity/accuracy (default: the checkpoint's meta)")
    p.add_argument("--data-dir", help="dataset directory (Fashion-MNIST default: the Debian package)")
    p.add_argument("--eval-limit", type=int, help="evaluate accuracy on the first N test images only")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads for ORT and eager (default 2)")
    p.add_argument("--repeats", type=int, default=20, help="timed runs per batch size (median)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--int8", action="store_true", help="also write MODEL.int8.onnx (static QDQ) and measure it")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--exporter", choices=EXPORTERS, default="legacy")
    p.add_argument("--atol", type=float, default=1e-4, help="max |ORT − torch| allowed")
    p.add_argument("--save-pruned", type=Path, help="also write the pruned model as a checkpoint")
    return p


def export_main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except (ExportError, CheckpointError, DatasetError, ValueError) as exc:
        print(f"fedslim-agent export: error: {exc}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    model, meta = load_checkpoint(args.checkpoint, model_name=args.model)
    name = str(meta["model"])
    dense_fresh = build_model(name, in_channels=int(meta["in_channels"]), num_classes=int(meta["num_classes"]),
                              image_size=meta.get("image_size"))
    is_dense = structure_of(dense_fresh) == structure_of(model)

    dataset = args.dataset or meta.get("dataset")
    data: ImageDataset | None = None
    calibration: ImageDataset | None = None
    if dataset:
        data = load_dataset(dataset, args.data_dir, split="test")
        if args.int8:
            train = load_dataset(dataset, args.data_dir, split="train")
            calibration = train.subset(np.random.default_rng(0).permutation(len(train))[:256])
    size = int(meta.get("image_size") or (28 if int(meta["in_channels"]) == 1 else 32))
    input_shape = data.input_shape if data is not None else (int(meta["in_channels"]), size, size)

    # Dense reference: the checkpoint itself when it is dense; else the zoo model at full
    # width (random weights: MACs and latency are meaningful, its accuracy is not).
    dense = model if is_dense else dense_fresh
    pruned = copy.deepcopy(model) if is_dense else model
    if args.prune_ratio is not None or args.target_macs is not None:
        example = (to_tensor(data.images[:8], data.name) if data is not None
                   else torch.randn((8, *input_shape), generator=torch.Generator().manual_seed(0)))
        prune_channels(pruned, example, ratio=args.prune_ratio, target_macs=args.target_macs,
                       round_to=args.round_to, importance=args.importance)
    if args.save_pruned:
        save_checkpoint(args.save_pruned, pruned, meta)

    report = build_report(
        dense, pruned, data, out_path=args.out, model_name=name, input_shape=input_shape,
        calibration=calibration, dense_weights_known=is_dense, threads=args.threads,
        warmup=args.warmup, repeats=args.repeats, eval_limit=args.eval_limit, int8=args.int8,
        atol=args.atol, opset=args.opset, exporter=args.exporter,
    )
    args.report.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.report.with_name(f".{args.report.name}.{os.getpid()}.tmp")
    tmp.write_text(report.to_json() + "\n")
    os.replace(tmp, args.report)
    print(report.table())
    for w in report.warnings:
        print(f"fedslim-agent export: warning: {w}", file=sys.stderr)
    return 0
