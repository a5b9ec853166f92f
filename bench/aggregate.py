"""Aggregation benchmark: bytes in -> decoded -> folded, for N ResNet-32 updates.

    python -m bench.aggregate [--quick] [--json]

Each update is a 10%-density per-tensor top-k ResNet-32 delta, fp16 values, encoded
once up front (a pool of distinct updates, cycled). updates_per_s times
`SparseAccumulator.fold_bytes` (wall clock; updates_per_s_cpu: process CPU time) (decode with shape checks +
fold), best of a few runs.
Peak memory is tracemalloc's peak of what numpy and Python allocate while folding
N updates (accumulator included); it should be flat in N.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

from bench.codec import resnet32_shapes
from sparse_kernels import DeltaMeta, ModelDelta, SparseAccumulator, encode, select_topk

RESULTS = Path(__file__).resolve().parent / "results"
COUNTS = (10, 100, 1000)


def make_pool(size: int, density: float) -> list[bytes]:
    rng = np.random.default_rng(0)
    shapes = resnet32_shapes()
    pool = []
    for i in range(size):
        dense = {name: rng.normal(size=s).astype(np.float32) for name, s in shapes.items()}
        sparse = select_topk(dense, density=density)
        md = ModelDelta(DeltaMeta("bench", 1, 0, 50 + i), tuple(sparse.values()))
        pool.append(encode(md, values="fp16"))
    return pool


def fold_all(pool: list[bytes], count: int) -> SparseAccumulator:
    acc = SparseAccumulator(resnet32_shapes())
    for i in range(count):
        acc.fold_bytes(pool[i % len(pool)])
    return acc


def run(quick: bool, density: float = 0.1) -> list[dict]:
    pool = make_pool(8 if quick else 32, density)
    repeats = 2 if quick else 5
    n = sum(math.prod(s) for s in resnet32_shapes().values())
    rows = []
    for count in COUNTS:
        best = best_cpu = math.inf
        for _ in range(repeats if count < 1000 else max(1, repeats - 1)):
            t, c = time.perf_counter(), time.process_time()
            acc = fold_all(pool, count)
            best = min(best, time.perf_counter() - t)
            best_cpu = min(best_cpu, time.process_time() - c)
        assert acc.count == count
        tracemalloc.start()
        try:
            fold_all(pool, count)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        rows.append(
            {
                "updates": count,
                "density": density,
                "n": n,
                "update_bytes": round(sum(map(len, pool)) / len(pool)),
                "updates_per_s": round(count / best, 1),
                "ms_per_update": round(1000 * best / count, 3),
                # CPU time of this process: what one core does when the machine is shared
                "updates_per_s_cpu": round(count / best_cpu, 1),
                "peak_traced_bytes": peak,
                "peak_traced_mib": round(peak / 2**20, 2),
            }
        )
    base = rows[0]["peak_traced_bytes"]
    for r in rows:
        r["peak_vs_10_updates"] = round(r["peak_traced_bytes"] / base, 3)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.aggregate", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller pool, fewer repeats")
    ap.add_argument("--json", action="store_true", help="print the JSON list instead of a table")
    args = ap.parse_args(argv)
    rows = run(args.quick)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / ("aggregate-quick.json" if args.quick else "aggregate.json")
    out.write_text(json.dumps(rows, indent=1) + "\n")
    if args.json:
        json.dump(rows, sys.stdout, indent=1)
        print()
        return
    print(f"{'updates':>8} {'upd/s':>8} {'cpu upd/s':>10} {'ms/upd':>8} {'peak MiB':>9} {'x peak@10':>10}")
    for r in rows:
        print(
            f"{r['updates']:>8} {r['updates_per_s']:>8.0f} {r['updates_per_s_cpu']:>10.0f} {r['ms_per_update']:>8.2f} "
            f"{r['peak_traced_mib']:>9.2f} {r['peak_vs_10_updates']:>10.3f}"
        )
    print(f"\n(JSON written to {os.path.relpath(out)})")


if __name__ == "__main__":
    main()
