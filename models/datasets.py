"""Image datasets as uint8 arrays: Fashion-MNIST (IDX), CIFAR-10 (python batches), synthetic.

Every reader checks what it reads and raises `DatasetError` naming the file and what was
wrong (missing, bad magic number, truncated, wrong count). Images are kept as uint8
(N, H, W, C) to keep agents small; `models.transforms` turns batches into float tensors.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "DEFAULT_FASHION_MNIST_DIR",
    "DatasetError",
    "ImageDataset",
    "load_cifar10",
    "load_dataset",
    "load_fashion_mnist",
    "make_synthetic",
    "make_synthetic_windows",
    "read_idx",
    "read_xy_npz",
    "write_cifar_batch",
    "write_idx",
]

DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"),
               0x0E: np.dtype(">f8")}


class DatasetError(ValueError):
    """A data file is missing or malformed; the message names the file."""


@dataclass(frozen=True)
class ImageDataset:
    images: np.ndarray  # uint8 (N, H, W, C); float32 for numeric features (CSV, sensor windows)
    labels: np.ndarray  # int64 (N,)
    num_classes: int
    name: str
    # per-channel normalisation when it is not the named dataset's (a federation's input spec)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or len(self.images) != len(self.labels):
            raise DatasetError(f"{self.name}: images {self.images.shape} and labels {self.labels.shape} disagree")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one sample, as models and counters take it."""
        _, h, w, c = self.images.shape
        return (c, h, w)

    def subset(self, indices: np.ndarray) -> ImageDataset:
        return ImageDataset(self.images[indices], self.labels[indices], self.num_classes, self.name, self.mean, self.std)


# ---------------------------------------------------------------- IDX (MNIST family)

def _open_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError; a damaged body is zlib.error
            raise DatasetError(f"{path}: corrupt gzip stream ({exc})") from None
    return raw


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (raw or .gz). Magic: 0x00 0x00 <dtype> <ndim>, then big-endian dims."""
    path = Path(path)
    raw = _open_bytes(path)
    if len(raw) < 4:
        raise DatasetError(f"{path}: truncated header ({len(raw)} bytes)")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code not in _IDX_DTYPES or ndim == 0:
        raise DatasetError(f"{path}: bad magic number 0x{raw[:4].hex()} (expected 0x0000 <dtype> <ndim>)")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"{path}: truncated header ({len(raw)} of {header} bytes)")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[dtype_code])  # type: ignore[call-overload]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    body = len(raw) - header
    if body < expected:
        raise DatasetError(f"{path}: truncated data ({body} of {expected} bytes for shape {dims})")
    if body > expected:
        raise DatasetError(f"{path}: {body - expected} unexpected trailing bytes after shape {dims}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write `array` as IDX (gzip when the name ends in .gz); the inverse of `read_idx`."""
    path = Path(path)
    codes = [k for k, v in _IDX_DTYPES.items() if np.dtype(v).newbyteorder("=") == array.dtype.newbyteorder("=")]  # type: ignore[call-overload]
    if not codes:
        raise ValueError(f"IDX cannot store dtype {array.dtype}")
    big = array.astype(array.dtype.newbyteorder(">"))
    data = struct.pack(">HBB", 0, codes[0], array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + big.tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def _find(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    raise DatasetError(f"{root / stem}(.gz): file not found "
                       "(install the Debian package dataset-fashion-mnist or pass the data directory)")


def load_fashion_mnist(root: str | Path | None = None, split: str = "train") -> ImageDataset:
    """Fashion-MNIST from IDX files; `root` defaults to $FEDSLIM_FASHION_MNIST_DIR or the
    Debian package's directory."""
    root = Path(root or os.environ.get("FEDSLIM_FASHION_MNIST_DIR", DEFAULT_FASHION_MNIST_DIR))
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    image_path, label_path = _find(root, f"{prefix}-images-idx3-ubyte"), _find(root, f"{prefix}-labels-idx1-ubyte")
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DatasetError(f"{image_path}: expected uint8 images of rank 3, got {images.dtype} {images.shape}")
    if labels.ndim != 1:
        raise DatasetError(f"{label_path}: expected rank-1 labels, got shape {labels.shape}")
    if len(images) != len(labels):
        raise DatasetError(f"{label_path}: wrong count: {len(labels)} labels for {len(images)} images in {image_path.name}")
    if labels.size and labels.max() > 9:
        raise DatasetError(f"{label_path}: label {int(labels.max())} out of range 0..9")
    return ImageDataset(images[..., None], labels.astype(np.int64), 10, "fashion_mnist")


# ---------------------------------------------------------------- .npz of x, y

def read_xy_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Arrays `x` and `y` of an .npz file (a device's data, a server's labelled set),
    never unpickling: object arrays are refused. Raises DatasetError naming the file."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if "x" not in z.files or "y" not in z.files:
                raise DatasetError(f"{path}: needs arrays 'x' and 'y', has {sorted(z.files)}")
            return z["x"], z["y"]
    except (OSError, ValueError) as exc:  # not a zip, or object arrays (pickle refused)
        if isinstance(exc, DatasetError):
            raise
        raise DatasetError(f"{path}: unreadable .npz ({exc})") from None


# ---------------------------------------------------------------- CIFAR-10 python batches

class _BatchUnpickler(pickle.Unpickler):
    """CIFAR batches are pickles; allow only the numpy reconstruction they need, so a
    crafted file cannot run code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        # Protocol-2 pickles written by Python 3 (as `write_cifar_batch` does) spell bytes
        # as _codecs.encode(str, "latin1"); it only encodes text.
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    try:
        batch = _BatchUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except Exception as exc:  # any unpickling failure is a malformed file
        raise DatasetError(f"{path}: not a CIFAR python batch ({exc})") from None
    if not isinstance(batch, dict):
        raise DatasetError(f"{path}: expected a dict, got {type(batch).__name__}")
    data, labels = batch.get(b"data"), batch.get(b"labels")
    if data is None or labels is None:
        raise DatasetError(f"{path}: missing b'data' or b'labels' key")
    data = np.asarray(data)
    if data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8:
        raise DatasetError(f"{path}: data must be uint8 (N, 3072), got {data.dtype} {data.shape}")
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) != len(data):
        raise DatasetError(f"{path}: wrong count: {len(labels)} labels for {len(data)} images")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DatasetError(f"{path}: labels out of range 0..9")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def load_cifar10(root: str | Path, split: str = "train") -> ImageDataset:
    """CIFAR-10 from the python-batch directory (`cifar-10-batches-py`)."""
    root = Path(root)
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    parts = [_read_cifar_batch(root / n) for n in names]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return ImageDataset(np.ascontiguousarray(images), labels, 10, "cifar10")


def write_cifar_batch(path: str | Path, images: np.ndarray, labels: np.ndarray) -> None:
    """Write (N, 32, 32, 3) uint8 images in the CIFAR python-batch format (for tests)."""
    data = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    batch = {b"data": np.ascontiguousarray(data, dtype=np.uint8), b"labels": [int(v) for v in labels]}
    Path(path).write_bytes(pickle.dumps(batch, protocol=2))


# ---------------------------------------------------------------- synthetic

def make_synthetic(
    n: int, *, image_size: int = 28, channels: int = 1, num_classes: int = 10, seed: int = 0,
    split: str = "train", noise: float = 40.0,
) -> ImageDataset:
    """Learnable random images: each class is a fixed random template (from `seed`) plus
    noise; `split` draws different samples of the same classes."""
    templates = np.random.default_rng(seed).uniform(0, 255, size=(num_classes, image_size, image_size, channels))
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    labels = rng.integers(0, num_classes, size=n)
    images = templates[labels] + rng.normal(0, noise, size=(n, image_size, image_size, channels))
    return ImageDataset(np.clip(images, 0, 255).astype(np.uint8), labels.astype(np.int64), num_classes, "synthetic")


def make_synthetic_windows(
    n: int, *, side: int = 28, channels: int = 3, num_classes: int = 6, seed: int = 0, split: str = "train",
    noise: float = 0.3,
) -> ImageDataset:
    """Learnable sensor windows (an accelerometer's axes, say): class k is a sum of two
    sines per channel at class-specific frequencies (from `seed`), at a random phase per
    window (so only a time-shift-invariant model learns it), plus noise; L = side² samples
    per channel, quantised to uint8 and laid out row-major as an (N, side, side, C)
    'image' so that windows ride the federation's (C, H, W) input path (`models.sensor`)."""
    length = side * side
    freqs = np.random.default_rng(seed).uniform(2, 40, size=(num_classes, channels, 2))  # cycles per window
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    labels = rng.integers(0, num_classes, size=n)
    t = np.arange(length) / length  # (L,)
    phase = rng.uniform(0, 2 * np.pi, size=(n, 1, 1, 1))
    waves = np.sin(2 * np.pi * freqs[labels][..., None] * t + phase).sum(axis=2)  # (N, C, L)
    waves += rng.normal(0, noise, size=waves.shape)
    scaled = np.clip((waves + 3) / 6 * 255, 0, 255).astype(np.uint8)  # [-3, 3] → [0, 255]
    images = scaled.reshape(n, channels, side, side).transpose(0, 2, 3, 1)  # (N, side, side, C)
    return ImageDataset(np.ascontiguousarray(images), labels.astype(np.int64), num_classes, "synthetic_windows")


def load_dataset(name: str, root: str | Path | None = None, split: str = "train", *, seed: int = 0) -> ImageDataset:
    """Dispatch by dataset name: fashion_mnist | cifar10 | synthetic (2,000 train / 500 test)."""
    if name == "fashion_mnist":
        return load_fashion_mnist(root, split)
    if name == "cifar10":
        if root is None:
            raise ValueError("cifar10 needs a data directory (cifar-10-batches-py)")
        return load_cifar10(root, split)
    if name == "synthetic":
        return make_synthetic(2000 if split == "train" else 500, seed=seed, split=split)
    raise ValueError(f"unknown dataset {name!r}; valid: fashion_mnist, cifar10, synthetic")
