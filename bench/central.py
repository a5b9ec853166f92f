"""Central training benchmark: one model, full Fashion-MNIST, one epoch.

    python -m bench.central [--model fedavg_cnn] [--epochs 1] [--json]

Trains with batch 64, SGD lr 0.05 momentum 0.9, seed 0 (a progress bar on stderr),
prints test accuracy, parameters, MACs and seconds, and writes bench/results/central.json.
The issue-2 bar is ≥ 0.85 test accuracy after one epoch.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from models import (
    MODEL_NAMES,
    build_model,
    count_macs,
    count_params,
    evaluate,
    load_fashion_mnist,
    train_epochs,
)

RESULTS = Path(__file__).resolve().parent / "results" / "central.json"


def run(*, model_name: str, epochs: int, data_dir: str | None, progress: bool) -> dict[str, object]:
    torch.manual_seed(0)
    train = load_fashion_mnist(data_dir, "train")
    test = load_fashion_mnist(data_dir, "test")
    model = build_model(model_name, in_channels=1, num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    start = time.perf_counter()
    stats = train_epochs(model, train, optimizer=optimizer, epochs=epochs, batch_size=64, seed=0, progress=progress)
    result = evaluate(model, test)
    seconds = time.perf_counter() - start

    return {
        "model": model_name,
        "dataset": "fashion_mnist",
        "epochs": epochs,
        "batch_size": 64,
        "optimizer": "SGD lr=0.05 momentum=0.9",
        "seed": 0,
        "train_samples": len(train),
        "test_samples": len(test),
        "train_loss": round(stats.loss, 4),
        "train_accuracy": round(stats.accuracy, 4),
        "test_loss": round(result.loss, 4),
        "test_accuracy": round(result.accuracy, 4),
        "params": count_params(model),
        "macs": count_macs(model, train.input_shape),
        "seconds": round(seconds, 1),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.central", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="fedavg_cnn", choices=MODEL_NAMES)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--data-dir", default=None,
                        help="Fashion-MNIST IDX directory (default: $FEDSLIM_FASHION_MNIST_DIR or the Debian package's)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON instead of a summary")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    result = run(model_name=args.model, epochs=args.epochs, data_dir=args.data_dir, progress=not args.no_progress)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")

    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"{result['model']}: test accuracy {result['test_accuracy']:.4f} after {result['epochs']} epoch(s) | "
            f"params {result['params']:,} | MACs {result['macs']:,} | {result['seconds']:.1f} s "
            f"({result['torch_threads']} threads)"
        )
        print(f"wrote {RESULTS}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
