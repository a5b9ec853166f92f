"""Model checkpoints as plain `.npz`: state_dict tensors as float32 arrays plus metadata.

Layout (np.savez, no pickle anywhere):
    "<state_dict key>"  float32 array of the tensor's shape (integer buffers such as BN's
                        num_batches_tracked are stored as float32 and cast back on load)
    "__meta__"          1-element unicode array holding a JSON object:
                        {"model", "in_channels", "num_classes", "image_size", "dataset", ...}

Pruned models load because the shapes in the file drive `models.structure.reshape_to`.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.structure import StructureError, reshape_to
from models.zoo import build_model

__all__ = ["META_KEY", "CheckpointError", "load_checkpoint", "save_checkpoint"]

META_KEY = "__meta__"
_REQUIRED = ("model", "in_channels", "num_classes")


class CheckpointError(ValueError):
    """A checkpoint is missing, malformed or does not fit its model; names the file."""


def save_checkpoint(path: str | Path, model: nn.Module, meta: Mapping[str, Any]) -> Path:
    """Write `model.state_dict()` and `meta` to `path` (atomically); returns the path."""
    missing = [k for k in _REQUIRED if k not in meta]
    if missing:
        raise CheckpointError(f"{path}: meta lacks {missing}")
    arrays = {k: v.detach().cpu().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    if META_KEY in arrays:
        raise CheckpointError(f"{path}: state_dict key {META_KEY!r} is reserved")
    arrays[META_KEY] = np.array([json.dumps(dict(meta), sort_keys=True)])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a name
            np.savez(f, **arrays)  # type: ignore[arg-type]
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path, *, model_name: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the (possibly pruned) model of a checkpoint; `model_name` overrides meta."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint") from None
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"{path}: not an .npz checkpoint ({exc})") from exc
    meta = _read_meta(path, arrays.pop(META_KEY, None))
    if model_name is not None:
        meta["model"] = model_name
    try:
        model = build_model(
            str(meta["model"]), in_channels=int(meta["in_channels"]),
            num_classes=int(meta["num_classes"]), image_size=meta.get("image_size"),
        )
        reshape_to(model, {k: v.shape for k, v in arrays.items()})
    except (ValueError, StructureError) as exc:
        raise CheckpointError(f"{path}: does not fit model {meta['model']!r}: {exc}") from exc
    reference = model.state_dict()
    state = {k: torch.from_numpy(v).to(reference[k].dtype) for k, v in arrays.items()}
    model.load_state_dict(state)
    return model, meta


def _read_meta(path: Path, raw: np.ndarray | None) -> dict[str, Any]:
    if raw is None or raw.size != 1 or raw.dtype.kind != "U":
        raise CheckpointError(f"{path}: no {META_KEY} JSON string")
    try:
        meta = json.loads(str(raw.reshape(-1)[0]))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: {META_KEY} is not JSON: {exc}") from exc
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: {META_KEY} must be a JSON object")
    missing = [k for k in _REQUIRED if k not in meta]
    if missing:
        raise CheckpointError(f"{path}: {META_KEY} lacks {missing}")
    return meta
