"""A device's own data (`fedslim-agent run --data PATH`), read once and mapped to each
federation's input spec.

Three layouts:
  folder/<class name>/*.png|*.jpg|*.jpeg   images, read with Pillow (any size, gray or colour)
  file.npz with `x`, `y`                   x: uint8 images (N, H, W[, C]) or float features
                                           (N, ...) of C·H·W values; y: class names or indices
  file.csv                                 a header row, numeric feature columns and a label
                                           column (`label` unless told): one sample per row

Reading (`read_local`) checks what does not depend on a federation: unreadable images,
rows of the wrong width, NaN/Inf, no samples. Mapping (`to_dataset`) checks the rest against
the `InputSpec` the task carries: labels must name the federation's classes, features must
fill its shape; images are resized (bilinear) and converted gray ↔ RGB. Every error is a
`LocalDataError` naming the file (and line, for CSV), raised before anything is trained
or sent.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from coordinator.protocol import InputSpec
from models import ImageDataset
from models.datasets import DatasetError, read_xy_npz

__all__ = ["IMAGE_SUFFIXES", "MAX_IMAGE_PIXELS", "LocalData", "LocalDataError", "holdout_split", "read_local",
           "to_dataset"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# Pillow's own bomb check only warns below 2× its limit; a device's photo is far smaller
MAX_IMAGE_PIXELS = 4096 * 4096


class LocalDataError(ValueError):
    """Local data that cannot be trained on; the message names the file (and CSV line)."""


@dataclass(frozen=True)
class LocalData:
    """Samples as read, before a federation's spec: images (uint8 (H, W, C) each, sizes may
    differ) or features (float32 (N, F)); the label of each as written, and where it came from."""

    path: Path
    images: list[np.ndarray] | None  # uint8 (H, W, C) per sample
    features: np.ndarray | None  # float32 (N, F)
    labels: list[str]  # class name or index, as written
    sources: list[str]  # "file" or "file:line" per sample, for error messages

    def __len__(self) -> int:
        return len(self.labels)


# ---------------------------------------------------------------- reading

def read_local(path: str | Path, *, label_column: str = "label") -> LocalData:
    """Read an image folder, an .npz or a CSV file (by what `path` is)."""
    path = Path(path)
    if path.is_dir():
        data = _read_folder(path)
    elif path.suffix.lower() == ".npz" and path.is_file():
        data = _read_npz(path)
    elif path.suffix.lower() == ".csv" and path.is_file():
        data = _read_csv(path, label_column)
    elif not path.exists():
        raise LocalDataError(f"{path}: no such file or folder")
    else:
        raise LocalDataError(f"{path}: expected a folder of class sub-folders, a .npz or a .csv file")
    if not len(data):
        raise LocalDataError(f"{path}: no samples found")
    return data


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise LocalDataError(f"{path}: {img.width}×{img.height} pixels exceeds {MAX_IMAGE_PIXELS}")
            gray = img.mode in ("1", "L", "I;16", "I", "F") or (img.mode == "P" and _gray_palette(img))
            arr = np.asarray(img.convert("L" if gray else "RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:  # truncated or not an image
        if isinstance(exc, LocalDataError):
            raise
        raise LocalDataError(f"{path}: unreadable image ({exc})") from None
    return arr[:, :, None] if arr.ndim == 2 else arr  # (H, W, C)


def _gray_palette(img: object) -> bool:
    palette = img.getpalette() or []  # type: ignore[attr-defined]
    rgb = np.asarray(palette, dtype=np.int64).reshape(-1, 3) if len(palette) % 3 == 0 else np.zeros((0, 3))
    return bool(len(rgb)) and bool((rgb == rgb[:, :1]).all())


def _read_folder(root: Path) -> LocalData:
    images: list[np.ndarray] = []
    labels: list[str] = []
    sources: list[str] = []
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise LocalDataError(f"{root}: no class sub-folders (expected {root}/<class name>/*.png)")
    for folder in classes:
        # other files (notes, thumbnails DBs) are not samples; hidden ones are editors' droppings
        for file in sorted(folder.iterdir()):
            if file.is_file() and not file.name.startswith(".") and file.suffix.lower() in IMAGE_SUFFIXES:
                images.append(_read_image(file))
                labels.append(folder.name)
                sources.append(str(file))
    return LocalData(root, images, None, labels, sources)


def _read_npz(path: Path) -> LocalData:
    try:
        x, y = read_xy_npz(path)
    except DatasetError as exc:
        raise LocalDataError(str(exc)) from None
    if y.ndim != 1 or len(y) != len(x):
        raise LocalDataError(f"{path}: y must be (N,) beside x of {len(x)} samples, got shape {y.shape}")
    if y.dtype.kind not in "iuU":
        raise LocalDataError(f"{path}: y must hold class indices (integers) or class names (strings), got {y.dtype}")
    labels = [str(v) for v in y.tolist()]
    sources = [f"{path}[{i}]" for i in range(len(x))]
    if x.dtype == np.uint8 and x.ndim in (3, 4):  # images (N, H, W[, C])
        imgs = x[..., None] if x.ndim == 3 else x
        if imgs.shape[-1] not in (1, 3):
            raise LocalDataError(f"{path}: uint8 x must be (N, H, W) or (N, H, W, 1|3), got {x.shape}")
        return LocalData(path, list(imgs), None, labels, sources)
    if x.dtype.kind not in "fiu" or x.ndim < 2:
        raise LocalDataError(f"{path}: x must be uint8 images (N, H, W[, C]) or numeric (N, ...), got {x.dtype} {x.shape}")
    features = x.reshape(len(x), -1).astype(np.float32)
    bad = np.flatnonzero(~np.isfinite(features).all(axis=1))
    if len(bad):
        raise LocalDataError(f"{path}: sample {int(bad[0])} has NaN or Inf values")
    return LocalData(path, None, features, labels, sources)


def _read_csv(path: Path, label_column: str) -> LocalData:
    rows: list[list[float]] = []
    labels: list[str] = []
    sources: list[str] = []
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise LocalDataError(f"{path}: empty file (expected a header row)")
            header = [h.strip() for h in header]
            if label_column not in header:
                raise LocalDataError(f"{path}:1: no label column {label_column!r} in the header {header[:8]}")
            at = header.index(label_column)
            for row in reader:
                line = reader.line_num
                if not row or all(not c.strip() for c in row):
                    continue  # blank lines carry no sample
                if len(row) != len(header):
                    raise LocalDataError(f"{path}:{line}: {len(row)} columns, the header has {len(header)}")
                values = []
                for name, cell in zip(header, row, strict=True):
                    if name == label_column:
                        continue
                    try:
                        v = float(cell)
                    except ValueError:
                        raise LocalDataError(f"{path}:{line}: column {name!r} is not a number ({cell[:40]!r})") from None
                    if not math.isfinite(v):
                        raise LocalDataError(f"{path}:{line}: column {name!r} is {cell.strip()} (NaN/Inf)")
                    values.append(v)
                rows.append(values)
                labels.append(row[at].strip())
                sources.append(f"{path}:{line}")
    except UnicodeDecodeError as exc:
        raise LocalDataError(f"{path}: not UTF-8 text ({exc})") from None
    if len(header) < 2:
        raise LocalDataError(f"{path}:1: no feature columns beside {label_column!r}")
    return LocalData(path, None, np.asarray(rows, dtype=np.float32).reshape(len(rows), len(header) - 1), labels,
                     sources)


# ---------------------------------------------------------------- mapping to a federation

def _class_indices(data: LocalData, classes: list[str]) -> np.ndarray:
    """A label naming a class maps to its index; failing that, an integer label in range is
    taken as the index itself (npz files written from benchmark arrays)."""
    index = {c: i for i, c in enumerate(classes)}
    out = np.empty(len(data), dtype=np.int64)
    for i, (label, source) in enumerate(zip(data.labels, data.sources, strict=True)):
        k = index.get(label)
        if k is None and label.lstrip("-").isdigit() and 0 <= int(label) < len(classes):
            k = int(label)
        if k is None:
            shown = ", ".join(classes[:10]) + (", …" if len(classes) > 10 else "")
            raise LocalDataError(f"{source}: unknown class {label!r}; the federation's classes are {shown}")
        out[i] = k
    return out


def _fit_image(img: np.ndarray, c: int, h: int, w: int, source: str) -> np.ndarray:
    """uint8 (H', W', C') → uint8 (h, w, c): Pillow's bilinear resize, gray ↔ RGB."""
    from PIL import Image

    if img.shape == (h, w, c):
        return img
    pil = Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img)
    if c == 1 and img.shape[2] == 3:
        pil = pil.convert("L")
    elif c == 3 and img.shape[2] == 1:
        pil = pil.convert("RGB")
    elif c not in (1, 3):
        raise LocalDataError(f"{source}: a {c}-channel input cannot be made from an image")
    if pil.size != (w, h):
        pil = pil.resize((w, h), Image.Resampling.BILINEAR)
    arr = np.asarray(pil)
    return arr[:, :, None] if arr.ndim == 2 else arr


def to_dataset(data: LocalData, spec: InputSpec) -> ImageDataset:
    """`data` in the federation's terms: labels as class indices, samples (N, H, W, C) of the
    spec's shape, normalised by the spec's mean/std when batched."""
    c, h, w = spec.shape
    labels = _class_indices(data, spec.classes)
    if data.images is not None:
        images = np.stack([_fit_image(img, c, h, w, src) for img, src in zip(data.images, data.sources, strict=True)])
    else:
        assert data.features is not None
        if data.features.shape[1] != c * h * w:
            raise LocalDataError(f"{data.path}: {data.features.shape[1]} feature columns, but the federation's input "
                                 f"{c}×{h}×{w} needs {c * h * w}")
        images = np.ascontiguousarray(data.features.reshape(-1, c, h, w).transpose(0, 2, 3, 1))  # (N, H, W, C)
    return ImageDataset(images, labels, len(spec.classes), "local", tuple(spec.mean), tuple(spec.std))


def holdout_split(data: ImageDataset, fraction: float, seed: int) -> tuple[ImageDataset, ImageDataset | None]:
    """(train, held out): a seeded `fraction` of the samples (at least one, and one left
    to train on) set aside for evaluation; (data, None) when there are too few."""
    n_held = min(len(data) - 1, max(1, round(fraction * len(data)))) if fraction > 0 else 0
    if n_held <= 0:
        return data, None
    order = np.random.default_rng([seed, 0x5EED]).permutation(len(data))
    return data.subset(np.sort(order[n_held:])), data.subset(np.sort(order[:n_held]))
