"""Streaming FedAvg over sparse updates, and server momentum (FedAvgM).

Memory is O(model), independent of the number of clients: per coordinate the
accumulator keeps sum_i w_i x_i and sum_i w_i over the clients that *sent* it
(float64, so 1000s of folds lose nothing visible), plus the total weight.

Semantics for coordinates a client did not send (the strategy chooses, at `mean`):
  fill="zero"    : sum_w_x / total_weight   (an unsent coordinate counts as a 0 delta;
                   plain FedAvg of the densified deltas)
  fill="senders" : sum_w_x / sum_w(senders of that coordinate); 0 where nobody sent

Partial coverage (width levels, HeteroFL-style): a client that trained a slice of the model
folds with `slice=` (its delta in the slice's shapes). Its weight then counts, under
fill="zero", only in the denominators of the coordinates its slice covers: per
coordinate, mean = sum_w_x / (weight of full-model clients + weight of the slices
covering it); 0 where nobody trained it. One more O(model) array, allocated on the first
slice fold.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

import numpy as np

from sparse_kernels.codec import decode
from sparse_kernels.errors import MalformedPayload, NonFiniteValues, ShapeMismatch
from sparse_kernels.reshape import Reshape, expand_indices, kept_axes, slice_shapes
from sparse_kernels.types import ModelDelta, SparseTensor

__all__ = ["SparseAccumulator"]

Fill = Literal["senders", "zero"]


class SparseAccumulator:
    def __init__(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        self._shapes = {n: tuple(int(d) for d in s) for n, s in shapes.items()}
        sizes = [math.prod(s) for s in self._shapes.values()]
        offsets = np.cumsum([0, *sizes])
        n = int(offsets[-1])
        self._swx = np.zeros(n, dtype=np.float64)  # (numel_total,) sum of w * x
        self._sw = np.zeros(n, dtype=np.float64)  # (numel_total,) sum of w of senders
        # per-tensor flat views into the two buffers: a fold is a scatter into a view
        self._views = {
            name: (self._swx[offsets[i] : offsets[i + 1]], self._sw[offsets[i] : offsets[i + 1]])
            for i, name in enumerate(self._shapes)
        }
        self._offsets = {name: int(offsets[i]) for i, name in enumerate(self._shapes)}
        self._count = 0
        self._total_weight = 0.0
        self._full_weight = 0.0  # of the clients that trained the whole model
        self._cover: np.ndarray | None = None  # (numel_total,) weight of the slices covering it

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._shapes)

    @property
    def count(self) -> int:
        return self._count

    @property
    def total_weight(self) -> float:
        return self._total_weight

    def fold(self, delta: ModelDelta, weight: float, *, slice: Reshape | None = None) -> None:
        """Add one client's update with weight w > 0. Validates everything first, so
        a rejected update leaves the accumulator untouched. With `slice`, the client
        trained that slice of the model: its tensors have the slice's shapes."""
        shapes = self._shapes if slice is None else slice_shapes(self._shapes, slice)
        for t in delta.tensors:
            if shapes.get(t.name) != t.shape:
                raise ShapeMismatch(f"{t.name}: shape {t.shape} not in the model ({shapes.get(t.name)})")
            t.validate()
        if slice is None:
            self._fold_trusted(delta, weight)
            return
        w = float(weight)
        if not math.isfinite(w) or w <= 0:
            raise NonFiniteValues(f"weight must be finite and > 0, got {weight}")
        in_global = tuple(SparseTensor(t.name, self._shapes[t.name], expand_indices(t.indices, slice, t.name,
                                                                                     self._shapes[t.name]), t.values)
                          for t in delta.tensors)
        self._fold_trusted(ModelDelta(delta.meta, in_global), w, full=False)
        if self._cover is None:
            self._cover = np.zeros_like(self._sw)
        for name, shape in self._shapes.items():
            view = self._cover[self._offsets[name]: self._offsets[name] + math.prod(shape)].reshape(shape)
            view[np.ix_(*kept_axes(slice, name, shape))] += w

    def _fold_trusted(self, delta: ModelDelta, weight: float, *, full: bool = True) -> None:
        w = float(weight)
        if not math.isfinite(w) or w <= 0:
            raise NonFiniteValues(f"weight must be finite and > 0, got {weight}")
        if delta.tensors:
            # one scatter for the whole update, in flat model coordinates; indices are
            # unique within a tensor and tensors do not overlap, so += is a correct scatter
            off = self._offsets
            gidx = np.concatenate([t.indices + off[t.name] for t in delta.tensors])
            vals = np.concatenate([t.values for t in delta.tensors]).astype(np.float64)
            vals *= w
            self._swx[gidx] += vals
            self._sw[gidx] += w
        self._count += 1
        self._total_weight += w
        self._full_weight += w if full else 0.0

    def fold_bytes(self, data: bytes, weight: float | None = None) -> ModelDelta:
        """Decode (checked against the model's shapes) and fold; weight defaults to
        meta.num_samples. Raises a CodecError and folds nothing on a bad payload."""
        delta = decode(data, expected=self._shapes)
        w = float(delta.meta.num_samples) if weight is None else weight
        if weight is None and w <= 0:
            raise MalformedPayload("num_samples is 0: no weight for this update")
        self._fold_trusted(delta, w)
        return delta

    def mean(self, *, fill: Fill = "zero") -> dict[str, np.ndarray]:
        """Weighted mean delta per tensor, float32 (zeros if nothing was folded)."""
        if fill == "zero" and self._cover is not None:
            denominator = self._cover + self._full_weight
            flat = np.divide(self._swx, denominator, out=np.zeros_like(self._swx), where=denominator > 0)
        elif fill == "zero":
            flat = self._swx / self._total_weight if self._total_weight > 0 else np.zeros_like(self._swx)
        elif fill == "senders":
            flat = np.divide(
                self._swx, self._sw, out=np.zeros_like(self._swx), where=self._sw > 0
            )
        else:
            raise ValueError(f"fill must be 'zero' or 'senders', not {fill!r}")
        out = {}
        at = 0
        for name, shape in self._shapes.items():
            n = math.prod(shape)
            out[name] = flat[at : at + n].astype(np.float32).reshape(shape)
            at += n
        return out

    def coverage(self) -> dict[str, np.ndarray]:
        """Sum of weights of the senders, per coordinate (float32)."""
        return {
            name: self._views[name][1].astype(np.float32).reshape(shape)
            for name, shape in self._shapes.items()
        }

    def state_dict(self) -> dict[str, np.ndarray]:
        """Arrays only (np.savez-able, no pickle): shapes are those of the arrays."""
        state: dict[str, np.ndarray] = {
            "meta/count": np.array(self._count, dtype=np.int64),
            "meta/total_weight": np.array(self._total_weight, dtype=np.float64),
            "meta/full_weight": np.array(self._full_weight, dtype=np.float64),
        }
        for name, shape in self._shapes.items():
            swx, sw = self._views[name]
            state[f"sum_wx/{name}"] = swx.reshape(shape).copy()
            state[f"sum_w/{name}"] = sw.reshape(shape).copy()
            if self._cover is not None:
                at = self._offsets[name]
                state[f"cover/{name}"] = self._cover[at: at + swx.size].reshape(shape).copy()
        return state

    @classmethod
    def from_state_dict(cls, state: Mapping[str, np.ndarray]) -> SparseAccumulator:
        shapes = {
            k[len("sum_wx/") :]: tuple(np.shape(v)) for k, v in state.items() if k.startswith("sum_wx/")
        }
        acc = cls(shapes)
        for name in shapes:
            swx, sw = acc._views[name]
            a = np.asarray(state[f"sum_wx/{name}"], dtype=np.float64).reshape(-1)
            b = np.asarray(state[f"sum_w/{name}"], dtype=np.float64).reshape(-1)
            if not (np.isfinite(a).all() and np.isfinite(b).all()):
                raise NonFiniteValues(f"{name}: NaN or Inf in the stored accumulator")
            swx[:] = a
            sw[:] = b
        acc._count = int(state["meta/count"])
        acc._total_weight = float(state["meta/total_weight"])
        acc._full_weight = float(state.get("meta/full_weight", acc._total_weight))
        if any(k.startswith("cover/") for k in state):
            acc._cover = np.concatenate([np.asarray(state[f"cover/{n}"], dtype=np.float64).reshape(-1) for n in shapes])
        return acc
