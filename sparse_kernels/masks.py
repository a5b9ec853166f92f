"""Mask artifacts: a strategy's keep-masks as bytes of their own, served per model version
(`GET /v1/federations/{fid}/models/{v}/mask`) and named by sha256 in the task, so a lossy
broadcast (fp16 values, top-k patches) can never move the mask.

The bytes are an ordinary codec payload (`sparse_kernels.codec`, kind "model"): one
tensor per masked weight whose indices are the kept positions — Rice-coded gaps, a
bitmap or bitmap+zlib, whichever is smallest ("auto"), dense when all are kept — and
whose values are ternary +1 (one bit per kept entry; the codec has no value-free mode,
and the bit buys its framing, CRC and hostile-input checks unchanged). ``round`` is the
model version the mask belongs to. Never pickle.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

import numpy as np

from sparse_kernels.codec import decode, encode
from sparse_kernels.errors import MalformedPayload, ShapeMismatch
from sparse_kernels.types import DeltaMeta, ModelDelta, SparseTensor

__all__ = ["decode_masks", "encode_masks", "mask_digest"]

# A mask artifact is at most ~1.3 bits per masked entry; 256 MiB covers 1.5 G weights.
MAX_MASK_BYTES = 256 << 20


def encode_masks(masks: Mapping[str, np.ndarray], *, federation_id: str = "", version: int = 0) -> bytes:
    """The canonical bytes of `masks` (name → bool array, True = kept), in `masks`' order:
    equal masks in the same order give the same bytes, hence the same digest."""
    meta = DeltaMeta(federation_id=federation_id, round=version, base_version=version, num_samples=0, kind="model")
    tensors = []
    for name, m in masks.items():
        kept = np.flatnonzero(np.asarray(m, dtype=bool)).astype(np.int64)  # (nnz,) flat C order, increasing
        tensors.append(SparseTensor(name, np.shape(m), kept, np.ones(kept.size, dtype=np.float32)))
    return encode(ModelDelta(meta, tuple(tensors)), values="ternary", index="auto")


def decode_masks(data: bytes | bytearray | memoryview, *, shapes: Mapping[str, tuple[int, ...]],
                 names: Iterable[str] | None = None, max_bytes: int = MAX_MASK_BYTES) -> dict[str, np.ndarray]:
    """Bool masks (True = kept) from an artifact, validated against the model: every
    tensor must be one of `shapes` with that shape (ShapeMismatch), indices in range and
    increasing (MalformedIndices), every value +1 (MalformedPayload: not a mask), and when
    `names` is given the artifact must cover exactly those names. Every failure is a
    `CodecError`; nothing is allocated beyond the model's sizes."""
    numel = sum(int(np.prod(s, dtype=np.int64)) for s in shapes.values())
    delta = decode(data, expected=shapes, max_bytes=max_bytes, max_numel=max(numel, 1))
    if delta.meta.kind != "model":
        raise MalformedPayload(f"a mask artifact has kind 'model', not {delta.meta.kind!r}")
    out: dict[str, np.ndarray] = {}
    for t in delta.tensors:
        if t.nnz and not bool(np.all(t.values == 1.0)):
            raise MalformedPayload(f"{t.name}: mask values must all be +1 (kept)")
        m = np.zeros(t.numel, dtype=bool)
        m[t.indices] = True
        out[t.name] = m.reshape(t.shape)
    if names is not None:
        want = list(names)
        missing, extra = sorted(set(want) - set(out)), sorted(set(out) - set(want))
        if missing or extra:
            raise ShapeMismatch(f"mask artifact covers the wrong weights: missing {missing[:3]}, extra {extra[:3]}")
    return out


def mask_digest(data: bytes) -> str:
    """sha256 hex of an artifact: the name the task and the blob store give it."""
    return hashlib.sha256(data).hexdigest()
