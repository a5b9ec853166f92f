"""The binary wire codec for ModelDelta: `encode(delta) -> bytes`, `decode(bytes)`.

Layout (little-endian; byte by byte in docs/wire-format.md):

    header   20 B   magic "FSDL", version u16, flags u16, payload_len u64, crc32 u32
    payload         meta (39 B) | federation id | zlib(tensor table) | sections
    sections        per tensor, in table order: index section, then value section

The decoder trusts nothing: every declared size is checked against a cap and against
the bytes that remain *before* anything is allocated, zlib output is bounded with
`max_length`, and every failure is a `CodecError` subclass naming the tensor.
Never pickle.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Mapping
from typing import Literal

import numpy as np

from sparse_kernels import _indexcodes as ic
from sparse_kernels._values import VALUE_MODES, dequantize, quantize, quantize_values, value_nbytes
from sparse_kernels.errors import (
    BadMagic,
    ChecksumMismatch,
    LimitExceeded,
    MalformedPayload,
    NonFiniteValues,
    ShapeMismatch,
    TruncatedPayload,
    UnsupportedVersion,
)
from sparse_kernels.types import KINDS, DeltaMeta, ModelDelta, SparseTensor

__all__ = [
    "FORMAT_VERSION",
    "INDEX_MODES",
    "MAGIC",
    "VALUE_MODES",
    "decode",
    "encode",
    "peek_meta",
    "quantize_values",
]

MAGIC = b"FSDL"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<4sHHQI")  # magic, version, flags, payload_len, crc32
_META = struct.Struct("<BHQQQIII")  # kind, fed_len, round, base, samples, ntensors, raw, z
_REC_TAIL = struct.Struct("<IBBBBfII")  # nnz, index enc, value enc, rice r, 0, scale, lens
_U16 = struct.Struct("<H")
_U8 = struct.Struct("<B")

INDEX_MODES: tuple[str, ...] = ("auto", "rice", "bitmap", "bitmap_zlib", "dense")
_INDEX_CODE = {"dense": 0, "rice": 1, "bitmap": 2, "bitmap_zlib": 3}
_INDEX_NAME = {v: k for k, v in _INDEX_CODE.items()}
_VALUE_CODE = {m: i for i, m in enumerate(VALUE_MODES)}

# Hard limits independent of the caller's caps: they keep index arithmetic in int64
# and the tensor table small.
MAX_TENSOR_NUMEL = (1 << 31) - 1
MAX_TENSORS = 1 << 16
MAX_NAME_BYTES = 1024
MAX_NDIM = 16
MAX_TABLE_BYTES = 16 << 20
_MIN_RECORD = _U16.size + 1 + _U8.size + _REC_TAIL.size  # 1-byte name, scalar

ValueMode = Literal["fp32", "fp16", "int8", "ternary"]
IndexMode = Literal["auto", "rice", "bitmap", "bitmap_zlib", "dense"]


# --------------------------------------------------------------------------- encode


def _encode_index(t: SparseTensor, index: str) -> tuple[int, int, bytes, SparseTensor]:
    """(code, rice r, bytes, tensor actually sent). "dense" fills missing entries with 0."""
    n, k = t.numel, t.nnz
    if index == "dense" or (index == "auto" and k == n):
        if k != n:
            t = SparseTensor(t.name, t.shape, np.arange(n, dtype=np.int64), t.to_dense().reshape(-1))
        return 0, 0, b"", t
    if index == "bitmap":
        return 2, 0, ic.bitmap_encode(t.indices, n), t
    if index == "bitmap_zlib":
        return 3, 0, zlib.compress(ic.bitmap_encode(t.indices, n), 6), t
    gaps = ic.gaps_of(t.indices)
    r, rice_size = ic.rice_choose(gaps, n)
    if index == "auto":
        bitmap_size = (n + 7) // 8
        # a random bitmap only competes above ~20-30% density; try zlib when it is close
        if bitmap_size <= 2 * rice_size:
            bm = ic.bitmap_encode(t.indices, n)
            z = zlib.compress(bm, 6)
            if min(len(bm), len(z)) < rice_size:
                return (2, 0, bm, t) if len(bm) <= len(z) else (3, 0, z, t)
    return 1, r, ic.rice_encode(gaps, r), t


def encode(
    delta: ModelDelta,
    *,
    values: ValueMode = "fp16",
    index: IndexMode = "auto",
) -> bytes:
    """Serialise a ModelDelta. Index encoding per tensor: the smallest of Rice gaps,
    bitmap, bitmap+zlib ("auto"; dense when every entry is present), or the one forced.
    Raises MalformedIndices / NonFiniteValues on an ill-formed input."""
    if values not in VALUE_MODES:
        raise ValueError(f"values must be one of {VALUE_MODES}, not {values!r}")
    if index not in INDEX_MODES:
        raise ValueError(f"index must be one of {INDEX_MODES}, not {index!r}")
    meta = delta.meta
    fed = meta.federation_id.encode("utf-8")
    if len(fed) > 0xFFFF:
        raise ValueError("federation_id longer than 65535 bytes")
    for field in ("round", "base_version", "num_samples"):
        v = getattr(meta, field)
        if not 0 <= v < 1 << 64:
            raise ValueError(f"meta.{field} must be in [0, 2**64), got {v}")
    if len(delta.tensors) > MAX_TENSORS:
        raise ValueError(f"more than {MAX_TENSORS} tensors")
    vcode = _VALUE_CODE[values]
    records: list[bytes] = []
    sections: list[bytes] = []
    for t in delta.tensors:
        name = t.name.encode("utf-8")
        if not 0 < len(name) <= MAX_NAME_BYTES:
            raise ValueError(f"tensor name must be 1..{MAX_NAME_BYTES} UTF-8 bytes: {t.name!r}")
        if len(t.shape) > MAX_NDIM or t.numel > MAX_TENSOR_NUMEL:
            raise ValueError(f"{t.name}: shape {t.shape} beyond the format's limits")
        t.validate()
        icode, r, ibytes, sent = _encode_index(t, index)
        vbytes, scale = quantize(sent.values, values)
        records.append(
            b"".join(
                (
                    _U16.pack(len(name)),
                    name,
                    _U8.pack(len(t.shape)),
                    struct.pack(f"<{len(t.shape)}I", *t.shape),
                    _REC_TAIL.pack(sent.nnz, icode, vcode, r, 0, scale, len(ibytes), len(vbytes)),
                )
            )
        )
        sections += (ibytes, vbytes)
    table = b"".join(records)
    ztable = zlib.compress(table, 6)
    payload = b"".join(
        [
            _META.pack(
                KINDS.index(meta.kind),
                len(fed),
                meta.round,
                meta.base_version,
                meta.num_samples,
                len(delta.tensors),
                len(table),
                len(ztable),
            ),
            fed,
            ztable,
            *sections,
        ]
    )
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, 0, len(payload), zlib.crc32(payload))
    return header + payload


# --------------------------------------------------------------------------- decode


def _check_header(data: bytes | bytearray | memoryview, max_bytes: int) -> memoryview:
    """Validate framing and CRC; return the payload as a memoryview (no copy)."""
    if len(data) > max_bytes:
        raise LimitExceeded(f"payload of {len(data)} bytes exceeds max_bytes={max_bytes}")
    if len(data) < _HEADER.size:
        raise TruncatedPayload(f"{len(data)} bytes, shorter than the {_HEADER.size}-byte header")
    magic, version, flags, plen, crc = _HEADER.unpack_from(data, 0)
    if magic != MAGIC:
        raise BadMagic(f"magic {magic!r} is not {MAGIC!r}")
    if version != FORMAT_VERSION:
        raise UnsupportedVersion(f"format version {version}; this decoder reads {FORMAT_VERSION}")
    if flags != 0:
        raise UnsupportedVersion(f"unknown header flags 0x{flags:04x}")
    have = len(data) - _HEADER.size
    if plen > have:
        raise TruncatedPayload(f"header declares {plen} payload bytes, only {have} present")
    if plen < have:
        raise MalformedPayload(f"{have - plen} trailing bytes after the declared payload")
    payload = memoryview(data)[_HEADER.size :]
    if zlib.crc32(payload) != crc:
        raise ChecksumMismatch("CRC32 of the payload does not match the header")
    return payload


def peek_meta(data: bytes, *, max_bytes: int = 256 << 20) -> DeltaMeta:
    """The metadata of a payload (framing and CRC checked), without decoding tensors."""
    payload = _check_header(data, max_bytes)
    return _read_meta(payload)[0]


def _read_meta(payload: memoryview) -> tuple[DeltaMeta, int, int, int, int]:
    """(meta, n_tensors, table_raw_len, table_zlen, offset after the federation id)."""
    if len(payload) < _META.size:
        raise TruncatedPayload("payload shorter than the metadata block")
    kind, fed_len, rnd, base, samples, ntens, raw_len, zlen = _META.unpack_from(payload, 0)
    if kind >= len(KINDS):
        raise MalformedPayload(f"unknown payload kind code {kind}")
    end = _META.size + fed_len
    if end > len(payload):
        raise TruncatedPayload("federation id runs past the end of the payload")
    try:
        fed = bytes(payload[_META.size : end]).decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedPayload("federation id is not valid UTF-8") from None
    meta = DeltaMeta(fed, rnd, base, samples, KINDS[kind])
    return meta, ntens, raw_len, zlen, end


def _read_table(
    payload: memoryview, pos: int, ntens: int, raw_len: int, zlen: int
) -> tuple[list[tuple], int]:
    if ntens > MAX_TENSORS:
        raise LimitExceeded(f"{ntens} tensors > {MAX_TENSORS}")
    if raw_len > MAX_TABLE_BYTES:
        raise LimitExceeded(f"tensor table of {raw_len} bytes > {MAX_TABLE_BYTES}")
    if raw_len < ntens * _MIN_RECORD:
        raise MalformedPayload(f"tensor table of {raw_len} bytes cannot hold {ntens} records")
    if pos + zlen > len(payload):
        raise TruncatedPayload("tensor table runs past the end of the payload")
    table = ic.inflate_exact(payload[pos : pos + zlen], raw_len, "tensor table")
    recs = []
    at = 0
    try:
        for i in range(ntens):
            (nlen,) = _U16.unpack_from(table, at)
            at += 2
            if not 0 < nlen <= MAX_NAME_BYTES or at + nlen > raw_len:
                raise MalformedPayload(f"tensor #{i}: bad name length {nlen}")
            name = table[at : at + nlen].decode("utf-8")
            at += nlen
            (ndim,) = _U8.unpack_from(table, at)
            at += 1
            if ndim > MAX_NDIM:
                raise MalformedPayload(f"{name}: {ndim} dimensions > {MAX_NDIM}")
            shape = struct.unpack_from(f"<{ndim}I", table, at)
            at += 4 * ndim
            tail = _REC_TAIL.unpack_from(table, at)
            at += _REC_TAIL.size
            recs.append((name, shape, *tail))
    except struct.error:
        raise MalformedPayload(f"tensor table truncated in record #{len(recs)}") from None
    except UnicodeDecodeError:
        raise MalformedPayload(f"tensor #{len(recs)}: name is not valid UTF-8") from None
    if at != raw_len:
        raise MalformedPayload(f"{raw_len - at} stray bytes after the tensor table")
    return recs, pos + zlen


def decode(
    data: bytes | bytearray | memoryview,
    *,
    expected: Mapping[str, tuple[int, ...]] | None = None,
    max_bytes: int = 256 << 20,
    max_numel: int = 200_000_000,
) -> ModelDelta:
    """Parse and validate a payload. `expected` (name -> shape), when given, rejects
    unknown names and other shapes with ShapeMismatch; tensors it lists may be absent
    (a delta need not carry every tensor). `max_numel` caps the summed tensor sizes."""
    payload = _check_header(data, max_bytes)
    meta, ntens, raw_len, zlen, pos = _read_meta(payload)
    recs, pos = _read_table(payload, pos, ntens, raw_len, zlen)
    end = len(payload)
    total_numel = 0
    seen: set[str] = set()
    tensors = []
    for name, shape, nnz, icode, vcode, r, reserved, scale, ilen, vlen in recs:
        if name in seen:
            raise MalformedPayload(f"{name}: duplicate tensor name")
        seen.add(name)
        if expected is not None:
            want = expected.get(name)
            if want is None:
                raise ShapeMismatch(f"{name}: not a tensor of this model")
            if tuple(want) != shape:
                raise ShapeMismatch(f"{name}: shape {shape}, model has {tuple(want)}")
        numel = math.prod(shape)
        total_numel += numel
        if numel > MAX_TENSOR_NUMEL or total_numel > max_numel:
            raise LimitExceeded(f"{name}: {total_numel} entries in all > max_numel={max_numel}")
        if nnz > numel:
            raise MalformedPayload(f"{name}: nnz {nnz} > numel {numel}")
        if icode not in _INDEX_NAME or vcode >= len(VALUE_MODES) or reserved:
            raise MalformedPayload(f"{name}: unknown encoding codes ({icode}, {vcode}, {reserved})")
        if not math.isfinite(scale):
            raise NonFiniteValues(f"{name}: value scale is {scale}")
        vmode = VALUE_MODES[vcode]
        if vlen != value_nbytes(vmode, nnz):
            raise MalformedPayload(f"{name}: {vlen} value bytes for {nnz} {vmode} values")
        if pos + ilen + vlen > end:
            raise TruncatedPayload(f"{name}: sections run past the end of the payload")
        ibuf = payload[pos : pos + ilen]
        pos += ilen
        vbuf = payload[pos : pos + vlen]
        pos += vlen
        idx = _decode_index(ibuf, icode, r, nnz, numel, name)
        vals = dequantize(vbuf, vmode, nnz, scale, name)
        tensors.append(SparseTensor._trusted(name, shape, idx, vals))
    if pos != end:
        raise MalformedPayload(f"{end - pos} stray bytes after the last tensor section")
    return ModelDelta(meta, tuple(tensors))


def _decode_index(buf: memoryview, icode: int, r: int, nnz: int, numel: int, name: str) -> np.ndarray:
    if icode == 0:
        if nnz != numel or len(buf):
            raise MalformedPayload(f"{name}: dense encoding needs nnz == numel and no index bytes")
        return np.arange(numel, dtype=np.int64)
    if r and icode != 1:
        raise MalformedPayload(f"{name}: Rice parameter set for a non-Rice encoding")
    if icode == 1:
        return ic.rice_decode(buf, r, nnz, numel, name)
    if icode == 2:
        return ic.bitmap_decode(buf, nnz, numel, name)
    # bitmap+zlib: the output size is known, so inflate no further than that
    raw = ic.inflate_exact(buf, (numel + 7) // 8, f"{name}: bitmap")
    return ic.bitmap_decode(raw, nnz, numel, name)
