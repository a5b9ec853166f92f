"""Top-k selection and the error-feedback residual (DGC / STC style).

The agent adds last round's residual to its delta, keeps the k largest magnitudes and
carries the rest, *including the quantisation error of what it sent*, to the next
round: over rounds, sum(sent) + residual == sum(deltas) on the allowed support.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

import numpy as np

from sparse_kernels._values import quantize_values
from sparse_kernels.errors import NonFiniteValues
from sparse_kernels.types import DeltaMeta, ModelDelta, SparseTensor

__all__ = ["SMALL_TENSOR", "ErrorFeedback", "energy_density", "select_topk", "topk_mask", "warmup_density"]

# Tensors up to this size (biases, BN vectors) travel whole both ways: top-k on them saves
# a few bytes and starves the layers that need every coordinate.
SMALL_TENSOR = 1024

Scope = Literal["per_tensor", "global"]


def warmup_density(target: float, rnd: int, warmup_rounds: int) -> float:
    """Density of round `rnd` (1-based) under DGC's warm-up: geometric from 1 towards
    `target` over the first `warmup_rounds` rounds (target^(rnd/(W+1))), `target` after.
    DGC raises sparsity exponentially over its first epochs (75 %, 93.75 %, ...) because
    early updates are large and the residual would otherwise carry most of them."""
    if not 0 < target <= 1:
        raise ValueError(f"target density must be in (0, 1], got {target}")
    if warmup_rounds <= 0 or rnd > warmup_rounds or target >= 1:
        return target
    return float(target ** (max(rnd, 1) / (warmup_rounds + 1)))


def energy_density(
    dense: Mapping[str, np.ndarray],
    energy: float,
    *,
    cap: float = 1.0,
    support: Mapping[str, np.ndarray] | None = None,
    min_dense_numel: int = 0,
) -> float:
    """Adaptive density: the share of the ranked coordinates (tensors above
    `min_dense_numel`, zero off `support`, as `select_topk` ranks them) whose largest
    magnitudes carry `energy` of their squared L2 norm, at most `cap`. A round whose change
    is concentrated in few coordinates sends few; a diffuse one sends up to `cap`. Global
    top-k at this density carries at least `energy` (up to the cap); per-tensor top-k at
    it is the same count spread by tensor size. All-zero input: the smallest density that
    still sends one coordinate."""
    if not 0 < energy <= 1:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    if not 0 < cap <= 1:
        raise ValueError(f"cap must be in (0, 1], got {cap}")
    parts = []
    for name, arr in dense.items():
        a = np.asarray(arr, dtype=np.float32).reshape(-1)
        if a.size <= min_dense_numel:
            continue
        if support is not None and name in support:
            a = np.where(np.asarray(support[name]).reshape(-1).astype(bool), a, np.float32(0))
        parts.append(a)
    squares = np.square(np.concatenate(parts), dtype=np.float64) if parts else np.zeros(0)
    if squares.size == 0:
        return cap
    total = float(squares.sum())
    if not math.isfinite(total):
        raise NonFiniteValues("NaN or Inf in the delta")
    k_cap = _k_for(cap, squares.size)
    if total == 0.0:
        return min(cap, 1 / squares.size)
    # only the cap's top entries can be sent: sort those, find where they reach the share
    top = np.sort(np.partition(squares, squares.size - k_cap)[squares.size - k_cap :])[::-1]
    reached = np.searchsorted(np.cumsum(top), energy * total * (1 - 1e-12))  # 1e-12: round-off at energy 1
    return min(cap, (min(int(reached), k_cap - 1) + 1) / squares.size)


def topk_mask(arr: np.ndarray, k: int) -> np.ndarray:
    """Flat indices (int64, ascending) of the k largest |x|; ties broken arbitrarily."""
    a = np.abs(np.asarray(arr).reshape(-1))
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    if k >= a.size:
        return np.arange(a.size, dtype=np.int64)
    part = np.argpartition(a, a.size - k)[a.size - k :]
    part.sort()
    return part.astype(np.int64, copy=False)


def _k_for(density: float, numel: int) -> int:
    # at least one entry per non-empty tensor, so no tensor is starved forever
    return min(numel, max(1, math.ceil(density * numel - 1e-9))) if numel and density > 0 else 0


def select_topk(
    dense: Mapping[str, np.ndarray],
    *,
    density: float,
    scope: Scope = "per_tensor",
    support: Mapping[str, np.ndarray] | None = None,
    min_dense_numel: int = 0,
) -> dict[str, SparseTensor]:
    """Keep ~density * numel largest-magnitude entries of each tensor ("per_tensor") or
    of the model as a whole ("global"). `support` (bool masks) restricts which entries
    may be sent; tensors with numel <= min_dense_numel are sent whole (on their
    support). Exact zeros are never sent. Every input name appears in the result."""
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density}")
    if scope not in ("per_tensor", "global"):
        raise ValueError(f"scope must be 'per_tensor' or 'global', not {scope!r}")
    flats: dict[str, np.ndarray] = {}  # name -> (numel,) float32 |x|-rankable, 0 off support
    shapes: dict[str, tuple[int, ...]] = {}
    for name, arr in dense.items():
        a = np.asarray(arr, dtype=np.float32)
        if not bool(np.isfinite(a).all()):
            raise NonFiniteValues(f"{name}: NaN or Inf in the delta")
        flat = a.reshape(-1)
        if support is not None and name in support:
            m = np.asarray(support[name])
            if m.shape != a.shape:
                raise ValueError(f"{name}: support mask shape {m.shape} != {a.shape}")
            flat = np.where(m.reshape(-1).astype(bool), flat, np.float32(0))
        flats[name] = flat
        shapes[name] = a.shape
    chosen: dict[str, np.ndarray] = {}
    ranked = [n for n, f in flats.items() if f.size > min_dense_numel]
    for n, f in flats.items():
        if f.size <= min_dense_numel:
            chosen[n] = np.arange(f.size, dtype=np.int64)
    if scope == "per_tensor":
        for n in ranked:
            chosen[n] = topk_mask(flats[n], _k_for(density, flats[n].size))
    elif ranked:
        allv = np.concatenate([flats[n] for n in ranked])
        top = topk_mask(allv, _k_for(density, allv.size))
        bounds = np.cumsum([0] + [flats[n].size for n in ranked])
        cuts = np.searchsorted(top, bounds)
        for i, n in enumerate(ranked):
            chosen[n] = top[cuts[i] : cuts[i + 1]] - bounds[i]
    out = {}
    for n, f in flats.items():
        idx = chosen[n]
        vals = f[idx]
        nz = vals != 0
        if not nz.all():
            idx, vals = idx[nz], vals[nz]
        out[n] = SparseTensor(n, shapes[n], idx, vals)
    return out


class ErrorFeedback:
    """Residual accumulator kept by an agent across rounds (persist with state_dict)."""

    def __init__(self) -> None:
        self._residual: dict[str, np.ndarray] = {}

    def compress(
        self,
        delta: Mapping[str, np.ndarray],
        *,
        density: float,
        meta: DeltaMeta,
        values: str = "fp16",
        scope: Scope = "per_tensor",
        support: Mapping[str, np.ndarray] | None = None,
        min_dense_numel: int = 0,
        energy: float | None = None,
    ) -> ModelDelta:
        """delta + residual -> top-k -> quantised exactly as `encode(values=...)` will
        decode it; the new residual is accumulated - sent (zero off the support, where
        the pruned weights make any delta meaningless). Encode the result with the
        same `values` mode. With `energy`, the density is adaptive: the fewest
        coordinates of delta + residual that carry that share of its squared norm,
        `density` at most (`energy_density`)."""
        acc: dict[str, np.ndarray] = {}
        for name, d in delta.items():
            a = np.asarray(d, dtype=np.float32)
            r = self._residual.get(name)
            if r is not None and r.shape == a.shape:
                a = a + r
            acc[name] = a
        if energy is not None:
            density = energy_density(acc, energy, cap=density, support=support, min_dense_numel=min_dense_numel)
        picked = select_topk(
            acc, density=density, scope=scope, support=support, min_dense_numel=min_dense_numel
        )
        tensors = []
        residual: dict[str, np.ndarray] = {}
        for name, a in acc.items():
            t = picked[name]
            q = quantize_values(t.values, values)
            res = a.reshape(-1).copy()
            if support is not None and name in support:
                res[~np.asarray(support[name]).reshape(-1).astype(bool)] = 0
            res[t.indices] -= q
            residual[name] = res.reshape(a.shape)
            tensors.append(SparseTensor(name, t.shape, t.indices, q))
        self._residual = residual
        return ModelDelta(meta, tuple(tensors))

    @property
    def residual(self) -> dict[str, np.ndarray]:
        return dict(self._residual)

    def state_dict(self) -> dict[str, np.ndarray]:
        return {name: r.copy() for name, r in self._residual.items()}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        for name, r in state.items():
            if not bool(np.isfinite(np.asarray(r)).all()):
                raise NonFiniteValues(f"{name}: NaN or Inf in the stored residual")
        self._residual = {n: np.asarray(r, dtype=np.float32).copy() for n, r in state.items()}
