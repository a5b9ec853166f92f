"""Mask artifacts: a strategy's keep-masks as bytes of their own, served per model version
(`GET /v1/federations/{fid}/models/{v}/mask`) and named by sha256 in the task, so a lossy
broadcast (fp16 values, top-k patches) can never move the mask.

The bytes are an ordinary codec payload (`sparse_kernels.codec`, kind "model"): one
tensor per masked weight whose indices are the kept positions — Rice-coded gaps, a
bitmap or bitmap+zlib, whichever is smallest ("auto"), dense when all are kept — and
whose values are ternary +1 (one bit per kept entry; the codec has no value-free mode,
and the bit buys its framing, CRC and hostile-input checks unchanged). The bytes depend
on the masks only (no federation id, no version), so an unchanged mask keeps its sha256
and agents download nothing. A mask *patch* is the same format holding m_old XOR m_new:
an agent that holds version v-1's mask downloads only the flipped positions and checks
the result against version v's sha256. Never pickle.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

import numpy as np

from sparse_kernels.codec import decode, encode
from sparse_kernels.errors import MalformedPayload, ShapeMismatch
from sparse_kernels.types import DeltaMeta, ModelDelta, SparseTensor

__all__ = ["apply_mask_patch", "decode_masks", "encode_masks", "mask_digest", "mask_patch"]

# A mask artifact is at most ~1.3 bits per masked entry; 256 MiB covers 1.5 G weights.
MAX_MASK_BYTES = 256 << 20


def encode_masks(masks: Mapping[str, np.ndarray]) -> bytes:
    """The canonical bytes of `masks` (name → bool array, True = kept), in `masks`' order:
    equal masks in the same order give the same bytes, hence the same digest."""
    meta = DeltaMeta(federation_id="", round=0, base_version=0, num_samples=0, kind="model")
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


def mask_patch(old: Mapping[str, np.ndarray], new: Mapping[str, np.ndarray]) -> bytes | None:
    """The flips from `old` to `new` (an artifact of old XOR new, in `new`'s order), or
    None when they cover different weights or shapes (then only the full artifact serves)."""
    if list(old) != list(new) or any(np.shape(old[n]) != np.shape(new[n]) for n in new):
        return None
    return encode_masks({n: np.asarray(old[n], bool) ^ np.asarray(new[n], bool) for n in new})


def apply_mask_patch(old: bytes, patch: bytes, *, shapes: Mapping[str, tuple[int, ...]]) -> bytes:
    """The new artifact from the one held and a mask patch (both validated against
    `shapes`, which must cover the same weights). The caller compares its sha256 with the
    one named: a patch from another base gives another digest and is not used."""
    held = decode_masks(old, shapes=shapes)
    flips = decode_masks(patch, shapes=shapes, names=list(held))
    return encode_masks({n: held[n] ^ flips[n] for n in flips})


def mask_digest(data: bytes) -> str:
    """sha256 hex of an artifact: the name the task and the blob store give it."""
    return hashlib.sha256(data).hexdigest()
