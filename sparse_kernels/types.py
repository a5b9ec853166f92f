"""Core nouns: a sparse tensor, the metadata of an update, a model delta.

Indices are flat C-order positions into the tensor (int64, strictly increasing);
values are float32 with the same length. Construction checks dtypes and lengths
(cheap); `SparseTensor.validate()` also checks range and order (O(nnz)), which the
codec and the accumulator do before trusting a tensor they did not build.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sparse_kernels.errors import MalformedIndices, NonFiniteValues

__all__ = ["KINDS", "MAX_MODEL_BYTES", "DeltaMeta", "ModelDelta", "SparseTensor", "Weights"]

# Dense weights or any named arrays, keyed by state_dict name: the one declaration of the
# alias every layer uses (models, strategies, coordinator, edge_agent).
Weights = dict[str, np.ndarray]

# Decode limit for full models that a process trusts (the coordinator's own blobs, a
# model downloaded from the coordinator it enrolled with): 16 GiB.
MAX_MODEL_BYTES = 1 << 34

# "delta": local - base (an upload, or a download of what changed since a version);
# "model": full weights (every entry, the coordinator's download);
# "grad": gradient tops and other non-delta payloads (FedTiny and the like).
KINDS: tuple[str, ...] = ("delta", "model", "grad")


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


@dataclass(frozen=True, eq=False)
class SparseTensor:
    name: str
    shape: tuple[int, ...]
    indices: np.ndarray  # (nnz,) int64, flat C-order, strictly increasing
    values: np.ndarray  # (nnz,) float32

    def __post_init__(self) -> None:
        shape = tuple(int(d) for d in self.shape)
        if any(d < 0 for d in shape):
            raise ValueError(f"{self.name}: negative dimension in shape {shape}")
        idx = np.asarray(self.indices, dtype=np.int64).reshape(-1)
        val = np.asarray(self.values, dtype=np.float32).reshape(-1)
        if idx.shape != val.shape:
            raise ValueError(
                f"{self.name}: {idx.size} indices but {val.size} values"
            )
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "indices", idx)
        object.__setattr__(self, "values", val)

    @classmethod
    def _trusted(
        cls, name: str, shape: tuple[int, ...], indices: np.ndarray, values: np.ndarray
    ) -> SparseTensor:
        """Skip the coercions: for the decoder, whose arrays are already checked."""
        t = object.__new__(cls)
        object.__setattr__(t, "name", name)
        object.__setattr__(t, "shape", shape)
        object.__setattr__(t, "indices", indices)
        object.__setattr__(t, "values", values)
        return t

    @property
    def nnz(self) -> int:
        return int(self.indices.size)

    @property
    def numel(self) -> int:
        return _numel(self.shape)

    @property
    def density(self) -> float:
        n = self.numel
        return self.nnz / n if n else 0.0

    def validate(self) -> None:
        """Raise MalformedIndices / NonFiniteValues unless the tensor is well formed."""
        idx = self.indices
        if idx.size:
            if idx[0] < 0 or idx[-1] >= self.numel:
                raise MalformedIndices(
                    f"{self.name}: indices outside [0, {self.numel})"
                )
            if idx.size > 1 and not bool(np.all(idx[1:] > idx[:-1])):
                raise MalformedIndices(f"{self.name}: indices not strictly increasing")
        if not bool(np.isfinite(self.values).all()):
            raise NonFiniteValues(f"{self.name}: NaN or Inf in values")

    def to_dense(self) -> np.ndarray:
        out = np.zeros(self.numel, dtype=np.float32)
        out[self.indices] = self.values
        return out.reshape(self.shape)

    @classmethod
    def from_dense(cls, name: str, arr: Any) -> SparseTensor:
        """Every entry, zeros included (a full model, or a dense tensor sent whole)."""
        a = np.asarray(arr, dtype=np.float32)
        return cls(name, a.shape, np.arange(a.size, dtype=np.int64), a.reshape(-1).copy())

    @classmethod
    def from_dense_nonzero(cls, name: str, arr: Any) -> SparseTensor:
        a = np.asarray(arr, dtype=np.float32)
        flat = a.reshape(-1)
        idx = np.flatnonzero(flat).astype(np.int64, copy=False)
        return cls(name, a.shape, idx, flat[idx])


@dataclass(frozen=True)
class DeltaMeta:
    federation_id: str = ""
    round: int = 0
    base_version: int = 0
    num_samples: int = 0
    kind: str = "delta"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, not {self.kind!r}")


@dataclass(frozen=True, eq=False)
class ModelDelta:
    meta: DeltaMeta
    tensors: tuple[SparseTensor, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        tensors = tuple(self.tensors)
        names = [t.name for t in tensors]
        if len(set(names)) != len(names):
            raise ValueError("duplicate tensor names in ModelDelta")
        object.__setattr__(self, "tensors", tensors)

    @property
    def nnz(self) -> int:
        return sum(t.nnz for t in self.tensors)

    @property
    def numel(self) -> int:
        return sum(t.numel for t in self.tensors)

    def by_name(self) -> dict[str, SparseTensor]:
        return {t.name: t for t in self.tensors}

    def to_dense(self) -> dict[str, np.ndarray]:
        return {t.name: t.to_dense() for t in self.tensors}

    @classmethod
    def from_sparse(
        cls, tensors: Mapping[str, SparseTensor], meta: DeltaMeta | None = None
    ) -> ModelDelta:
        return cls(meta or DeltaMeta(), tuple(tensors.values()))

    @classmethod
    def from_dense(
        cls, arrays: Mapping[str, np.ndarray], meta: DeltaMeta | None = None
    ) -> ModelDelta:
        """A full model (every entry); meta defaults to kind="model"."""
        m = meta or DeltaMeta(kind="model")
        return cls(m, tuple(SparseTensor.from_dense(n, a) for n, a in arrays.items()))
