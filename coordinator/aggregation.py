"""The accepted updates of one round attempt, folded exactly once each.

`RoundUpdates` is the only place an update enters the round's mean. It is keyed by
agent: folding an agent twice is a no-op, so rebuilding it from the store after a
restart and folding a fresh upload can never count one update twice (the bug the audit
found: the round's first upload was folded by the refold *and* by the caller).

Per update, in this order (the same after a restart, since it is a function of the
stored bytes): clip the delta's L2 norm to the round's bound (statistics under `aux/`
are left alone), weigh it by min(num_samples, cap) or 1, fold it into the streaming
sample-weighted accumulator (and the squares, when the strategy wants them). Median and
trimmed mean keep the clipped deltas and reduce them at the close.

With width levels an update is a delta on its level's slice of the model: it is folded
into global coordinates and weighs only in the means of the coordinates it covers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from coordinator.protocol import AggregationSpec
from sparse_kernels import ModelDelta, SparseAccumulator, SparseTensor
from sparse_kernels.reshape import Reshape, slice_shapes
from sparse_kernels.robust import clip_delta, coordinate_median, trimmed_mean
from strategies.base import AUX_PREFIX, Weights

__all__ = ["RoundUpdates", "clip_bound", "update_weight"]


def clip_bound(spec: AggregationSpec, weights: Weights) -> float | None:
    """The L2 bound on one update for a round starting from `weights` (None: no clip)."""
    if spec.clip_norm is not None:
        return float(spec.clip_norm)
    if spec.clip_relative is None:
        return None
    norm = math.sqrt(sum(float(np.dot(v.ravel().astype(np.float64), v.ravel().astype(np.float64)))
                         for v in weights.values()))
    return float(spec.clip_relative) * max(1.0, norm)


def update_weight(spec: AggregationSpec, num_samples: int) -> float:
    """What one update weighs in the mean: a claimed sample count buys at most the cap."""
    return 1.0 if spec.weighting == "uniform" else float(min(num_samples, spec.max_num_samples))


@dataclass
class RoundUpdates:
    key: tuple[int, int]  # (round, attempt)
    shapes: dict[str, tuple[int, ...]]  # what an upload may carry: model tensors + aux
    spec: AggregationSpec
    bound: float | None
    wants_squares: bool = False
    levels: list[Reshape] = field(default_factory=list)  # the round's width levels' slices (none: whole model)
    folded: dict[str, float] = field(default_factory=dict)  # agent -> weight
    level_of: dict[str, int | None] = field(default_factory=dict)  # agent -> the level it trained
    declined: dict[str, int | None] = field(default_factory=dict)  # agent -> bytes it needs
    digests: dict[str, str] = field(default_factory=dict)  # sha256 of the body -> agent
    clipped: int = 0
    bytes_up: int = 0
    _acc: SparseAccumulator = field(init=False)
    _squares: SparseAccumulator | None = field(init=False)
    _deltas: list[ModelDelta] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        self._acc = SparseAccumulator(self.shapes)
        model_shapes = {k: v for k, v in self.shapes.items() if not k.startswith(AUX_PREFIX)}
        self._squares = SparseAccumulator(model_shapes) if self.wants_squares else None

    def shapes_for(self, level: int | None) -> dict[str, tuple[int, ...]]:
        """What an upload that trained `level` may carry (None: the whole model). Raises
        ValueError for a level the round does not have."""
        slice_ = self._slice(level)
        return self.shapes if slice_ is None else slice_shapes(self.shapes, slice_)

    def _slice(self, level: int | None) -> Reshape | None:
        """The slice an update of `level` covers (None: the whole model)."""
        if level is None:
            return None
        if not 0 <= level < max(len(self.levels), 1):
            raise ValueError(f"this round has {len(self.levels)} width levels; an update for level {level} has no place")
        return self.levels[level] if self.levels and self.levels[level] else None

    def add(self, agent_id: str, delta: ModelDelta, num_samples: int, *, digest: str, nbytes: int,
            level: int | None = None) -> bool:
        """Fold one validated update (of `level`'s slice); False (and nothing changes) if
        `agent_id` is in."""
        if agent_id in self.folded:
            return False
        slice_ = self._slice(level)  # a level the round does not have is refused before anything changes
        weight = update_weight(self.spec, num_samples)
        if self.bound is not None:
            clipped, norm = clip_delta(delta, self.bound, skip_prefix=AUX_PREFIX)
            self.clipped += clipped is not delta
            delta = clipped
        self._acc.fold(delta, weight, slice=slice_)
        if self._squares is not None:
            self._squares.fold(ModelDelta(delta.meta, tuple(
                SparseTensor(t.name, t.shape, t.indices, t.values * t.values)
                for t in delta.tensors if not t.name.startswith(AUX_PREFIX))), weight)
        if self.spec.rule != "mean":
            self._deltas.append(ModelDelta(delta.meta, tuple(
                t for t in delta.tensors if not t.name.startswith(AUX_PREFIX))))
        self.folded[agent_id] = weight
        self.level_of[agent_id] = level
        self.digests[digest] = agent_id
        self.bytes_up += nbytes
        return True

    @property
    def count(self) -> int:
        return len(self.folded)

    def reduce(self, fill: str) -> tuple[Weights, Weights, Weights | None]:
        """(mean delta per model tensor, weighted mean of each aux tensor, mean squared
        delta or None) under the spec's rule."""
        mean = self._acc.mean(fill=fill)  # type: ignore[arg-type]
        aux = {k: mean.pop(k) for k in [k for k in mean if k.startswith(AUX_PREFIX)]}
        if self.spec.rule != "mean":
            model_shapes = {k: v for k, v in self.shapes.items() if not k.startswith(AUX_PREFIX)}
            if self.spec.rule == "median":
                mean = coordinate_median(self._deltas, model_shapes, fill=fill)  # type: ignore[arg-type]
            else:
                mean = trimmed_mean(self._deltas, model_shapes, trim_ratio=self.spec.trim_ratio,
                                    fill=fill)  # type: ignore[arg-type]
        squares = self._squares.mean(fill=fill) if self._squares is not None else None  # type: ignore[arg-type]
        return mean, aux, squares
