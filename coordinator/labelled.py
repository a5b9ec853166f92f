"""The small labelled set a strategy trains on at the server before round 1
(`Strategy.labelled_set`: FedTiny's pre-training), loaded and checked at create so that a
bad path or a set that does not fit the model is refused there (422), never at a round.

Sources:
- an .npz the operator holds: `x` (N, C, H, W) uint8 pixels or floats in [0, 1], `y` (N,)
  integer class indices; read with `allow_pickle=False`;
- no path: the federation's own training split (`data.dataset`), a stand-in for such data
  in benchmarks and simulations.
Either way the first `per_class` samples of each class are kept, and they are normalised
as the federation's data is (its input spec's mean/std, else the dataset's statistics).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from coordinator.protocol import FederationCreate
from models import ImageDataset, load_dataset
from models.datasets import DatasetError, read_xy_npz
from strategies.base import LabelledSetRequest

__all__ = ["MAX_LABELLED_BYTES", "first_per_class", "load_labelled_set"]

# the file is read whole at create: a "tiny" set far above this is a mistake
MAX_LABELLED_BYTES = 256 * 2**20


def first_per_class(labels: np.ndarray, per_class: int) -> np.ndarray:
    """Indices (ascending) of the first `per_class` samples of each class in `labels`."""
    keep = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        keep[np.flatnonzero(labels == c)[:per_class]] = True
    return np.flatnonzero(keep)


def load_labelled_set(cfg: FederationCreate, request: LabelledSetRequest,
                      input_shape: tuple[int, int, int]) -> ImageDataset:
    """The set `request` names, fitted to the federation (`input_shape`: one sample's
    (C, H, W)). Raises ValueError saying what is wrong."""
    spec = cfg.data.input
    mean, std = (tuple(spec.mean), tuple(spec.std)) if spec is not None else (None, None)
    if request.path is None:
        if cfg.data.dataset == "none":
            raise ValueError("the strategy pre-trains on a labelled set: give its path (an .npz of x, y), "
                             "or a data.dataset to take the first samples of each class from")
        data = load_dataset(cfg.data.dataset, cfg.data.data_dir, "train", seed=cfg.seed)
        data = ImageDataset(data.images, data.labels, data.num_classes, data.name, mean, std)
    else:
        data = _read_npz(Path(request.path), cfg, mean, std)
    if data.input_shape != input_shape:
        raise ValueError(f"labelled set {request.path or cfg.data.dataset}: samples of shape {data.input_shape}, "
                         f"the model takes {input_shape}")
    out = data.subset(first_per_class(data.labels, request.per_class))
    if len(out) == 0:
        raise ValueError(f"labelled set {request.path or cfg.data.dataset} has no samples")
    return out


def _read_npz(path: Path, cfg: FederationCreate, mean: tuple[float, ...] | None,
              std: tuple[float, ...] | None) -> ImageDataset:
    if not path.is_file():
        raise ValueError(f"labelled set {path}: no such file")
    if path.stat().st_size > MAX_LABELLED_BYTES:
        raise ValueError(f"labelled set {path}: {path.stat().st_size:,} bytes, over {MAX_LABELLED_BYTES:,}")
    try:
        x, y = read_xy_npz(path)
    except DatasetError as exc:
        raise ValueError(f"labelled set {exc}") from None
    if x.ndim != 4 or y.ndim != 1 or len(x) != len(y):
        raise ValueError(f"labelled set {path}: x must be (N, C, H, W) and y (N,), got {x.shape} and {y.shape}")
    if y.dtype.kind not in "iu" or (len(y) and (y.min() < 0 or y.max() >= cfg.num_classes)):
        raise ValueError(f"labelled set {path}: y must be class indices in [0, {cfg.num_classes}), "
                         f"got {y.dtype} in [{y.min() if len(y) else '-'}, {y.max() if len(y) else '-'}]")
    if x.dtype == np.uint8:
        images = np.ascontiguousarray(x.transpose(0, 2, 3, 1))  # (N, H, W, C), as the loaders give
    elif x.dtype.kind == "f":
        images = np.ascontiguousarray(x.transpose(0, 2, 3, 1), dtype=np.float32)
        if not np.isfinite(images).all():
            raise ValueError(f"labelled set {path}: x has NaN or Inf values")
    else:
        raise ValueError(f"labelled set {path}: x must be uint8 or float, got {x.dtype}")
    # normalised like the federation's dataset (`to_tensor` by name) unless its spec says otherwise
    return ImageDataset(images, y.astype(np.int64), cfg.num_classes, cfg.data.dataset, mean, std)
