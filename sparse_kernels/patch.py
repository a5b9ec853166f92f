"""Apply a decoded delta to dense weights in place.

The coordinator and the agents both call this one function on the same decoded bytes, so
the model an agent reconstructs from a patch is bit-identical to the server's.
"""

from __future__ import annotations

from collections.abc import MutableMapping

import numpy as np

from sparse_kernels.types import ModelDelta

__all__ = ["apply_delta"]


def apply_delta(weights: MutableMapping[str, np.ndarray], delta: ModelDelta) -> None:
    """weights[name].flat[indices] += values (float32), for every tensor of `delta`."""
    for t in delta.tensors:
        w = weights.get(t.name)
        if w is None or w.shape != tuple(t.shape):
            raise KeyError(f"delta tensor {t.name} {tuple(t.shape)} does not match the weights")
        flat = w.reshape(-1)  # a view: weights are contiguous float32
        flat[t.indices] += t.values.astype(np.float32, copy=False)
