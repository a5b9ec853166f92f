"""Codec benchmark: index bits vs the log2 C(n,k) bound, bytes vs dense, throughput.

    python -m bench.codec [--quick] [--json]

Rows per (encoding, density):
  flat:<enc>      one ResNet-32-sized tensor (n = 464,154), uniformly random support,
                  fp16 values; <enc> = rice | bitmap | bitmap_zlib | auto
  naive_int32_fp32 / dense_fp32_npsave   the baselines (raw int32 indices + fp32 values;
                  np.save of the dense fp32 array)
  model:auto_fp16 a whole ResNet-32 delta (95 tensors, per-tensor top-k of a Gaussian
                  delta), fp16 values, what an agent uploads; *_global: global top-k
  model:dense_fp32 the full model as the coordinator's download (kind="model")
bits_per_nonzero counts index bits only (flat rows: the index section; model rows:
everything that is not value bytes: header, table, index sections);
throughput is dense-equivalent (n * 4 bytes) per second, best of several runs, one core.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from sparse_kernels import DeltaMeta, ModelDelta, SparseTensor, decode, encode, select_topk
from sparse_kernels.codec import _encode_index

DENSITIES = (0.001, 0.01, 0.1)
RESULTS = Path(__file__).resolve().parent / "results"


def resnet32_shapes() -> dict[str, tuple[int, ...]]:
    """ResNet-32 for CIFAR (He et al. 2016, option-A shortcuts: no parameters), by hand:
    conv3x3 16/32/64 channels, 3 stages x 5 basic blocks, BN weight+bias, fc 64->10."""
    shapes: dict[str, tuple[int, ...]] = {"conv1.weight": (16, 3, 3, 3)}

    def bn(prefix: str, c: int) -> None:
        shapes[f"{prefix}.weight"] = (c,)
        shapes[f"{prefix}.bias"] = (c,)

    bn("bn1", 16)
    cin = 16
    for stage, c in enumerate((16, 32, 64), start=1):
        for block in range(5):
            p = f"layer{stage}.{block}"
            shapes[f"{p}.conv1.weight"] = (c, cin, 3, 3)
            bn(f"{p}.bn1", c)
            shapes[f"{p}.conv2.weight"] = (c, c, 3, 3)
            bn(f"{p}.bn2", c)
            cin = c
    shapes["linear.weight"] = (10, 64)
    shapes["linear.bias"] = (10,)
    return shapes


def log2_binom(n: int, k: int) -> float:
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2)


def best_time(fn: Callable[[], object], repeat: int) -> float:
    """Best wall time of `repeat` calls (the machine may be shared: min is the signal)."""
    fn()
    best = math.inf
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _row(encoding, density, n, nnz, index_bits, bound, nbytes, t_enc, t_dec) -> dict:
    return {
        "encoding": encoding,
        "density": density,
        "n": n,
        "nnz": nnz,
        "bits_per_nonzero": round(index_bits / nnz, 4) if nnz else None,
        "bound_bits_per_nonzero": round(bound / nnz, 4) if nnz else None,
        "total_bits_per_nonzero": round(8 * nbytes / nnz, 3) if nnz else None,
        "bytes": nbytes,
        "dense_fp32_bytes": 4 * n,
        "ratio_to_dense": round(nbytes / (4 * n), 5),
        "encode_mb_s": round(4 * n / t_enc / 1e6, 1),
        "decode_mb_s": round(4 * n / t_dec / 1e6, 1),
    }


def flat_rows(density: float, repeat: int, rng: np.random.Generator) -> list[dict]:
    n = sum(math.prod(s) for s in resnet32_shapes().values())
    k = round(density * n)
    idx = np.sort(rng.choice(n, k, replace=False)).astype(np.int64)
    vals = rng.normal(size=k).astype(np.float32)
    t = SparseTensor("flat", (n,), idx, vals)
    md = ModelDelta(DeltaMeta(), (t,))
    bound = log2_binom(n, k)
    rows = []
    for enc in ("rice", "bitmap", "bitmap_zlib", "auto"):
        ibits = 8 * len(_encode_index(t, enc)[2])
        data = encode(md, values="fp16", index=enc)  # type: ignore[arg-type]
        te = best_time(lambda e=enc: encode(md, values="fp16", index=e), repeat)  # type: ignore[misc]
        td = best_time(lambda d=data: decode(d), repeat)  # type: ignore[misc]
        rows.append(_row(f"flat:{enc}", density, n, k, ibits, bound, len(data), te, td))

    # baselines: raw int32 indices + fp32 values; np.save of the dense fp32 array
    def naive_enc() -> bytes:
        return idx.astype("<i4").tobytes() + vals.astype("<f4").tobytes()

    raw = naive_enc()
    te = best_time(naive_enc, repeat)
    td = best_time(lambda: (np.frombuffer(raw[: 4 * k], "<i4"), np.frombuffer(raw[4 * k :], "<f4")), repeat)
    rows.append(_row("naive_int32_fp32", density, n, k, 32 * k, bound, len(raw), te, td))
    dense = t.to_dense()

    def npsave() -> bytes:
        buf = io.BytesIO()
        np.save(buf, dense, allow_pickle=False)
        return buf.getvalue()

    blob = npsave()
    te = best_time(npsave, repeat)
    td = best_time(lambda: np.load(io.BytesIO(blob), allow_pickle=False), repeat)
    rows.append(_row("dense_fp32_npsave", density, n, k, 0, bound, len(blob), te, td))
    return rows


def model_rows(density: float, repeat: int, rng: np.random.Generator) -> list[dict]:
    shapes = resnet32_shapes()
    n = sum(math.prod(s) for s in shapes.values())
    dense = {name: rng.normal(size=s).astype(np.float32) for name, s in shapes.items()}
    rows = []
    for scope, label in (("per_tensor", "model:auto_fp16"), ("global", "model:auto_fp16_global")):
        sparse = select_topk(dense, density=density, scope=scope)  # type: ignore[arg-type]
        md = ModelDelta(DeltaMeta("bench", 1, 0, 100), tuple(sparse.values()))
        data = encode(md, values="fp16")
        te = best_time(lambda m=md: encode(m, values="fp16"), repeat)  # type: ignore[misc]
        td = best_time(lambda d=data: decode(d, expected=shapes), repeat)  # type: ignore[misc]
        k = md.nnz
        overhead_bits = 8 * (len(data) - 2 * k)  # everything but the fp16 value bytes
        rows.append(_row(label, density, n, k, overhead_bits, log2_binom(n, k), len(data), te, td))
    return rows


def model_dense_row(repeat: int, rng: np.random.Generator) -> dict:
    shapes = resnet32_shapes()
    full = ModelDelta.from_dense({name: rng.normal(size=s) for name, s in shapes.items()})
    data = encode(full, values="fp32")
    te = best_time(lambda: encode(full, values="fp32"), repeat)
    td = best_time(lambda: decode(data, expected=shapes), repeat)
    n = full.numel
    return _row("model:dense_fp32", 1.0, n, n, 8 * (len(data) - 4 * n), 0.0, len(data), te, td)


def run(quick: bool) -> list[dict]:
    rng = np.random.default_rng(0)
    repeat = 5 if quick else 30
    rows: list[dict] = []
    for d in DENSITIES:
        rows += flat_rows(d, repeat, rng)
        rows += model_rows(d, repeat, rng)
    rows.append(model_dense_row(repeat, rng))
    return rows


def table(rows: list[dict]) -> str:
    cols = [
        ("encoding", 20), ("density", 8), ("nnz", 7), ("bits/nz", 8), ("bound", 7),
        ("x bound", 7), ("bytes", 9), ("% dense", 8), ("enc MB/s", 9), ("dec MB/s", 9),
    ]
    lines = ["".join(f"{c:>{w}} " for c, w in cols)]
    for r in rows:
        b, bound = r["bits_per_nonzero"], r["bound_bits_per_nonzero"]
        x = f"{b / bound:.3f}" if b is not None and bound else "-"
        vals = [
            r["encoding"], f"{r['density']:g}", r["nnz"], "-" if b is None else f"{b:.2f}",
            "-" if not bound else f"{bound:.2f}", x, r["bytes"], f"{100 * r['ratio_to_dense']:.3f}",
            f"{r['encode_mb_s']:.0f}", f"{r['decode_mb_s']:.0f}",
        ]
        lines.append("".join(f"{str(v):>{w}} " for v, (_, w) in zip(vals, cols, strict=True)))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.codec", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer timing repeats (< 1 min)")
    ap.add_argument("--json", action="store_true", help="print the JSON list instead of a table")
    args = ap.parse_args(argv)
    rows = run(args.quick)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / ("codec-quick.json" if args.quick else "codec.json")
    out.write_text(json.dumps(rows, indent=1) + "\n")
    if args.json:
        json.dump(rows, sys.stdout, indent=1)
        print()
    else:
        print(table(rows))
        print(f"\n(JSON written to {os.path.relpath(out)})")


if __name__ == "__main__":
    main()
