"""Every decoder error class, each from a crafted payload. The builder below writes
the layout of docs/wire-format.md independently of the encoder."""

from __future__ import annotations

import struct
import tracemalloc
import zlib

import numpy as np
import pytest

from sparse_kernels import (
    BadMagic,
    ChecksumMismatch,
    CodecError,
    DeltaMeta,
    LimitExceeded,
    MalformedIndices,
    MalformedPayload,
    ModelDelta,
    NonFiniteValues,
    ShapeMismatch,
    SparseTensor,
    TruncatedPayload,
    UnsupportedVersion,
    decode,
    encode,
)

DENSE, RICE, BITMAP, BITMAP_Z = 0, 1, 2, 3
FP32, FP16, INT8, TERNARY = 0, 1, 2, 3


def record(name, shape, nnz, icode, vcode, r=0, scale=0.0, ilen=0, vlen=0, reserved=0) -> bytes:
    nb = name if isinstance(name, bytes) else name.encode()
    return (
        struct.pack("<H", len(nb))
        + nb
        + struct.pack("<B", len(shape))
        + struct.pack(f"<{len(shape)}I", *shape)
        + struct.pack("<IBBBBfII", nnz, icode, vcode, r, reserved, scale, ilen, vlen)
    )


def frame(records, sections=b"", *, kind=0, ntens=None, raw_len=None, table=None,
          version=1, flags=0, magic=b"FSDL", fed=b"f") -> bytes:
    raw = b"".join(records)
    z = zlib.compress(raw) if table is None else table
    meta = struct.pack(
        "<BHQQQIII", kind, len(fed), 1, 2, 3,
        len(records) if ntens is None else ntens,
        len(raw) if raw_len is None else raw_len, len(z),
    )
    payload = meta + fed + z + sections
    return struct.pack("<4sHHQI", magic, version, flags, len(payload), zlib.crc32(payload)) + payload


def fp32(*xs) -> bytes:
    return np.array(xs, dtype="<f4").tobytes()


def valid() -> bytes:
    t = SparseTensor("w", (4, 4), np.array([1, 5, 9]), np.array([1.0, -2.0, 3.0]))
    return encode(ModelDelta(DeltaMeta("fed", 1, 2, 3), (t,)), values="fp32")


def test_builder_agrees_with_encoder() -> None:
    # a bitmap record built by hand decodes as the encoder's would
    bm = np.packbits(np.isin(np.arange(16), [1, 5, 9]).astype(np.uint8)).tobytes()
    data = frame([record("w", (4, 4), 3, BITMAP, FP32, ilen=len(bm), vlen=12)], bm + fp32(1, -2, 3))
    out = decode(data)
    np.testing.assert_array_equal(out.tensors[0].indices, [1, 5, 9])
    np.testing.assert_array_equal(out.tensors[0].values, [1, -2, 3])


def _rice(idx, r):
    from sparse_kernels._indexcodes import gaps_of, rice_encode

    return rice_encode(gaps_of(np.asarray(idx, dtype=np.int64)), r)


BM3 = np.packbits(np.isin(np.arange(16), [1, 5, 9]).astype(np.uint8)).tobytes()

# (error class, payload) — one crafted case per reason
CASES = [
    # framing
    (TruncatedPayload, b"FSDL\x01"),  # shorter than the header
    (TruncatedPayload, valid()[:-1]),  # header declares more than present
    (MalformedPayload, valid() + b"\x00"),  # trailing bytes
    (BadMagic, b"PK\x03\x04" + valid()[4:]),  # not ours
    (UnsupportedVersion, frame([], version=2)),  # future format
    (UnsupportedVersion, frame([], flags=1)),  # unknown flag
    (ChecksumMismatch, valid()[:-2] + bytes([valid()[-2] ^ 0xFF]) + valid()[-1:]),
    # metadata and table
    (MalformedPayload, frame([], kind=9)),  # unknown kind
    (MalformedPayload, frame([], fed=b"\xff\xfe")),  # federation id not UTF-8
    (LimitExceeded, frame([], ntens=1 << 20, raw_len=1 << 30)),  # declared sizes above caps
    (MalformedPayload, frame([], ntens=3, raw_len=10)),  # table too small for 3 records
    (MalformedPayload, frame([record("w", (4,), 0, RICE, FP32)], table=b"not zlib")),
    (LimitExceeded, frame([record("w", (4,), 0, RICE, FP32)], table=zlib.compress(bytes(10**6)), raw_len=40)),
    (MalformedPayload, frame([record("w", (4,), 0, RICE, FP32) + b"xx"])),  # stray table bytes
    (MalformedPayload, frame([record("w", (4,), 0, RICE, FP32)] * 2)),  # duplicate names
    (MalformedPayload, frame([record(b"\xff\xfe", (4,), 0, RICE, FP32)])),
    (MalformedPayload, frame([record("w", (4,), 5, RICE, FP32)])),  # nnz > numel
    (MalformedPayload, frame([record("w", (4,), 0, 7, FP32)])),  # unknown index code
    (MalformedPayload, frame([record("w", (4,), 0, RICE, 9)])),  # unknown value code
    (MalformedPayload, frame([record("w", (4,), 0, RICE, FP32, reserved=1)])),
    (MalformedPayload, frame([record("w", (4,), 2, RICE, FP32, vlen=4)], b"\x00" * 4)),  # 2 fp32 in 4 B
    (TruncatedPayload, frame([record("w", (4,), 2, BITMAP, FP32, ilen=1, vlen=8)], b"\x00" * 5)),
    (MalformedPayload, frame([record("w", (4,), 4, DENSE, FP32, ilen=1, vlen=16)], b"\x00" * 17)),
    (MalformedPayload, frame([record("w", (4,), 3, DENSE, FP32, vlen=12)], b"\x00" * 12)),
    (MalformedPayload, frame([record("w", (16,), 0, RICE, FP32)], b"\x00")),  # stray section bytes
    # indices
    (MalformedIndices, frame([record("w", (4, 4), 2, BITMAP, FP32, ilen=2, vlen=8)], BM3 + fp32(1, 2))),
    (MalformedPayload, frame([record("w", (4, 4), 3, BITMAP, FP32, ilen=1, vlen=12)], BM3[:1] + fp32(1, 2, 3))),
    (MalformedPayload, frame([record("w", (12,), 3, BITMAP, FP32, ilen=2, vlen=12)], b"\x44\x41" + fp32(1, 2, 3))),
    (MalformedIndices, frame([record("w", (8,), 2, RICE, FP32, r=2, ilen=len(_rice([3, 12], 2)), vlen=8)], _rice([3, 12], 2) + fp32(1, 2))),  # noqa: E501
    (MalformedIndices, frame([record("w", (64,), 3, RICE, FP32, r=2, ilen=2, vlen=12)], b"\x00\x00" + fp32(1, 2, 3))),
    (MalformedIndices, frame([record("w", (64,), 1, RICE, FP32, r=0, ilen=2, vlen=4)], b"\x80\x00" + fp32(1))),  # noqa: E501 (a stray zero byte)
    (MalformedPayload, frame([record("w", (64,), 1, RICE, FP32, r=32, ilen=5, vlen=4)], b"\x00" * 4 + b"\x80" + fp32(1))),
    (MalformedPayload, frame([record("w", (64,), 1, BITMAP_Z, FP32, r=2, ilen=0, vlen=4)], fp32(1))),  # r on bitmap
    (LimitExceeded, frame([record("w", (64,), 1, BITMAP_Z, FP32, ilen=len(zlib.compress(bytes(10**5))), vlen=4)], zlib.compress(bytes(10**5)) + fp32(1))),  # noqa: E501
    # values
    (NonFiniteValues, frame([record("w", (4, 4), 3, BITMAP, FP32, ilen=2, vlen=12)], BM3 + fp32(1, np.nan, 3))),
    (NonFiniteValues, frame([record("w", (4, 4), 3, BITMAP, FP16, ilen=2, vlen=6)], BM3 + np.array([1, np.inf, 3], "<f2").tobytes())),  # noqa: E501
    (NonFiniteValues, frame([record("w", (4, 4), 3, BITMAP, INT8, scale=float("inf"), ilen=2, vlen=3)], BM3 + b"\x01\x02\x03")),
    (NonFiniteValues, frame([record("w", (4, 4), 3, BITMAP, INT8, scale=3e38, ilen=2, vlen=3)], BM3 + b"\x01\x7f\x03")),  # noqa: E501 (overflow)
    (MalformedPayload, frame([record("w", (4, 4), 3, BITMAP, INT8, scale=1.0, ilen=2, vlen=3)], BM3 + b"\x01\x80\x03")),  # -128
    (MalformedPayload, frame([record("w", (4, 4), 3, BITMAP, TERNARY, scale=1.0, ilen=2, vlen=1)], BM3 + b"\x01")),  # pad bit
]


@pytest.mark.parametrize("error, data", CASES, ids=[f"{i}-{c[0].__name__}" for i, c in enumerate(CASES)])
def test_crafted_payload_raises_typed_error(error: type[CodecError], data: bytes) -> None:
    with pytest.raises(error):
        decode(data)


def test_caps_refuse_before_parsing() -> None:
    data = valid()
    with pytest.raises(LimitExceeded, match="max_bytes"):
        decode(data, max_bytes=len(data) - 1)
    with pytest.raises(LimitExceeded, match="max_numel"):
        decode(data, max_numel=15)
    # a tensor larger than the format's hard per-tensor limit
    with pytest.raises(LimitExceeded):
        decode(frame([record("w", (1 << 16, 1 << 16), 0, RICE, FP32)]), max_numel=1 << 40)


def test_shapes_are_checked_against_the_model() -> None:
    data = valid()
    assert decode(data, expected={"w": (4, 4), "b": (4,)}).tensors[0].name == "w"
    with pytest.raises(ShapeMismatch, match="w: shape"):
        decode(data, expected={"w": (16,)})
    with pytest.raises(ShapeMismatch, match="not a tensor"):
        decode(data, expected={"other": (4, 4)})


def test_hostile_sizes_do_not_allocate() -> None:
    # a 200M-entry tensor whose bitmap is a small zlib bomb: refused, little allocated
    bomb = zlib.compress(b"\xff" * (1 << 20))
    data = frame([record("w", (200_000_000,), 1, BITMAP_Z, FP32, ilen=len(bomb), vlen=4)], bomb + fp32(1))
    tracemalloc.start()
    try:
        with pytest.raises(CodecError):
            decode(data, max_numel=100_000_000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20


def test_encode_refuses_ill_formed_input() -> None:
    bad = SparseTensor("w", (4,), np.array([2, 1]), np.array([1.0, 2.0]))
    with pytest.raises(MalformedIndices):
        encode(ModelDelta(DeltaMeta(), (bad,)))
    oob = SparseTensor("w", (4,), np.array([4]), np.array([1.0]))
    with pytest.raises(MalformedIndices):
        encode(ModelDelta(DeltaMeta(), (oob,)))
    nan = SparseTensor("w", (4,), np.array([0]), np.array([np.nan]))
    with pytest.raises(NonFiniteValues):
        encode(ModelDelta(DeltaMeta(), (nan,)))
    with pytest.raises(ValueError, match="num_samples"):
        encode(ModelDelta(DeltaMeta(num_samples=-1), ()))
