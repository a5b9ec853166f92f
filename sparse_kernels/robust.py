"""Robust aggregation over sparse updates: norm clipping, coordinate-wise median and
trimmed mean (Yin et al. 2018, "Byzantine-robust distributed learning").

Pure functions of the decoded updates. Median and trimmed mean are unweighted (a claimed
sample count buys an attacker nothing) and need every update at once: memory is
O(clients x largest tensor), computed tensor by tensor.

Coordinates a client did not send follow the accumulator's `fill` rule:
  fill="zero"    : an unsent coordinate is a 0 delta from that client
  fill="senders" : only the clients that sent a coordinate vote on it; 0 where none did
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np

from sparse_kernels.types import ModelDelta, SparseTensor

__all__ = ["clip_delta", "coordinate_median", "delta_norm", "trimmed_mean"]

Fill = Literal["senders", "zero"]


def delta_norm(delta: ModelDelta, *, skip_prefix: str | None = None) -> float:
    """L2 norm over the values (float64, so finite float32 extremes cannot overflow)."""
    total = 0.0
    for t in delta.tensors:
        if skip_prefix and t.name.startswith(skip_prefix):
            continue
        v = t.values.astype(np.float64)
        total += float(np.dot(v, v))
    return math.sqrt(total)


def clip_delta(delta: ModelDelta, bound: float, *, skip_prefix: str | None = None) -> tuple[ModelDelta, float]:
    """Scale the delta so its L2 norm is at most `bound` (tensors named with `skip_prefix`,
    statistics rather than deltas, untouched). Returns (delta, norm before clipping)."""
    norm = delta_norm(delta, skip_prefix=skip_prefix)
    if norm <= bound:
        return delta, norm
    scale = bound / norm
    tensors = tuple(
        t if skip_prefix and t.name.startswith(skip_prefix)
        else SparseTensor(t.name, t.shape, t.indices, (t.values.astype(np.float64) * scale).astype(np.float32))
        for t in delta.tensors
    )
    return ModelDelta(delta.meta, tensors), norm


def _stack(deltas: Sequence[ModelDelta], name: str, numel: int, fill: Fill) -> np.ndarray:
    """(clients, numel) float64; unsent coordinates are 0 (fill="zero") or NaN ("senders")."""
    out = np.full((len(deltas), numel), 0.0 if fill == "zero" else np.nan, dtype=np.float64)
    for i, d in enumerate(deltas):
        for t in d.tensors:
            if t.name == name:
                out[i, t.indices] = t.values
    return out


def _robust(deltas: Sequence[ModelDelta], shapes: Mapping[str, tuple[int, ...]], fill: Fill,
            reduce: str, trim_ratio: float = 0.0) -> dict[str, np.ndarray]:
    if fill not in ("zero", "senders"):
        raise ValueError(f"fill must be 'zero' or 'senders', not {fill!r}")
    out: dict[str, np.ndarray] = {}
    for name, shape in shapes.items():
        numel = math.prod(shape)
        if not deltas:
            out[name] = np.zeros(shape, dtype=np.float32)
            continue
        x = np.sort(_stack(deltas, name, numel, fill), axis=0)  # NaN sorts last
        m = np.sum(~np.isnan(x), axis=0)  # (numel,) voters per coordinate
        if reduce == "median":
            lo, hi = (m - 1) // 2, m // 2
        else:  # trimmed mean over sorted rows [k, m - k)
            k = np.floor(trim_ratio * m).astype(np.int64)
            lo, hi = k, m - k - 1
        cols = np.arange(numel)
        voted = m > 0
        res = np.zeros(numel, dtype=np.float64)
        if reduce == "median":
            res[voted] = 0.5 * (x[lo[voted], cols[voted]] + x[hi[voted], cols[voted]])
        else:
            # prefix sums over the sorted rows give every coordinate's window sum at once
            csum = np.concatenate([np.zeros((1, numel)), np.cumsum(np.nan_to_num(x), axis=0)])
            count = hi - lo + 1
            res[voted] = (csum[hi[voted] + 1, cols[voted]] - csum[lo[voted], cols[voted]]) / count[voted]
        out[name] = res.astype(np.float32).reshape(shape)
    return out


def coordinate_median(deltas: Sequence[ModelDelta], shapes: Mapping[str, tuple[int, ...]], *,
                      fill: Fill = "zero") -> dict[str, np.ndarray]:
    """Per coordinate, the median of the clients' values (mean of the two middle ones
    for an even count), float32 per tensor."""
    return _robust(deltas, shapes, fill, "median")


def trimmed_mean(deltas: Sequence[ModelDelta], shapes: Mapping[str, tuple[int, ...]], *,
                 trim_ratio: float, fill: Fill = "zero") -> dict[str, np.ndarray]:
    """Per coordinate, the mean after dropping floor(trim_ratio·m) of the m values at
    each end."""
    if not 0.0 <= trim_ratio < 0.5:
        raise ValueError(f"trim_ratio must be in [0, 0.5), got {trim_ratio}")
    return _robust(deltas, shapes, fill, "trimmed", trim_ratio)
