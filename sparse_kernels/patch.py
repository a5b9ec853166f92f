"""Apply a decoded delta to dense weights in place.

The coordinator and the agents both call this one function on the same decoded bytes, so
the model an agent reconstructs from a patch is bit-identical to the server's.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import Literal

import numpy as np

from sparse_kernels.codec import encode
from sparse_kernels.types import DeltaMeta, ModelDelta, Weights

__all__ = ["apply_delta", "encode_model", "model_values", "round_for_broadcast"]


def apply_delta(weights: MutableMapping[str, np.ndarray], delta: ModelDelta) -> None:
    """weights[name].flat[indices] += values (float32), for every tensor of `delta`."""
    for t in delta.tensors:
        w = weights.get(t.name)
        if w is None or w.shape != tuple(t.shape):
            raise KeyError(f"delta tensor {t.name} {tuple(t.shape)} does not match the weights")
        flat = w.reshape(-1)  # a view: weights are contiguous float32
        flat[t.indices] += t.values.astype(np.float32, copy=False)


def model_values(weights: Mapping[str, np.ndarray]) -> Literal["fp32", "fp16"]:
    """fp16 on the wire when every weight is exactly representable in it (lossless)."""
    with np.errstate(over="ignore"):  # beyond fp16's range simply means "not exact"
        exact = all(np.array_equal(v.astype(np.float16).astype(np.float32), v) for v in weights.values())
    return "fp16" if exact else "fp32"


def encode_model(federation_id: str, version: int, weights: Mapping[str, np.ndarray]) -> bytes:
    """The canonical bytes of a full model: the coordinator stores and serves these, and
    an agent that rebuilt the same weights locally gets the same sha256."""
    meta = DeltaMeta(federation_id=federation_id, round=version, base_version=version, num_samples=0, kind="model")
    return encode(ModelDelta.from_dense(weights, meta), values=model_values(weights))


def round_for_broadcast(weights: Mapping[str, np.ndarray], values: str) -> Weights:
    """A full model as lossy federations broadcast it: through fp16 and back unless
    `values` is "fp32". The coordinator rounds what it stores and an agent that rebuilds
    the initial model locally rounds the same way, so both get bit-identical weights."""
    if values == "fp32":
        return dict(weights)
    return {k: v.astype(np.float16).astype(np.float32) for k, v in weights.items()}
