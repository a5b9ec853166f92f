"""`fedslim-agent infer`: classify images or a .npy batch with an exported ONNX model.

Imports onnxruntime and numpy only — never torch, nor any fedslim module that does — so a
device can run the exported model without PyTorch installed.

Inputs:
  *.npy   float32 (N, C, H, W): fed as is (already normalised);
          uint8 (N, H, W) / (N, H, W, C) / (H, W): scaled to [0, 1], normalised by --mean/--std
  *.pgm, *.ppm, *.pnm  (P2/P3/P5/P6, maxval ≤ 255), read with numpy alone
  *.png, *.jpg and others   read with Pillow if it is importable
  *.csv   one sample per row: numeric feature columns (C·H·W of them, in C, H, W order),
          an optional header row, whose `label` column (--label-column) is left out;
          normalised as (x − mean)/std per channel, like the agent's CSV training data
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from edge_agent.units import parse_size, proc_status_bytes

__all__ = ["InferError", "choose_model", "classify", "inference_peak", "load_inputs", "main", "read_csv_rows",
           "read_pnm"]

# Fashion-MNIST training-split statistics (models.transforms.DATASET_STATS).
DEFAULT_MEAN, DEFAULT_STD = "0.2860", "0.3530"


class InferError(ValueError):
    """An input cannot be read or does not fit the model; the message names it."""


def read_pnm(path: str | Path) -> np.ndarray:
    """Netpbm gray (P2/P5) or colour (P3/P6) image → uint8 (H, W, C)."""
    raw = Path(path).read_bytes()
    magic = raw[:2]
    if magic not in (b"P2", b"P3", b"P5", b"P6"):
        raise InferError(f"{path}: not a PGM/PPM image (magic {magic!r})")
    channels = 3 if magic in (b"P3", b"P6") else 1
    # Header: magic, width, height, maxval, separated by whitespace; '#' starts a comment.
    fields: list[int] = []
    pos = 2
    while len(fields) < 3:
        while pos < len(raw) and raw[pos : pos + 1].isspace():
            pos += 1
        if raw[pos : pos + 1] == b"#":
            pos = raw.find(b"\n", pos) + 1 or len(raw)
            continue
        start = pos
        while pos < len(raw) and not raw[pos : pos + 1].isspace():
            pos += 1
        try:
            fields.append(int(raw[start:pos]))
        except ValueError:
            raise InferError(f"{path}: malformed PNM header") from None
    width, height, maxval = fields
    if not 0 < maxval <= 255:
        raise InferError(f"{path}: only 8-bit PNM is supported (maxval {maxval})")
    count = width * height * channels
    if magic in (b"P5", b"P6"):
        data = np.frombuffer(raw, dtype=np.uint8, count=count, offset=pos + 1) if len(raw) >= pos + 1 + count else None
    else:
        values = raw[pos:].split()
        data = np.array([int(v) for v in values[:count]], dtype=np.int64) if len(values) >= count else None
    if data is None:
        raise InferError(f"{path}: truncated image data (expected {count} values)")
    scaled = data.astype(np.float64) * (255.0 / maxval)
    return np.rint(scaled).astype(np.uint8).reshape(height, width, channels)


def _read_image(path: Path) -> np.ndarray:
    if path.suffix.lower() in (".pgm", ".ppm", ".pnm", ".pbm"):
        return read_pnm(path)
    try:
        from PIL import Image  # optional: only for PNG/JPEG inputs
    except ImportError:
        raise InferError(f"{path}: reading {path.suffix or 'this'} images needs Pillow; "
                         "install it or convert to PGM/PPM or .npy") from None
    with Image.open(path) as img:
        arr = np.asarray(img.convert("L" if img.mode in ("1", "L", "I;16", "I") else "RGB"))
    return arr[:, :, None] if arr.ndim == 2 else arr


def read_csv_rows(path: str | Path, label_column: str = "label") -> np.ndarray:
    """CSV rows → float32 (N, F) features. A first row that is not all numbers is a header;
    its `label_column` (if any) is dropped. Errors name the file and line."""
    rows: list[list[float]] = []
    drop: int | None = None
    width: int | None = None
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        for row in reader:
            line = reader.line_num
            if not row or all(not c.strip() for c in row):
                continue
            cells = [c.strip() for c in row]
            if width is None and line == 1 and not all(_is_number(c) for c in cells):
                drop = cells.index(label_column) if label_column in cells else None
                width = len(cells)
                continue
            if width is not None and len(cells) != width:
                raise InferError(f"{path}:{line}: {len(cells)} columns, expected {width}")
            width = len(cells)
            values = []
            for i, cell in enumerate(cells):
                if i == drop:
                    continue
                if not _is_number(cell) or not math.isfinite(float(cell)):
                    raise InferError(f"{path}:{line}: column {i + 1} is not a finite number ({cell[:40]!r})")
                values.append(float(cell))
            rows.append(values)
    if not rows:
        raise InferError(f"{path}: no data rows")
    return np.asarray(rows, dtype=np.float32)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _normalise(images: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, C) → float32 (N, C, H, W), (x/255 − mean)/std per channel."""
    x = images.astype(np.float32).transpose(0, 3, 1, 2) / 255.0
    return (x - mean.reshape(1, -1, 1, 1)) / std.reshape(1, -1, 1, 1)


def _fit_channels(images: np.ndarray, channels: int, source: str) -> np.ndarray:
    """uint8 (N, H, W, C) with C converted to `channels` (gray ↔ RGB)."""
    have = images.shape[-1]
    if have == channels:
        return images
    if have == 1:
        return np.repeat(images, channels, axis=-1)
    if have == 3 and channels == 1:
        luma = images.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        return np.rint(luma).astype(np.uint8)[..., None]
    raise InferError(f"{source}: {have} channels cannot feed a {channels}-channel model")


def load_inputs(
    paths: list[str], input_shape: tuple[int, int, int], mean: np.ndarray, std: np.ndarray,
    *, label_column: str = "label",
) -> list[tuple[str, np.ndarray]]:
    """Each input file → (label, float32 (N, C, H, W) batch) matching `input_shape` (C, H, W)."""
    c, h, w = input_shape
    out: list[tuple[str, np.ndarray]] = []
    for name in paths:
        path = Path(name)
        if not path.is_file():
            raise InferError(f"{path}: no such file")
        if path.suffix.lower() == ".npy":
            arr = np.load(path, allow_pickle=False)
            if arr.dtype == np.uint8:
                if arr.ndim == 2:
                    arr = arr[None]
                if arr.ndim == 3:
                    arr = arr[..., None]
                if arr.ndim != 4:
                    raise InferError(f"{path}: uint8 arrays must be (N, H, W[, C]), got {arr.shape}")
                batch = _normalise(_fit_channels(arr, c, str(path)), mean, std)
            elif arr.dtype.kind == "f" and arr.ndim == 4:
                batch = arr.astype(np.float32)
            else:
                raise InferError(f"{path}: expected float (N, C, H, W) or uint8 (N, H, W[, C]), "
                                 f"got {arr.dtype} {arr.shape}")
        elif path.suffix.lower() == ".csv":
            rows = read_csv_rows(path, label_column)
            if rows.shape[1] != c * h * w:
                raise InferError(f"{path}: {rows.shape[1]} feature columns, the model's input {c}×{h}×{w} "
                                 f"needs {c * h * w}")
            x = rows.reshape(-1, c, h, w)
            batch = (x - mean.reshape(1, -1, 1, 1)) / std.reshape(1, -1, 1, 1)
        else:
            img = _fit_channels(_read_image(path)[None], c, str(path))
            batch = _normalise(img, mean, std)
        if batch.shape[1:] != (c, h, w):
            raise InferError(f"{path}: input is {batch.shape[1:]} (C, H, W) but the model expects {(c, h, w)}")
        out.append((str(path), np.ascontiguousarray(batch)))
    return out


def classify(session: ort.InferenceSession, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 (N, C, H, W) → (class index (N,), softmax probability of that class (N,))."""
    name = session.get_inputs()[0].name
    (logits,) = session.run(None, {name: batch})
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    top = probs.argmax(axis=1)
    return top, probs[np.arange(len(top)), top]


def _session(path: str, threads: int | None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def _input_shape(session: ort.InferenceSession) -> tuple[int, int, int]:
    shape = session.get_inputs()[0].shape  # ["batch", C, H, W]
    if len(shape) != 4 or not all(isinstance(d, int) for d in shape[1:]):
        raise InferError(f"model input must be (batch, C, H, W) with fixed C, H, W; got {shape}")
    return int(shape[1]), int(shape[2]), int(shape[3])


def _floats(text: str, channels: int, what: str) -> np.ndarray:
    values = np.array([float(v) for v in text.split(",")], dtype=np.float32)
    if len(values) == 1:
        values = np.repeat(values, channels)
    if len(values) != channels:
        raise InferError(f"--{what} needs 1 or {channels} comma-separated values, got {text!r}")
    return values


def inference_peak(path: str, threads: int | None, batch: int = 1) -> int | None:
    """Measured peak rise of this process's resident set while `path` is loaded and runs
    one batch (Linux's VmHWM, reset first); None where the kernel cannot tell."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
    except OSError:
        return None
    base = proc_status_bytes("VmRSS")
    session = _session(path, threads)
    c, h, w = _input_shape(session)
    classify(session, np.zeros((batch, c, h, w), dtype=np.float32))
    peak = proc_status_bytes("VmHWM")
    del session
    return None if base is None or peak is None else max(0, peak - base)


def choose_model(paths: list[str], limit: int | None, threads: int | None) -> str:
    """The first of `paths` (widest level first) whose measured inference peak fits
    `limit` bytes; InferError naming what each needs when none does."""
    if limit is None:
        return paths[0]
    measured = []
    for path in paths:
        if not Path(path).is_file():
            raise InferError(f"{path}: no such model file")
        try:
            peak = inference_peak(path, threads)
        except Exception as exc:  # ORT's pybind errors share no base
            raise InferError(f"{path}: ONNX Runtime cannot load it: {exc}") from exc
        if peak is None:
            raise InferError("--memory-limit needs Linux's /proc to measure a model's peak")
        if peak <= limit:
            print(f"fedslim-agent infer: {path} needs {peak / 2**20:.1f} MiB, within the limit", file=sys.stderr)
            return path
        measured.append(f"{path}: {peak / 2**20:.1f} MiB")
    raise InferError(f"no model fits the memory limit of {limit / 2**20:.1f} MiB ({'; '.join(measured)})")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedslim-agent infer",
                                description="Classify images, CSV rows or .npy batches with an ONNX model (no torch).")
    p.add_argument("--model", required=True, action="append",
                   help="ONNX model file; repeat it for the width levels of a federation, widest first, with --memory-limit")
    p.add_argument("--memory-limit", default=None,
                   help="use the first --model whose measured inference peak (RSS rise, batch 1) fits, e.g. 16MB")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help=".npy batch, PGM/PPM image, PNG/JPEG image (with Pillow), CSV rows of features")
    p.add_argument("--mean", default=DEFAULT_MEAN,
                   help="per-channel mean for images and CSV rows: the federation's data.input.mean "
                        "(default Fashion-MNIST's)")
    p.add_argument("--std", default=DEFAULT_STD, help="per-channel std, as --mean")
    p.add_argument("--label-column", default="label", help="the CSV header's column left out of the features")
    p.add_argument("--labels", help="comma-separated class names to print beside indices")
    p.add_argument("--threads", type=int, help="ORT intra-op threads (default: ORT's choice)")
    p.add_argument("--json", action="store_true", help="print one JSON list instead of lines")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        limit = parse_size(args.memory_limit) if args.memory_limit else None
        if limit is None and len(args.model) > 1:
            raise InferError("several --model files need --memory-limit to choose between them")
        args.model = choose_model(args.model, limit, args.threads)
        if not Path(args.model).is_file():
            raise InferError(f"{args.model}: no such model file")
        try:
            session = _session(args.model, args.threads)
        except Exception as exc:  # ORT's pybind errors (InvalidProtobuf, Fail…) share no base
            raise InferError(f"{args.model}: ONNX Runtime cannot load it: {exc}") from exc
        shape = _input_shape(session)
        mean, std = _floats(args.mean, shape[0], "mean"), _floats(args.std, shape[0], "std")
        labels = args.labels.split(",") if args.labels else None
        results: list[dict[str, Any]] = []
        for source, batch in load_inputs(args.inputs, shape, mean, std, label_column=args.label_column):
            top, prob = classify(session, batch)
            for i, (k, p) in enumerate(zip(top.tolist(), prob.tolist(), strict=True)):
                row: dict[str, Any] = {"input": source, "index": i, "class": int(k), "probability": float(p)}
                if labels is not None and k < len(labels):
                    row["label"] = labels[k]
                results.append(row)
    except (InferError, OSError, ValueError) as exc:
        print(f"fedslim-agent infer: error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(results))
    else:
        for r in results:
            name = f" ({r['label']})" if "label" in r else ""
            print(f"{r['input']}[{r['index']}]\tclass={r['class']}{name}\tp={r['probability']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
