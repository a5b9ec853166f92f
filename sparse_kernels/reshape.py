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

__all__ = ["Reshape", "apply_reshape", "decode_reshape", "encode_reshape"]

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
