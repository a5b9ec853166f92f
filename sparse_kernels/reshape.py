"""Structure changes as data: which channels of each tensor survive a structured prune.

`Reshape` maps a tensor name to one entry per dimension: the sorted kept indices along
that dimension, or None where the dimension is unchanged. An agent that holds version v
gets version v+1 of a pruned model as `apply_reshape(old, reshape)` plus an ordinary
sparse patch, instead of downloading the whole smaller model. JSON on the wire, checked
like every other network input.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np

from sparse_kernels.errors import MalformedPayload

__all__ = [
    "Reshape",
    "apply_reshape",
    "decode_reshape",
    "encode_reshape",
    "expand_indices",
    "from_runs",
    "kept_axes",
    "scatter_slice",
    "slice_shapes",
    "to_runs",
]

Reshape = dict[str, list[list[int] | None]]
_MAX_BYTES = 16 << 20


def apply_reshape(weights: Mapping[str, np.ndarray], reshape: Reshape) -> dict[str, np.ndarray]:
    """Slice every tensor named in `reshape` to its kept indices; copy the others."""
    out = {}
    for name, w in weights.items():
        dims = reshape.get(name)
        if dims is None:
            out[name] = w.copy()
            continue
        index = tuple(slice(None) if keep is None else np.asarray(keep, dtype=np.int64) for keep in dims)
        out[name] = np.ascontiguousarray(w[np.ix_(*[np.arange(n) if isinstance(i, slice) else i
                                                      for i, n in zip(index, w.shape, strict=True)])])
    return out


def encode_reshape(reshape: Reshape) -> bytes:
    return json.dumps({"fedslim_reshape": 1, "tensors": reshape}, separators=(",", ":")).encode()


def decode_reshape(data: bytes, shapes: Mapping[str, tuple[int, ...]]) -> Reshape:
    """Parse and validate against the shapes of the weights it will slice."""
    if len(data) > _MAX_BYTES:
        raise MalformedPayload(f"reshape of {len(data)} bytes exceeds {_MAX_BYTES}")
    try:
        doc = json.loads(data)
        tensors = doc["tensors"] if doc.get("fedslim_reshape") == 1 else None
    except (ValueError, TypeError, KeyError, AttributeError):
        raise MalformedPayload("reshape is not the expected JSON document") from None
    if not isinstance(tensors, dict):
        raise MalformedPayload("reshape lacks its tensors")
    for name, dims in tensors.items():
        if name not in shapes:
            raise MalformedPayload(f"reshape names unknown tensor {name!r}")
        if not isinstance(dims, list) or len(dims) != len(shapes[name]):
            raise MalformedPayload(f"{name}: reshape needs one entry per dimension of {shapes[name]}")
        for keep, size in zip(dims, shapes[name], strict=True):
            if keep is None:
                continue
            if not isinstance(keep, list) or not keep or not all(isinstance(i, int) for i in keep):
                raise MalformedPayload(f"{name}: kept indices must be a non-empty list of ints")
            arr = np.asarray(keep)
            if arr[0] < 0 or arr[-1] >= size or (arr.size > 1 and not np.all(arr[1:] > arr[:-1])):
                raise MalformedPayload(f"{name}: kept indices out of range or not increasing")
    return tensors


# ------------------------------------------------------------------ slices of a model
# A width level's sub-model is a `Reshape` of the global model: every tensor keeps the
# listed indices along each dimension. An agent trains the slice and uploads its delta in
# the slice's shapes; the coordinator maps it back with `expand_delta` and counts, per
# coordinate, only the agents whose slice covers it (`SparseAccumulator.fold(coverage=)`).


def slice_shapes(shapes: Mapping[str, tuple[int, ...]], reshape: Reshape) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor after `apply_reshape`."""
    out = {}
    for name, shape in shapes.items():
        dims = reshape.get(name)
        out[name] = tuple(shape) if dims is None else tuple(
            n if keep is None else len(keep) for keep, n in zip(dims, shape, strict=True))
    return out


def kept_axes(reshape: Reshape, name: str, shape: tuple[int, ...]) -> list[np.ndarray]:
    """Per dimension of tensor `name`, the global indices its slice keeps."""
    dims = reshape.get(name) or [None] * len(shape)
    return [np.arange(n, dtype=np.int64) if keep is None else np.asarray(keep, dtype=np.int64)
            for keep, n in zip(dims, shape, strict=True)]


def expand_indices(indices: np.ndarray, reshape: Reshape, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Flat indices into the slice of tensor `name` → flat indices into the global tensor
    of `shape`."""
    if name not in reshape:
        return indices
    axes = kept_axes(reshape, name, shape)
    local = np.unravel_index(indices.astype(np.int64), tuple(a.size for a in axes))
    return np.ravel_multi_index(tuple(a[c] for a, c in zip(axes, local, strict=True)), shape).astype(np.int64)


def scatter_slice(target: dict[str, np.ndarray], local: Mapping[str, np.ndarray], reshape: Reshape) -> None:
    """target[name][slice] = local[name] in place: a slice's values written back into
    global-shaped arrays (an agent's error-feedback residual follows its level this way)."""
    for name, values in local.items():
        full = target[name]
        full[np.ix_(*kept_axes(reshape, name, full.shape))] = values


def to_runs(keep: list[int]) -> list[list[int]]:
    """Sorted indices as [start, stop) runs: a first-k slice is one run, a rolling window two."""
    runs: list[list[int]] = []
    for i in keep:
        if runs and runs[-1][1] == i:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return runs


def from_runs(runs: list[list[int]], size: int) -> list[int]:
    """The indices of `to_runs`' runs, checked: increasing, disjoint, within [0, size)."""
    out: list[int] = []
    last = 0
    for run in runs:
        if not (isinstance(run, list) and len(run) == 2 and all(isinstance(v, int) for v in run)):
            raise MalformedPayload("a run is two ints [start, stop)")
        start, stop = run
        if start < last or stop <= start or stop > size:
            raise MalformedPayload(f"run {run} out of order or outside [0, {size})")
        out.extend(range(start, stop))
        last = stop
    if not out:
        raise MalformedPayload("a kept dimension needs at least one index")
    return out
