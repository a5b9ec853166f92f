"""Fuzz target for the decoder: whatever the bytes, only a CodecError may come out.

    python -m sparse_kernels.fuzz -max_total_time=15 -rss_limit_mb=2048 CORPUS_DIR

The first input byte picks a mode: bit 0 re-frames the rest (fixes payload_len and
CRC32) so mutations reach the parser behind the checksum; bit 1 decodes against a
model's shapes. `seeds()` gives valid payloads to start from. Needs atheris only in
`main`; `test_one_input` runs anywhere (the mutation test uses it without atheris).
"""

from __future__ import annotations

import contextlib
import struct
import sys
import zlib
from typing import Any

import numpy as np

from sparse_kernels.codec import _HEADER, _META, FORMAT_VERSION, MAGIC, decode, encode
from sparse_kernels.errors import CodecError
from sparse_kernels.types import DeltaMeta, ModelDelta, SparseTensor

SHAPES: dict[str, tuple[int, ...]] = {"conv.weight": (8, 4, 3, 3), "bn.bias": (8,), "fc": (10, 64)}
# small caps, so a hostile declared size is refused rather than allocated
MAX_BYTES = 1 << 20
MAX_NUMEL = 1 << 20


def reframe(body: bytes) -> bytes:
    """Rewrite the header of `body` so its length and CRC32 are consistent."""
    payload = body[_HEADER.size :]
    return struct.pack("<4sHHQI", MAGIC, FORMAT_VERSION, 0, len(payload), zlib.crc32(payload)) + payload


def _table_span(body: bytes) -> tuple[int, int] | None:
    """(start, stop) of the tensor table inside a framed payload, if the meta parses."""
    at = _HEADER.size
    if len(body) < at + _META.size:
        return None
    fields = _META.unpack_from(body, at)
    start = at + _META.size + fields[1]
    return start, start + fields[7]


def open_table(body: bytes) -> bytes:
    """Store the tensor table uncompressed (zlen = raw_len), for mode bit 2 seeds."""
    span = _table_span(body)
    if span is None:
        return body
    raw = zlib.decompress(body[span[0] : span[1]])
    meta = bytearray(body[_HEADER.size : _HEADER.size + _META.size])
    struct.pack_into("<I", meta, _META.size - 4, len(raw))
    return body[: _HEADER.size] + bytes(meta) + body[_HEADER.size + _META.size : span[0]] + raw + body[span[1] :]


def close_table(body: bytes) -> bytes:
    """Inverse of open_table: deflate the table whose *raw* bytes the fuzzer mutated,
    so table records (nnz, lengths, codes, shapes) are explored, not just zlib errors."""
    span = _table_span(body)
    if span is None or span[1] > len(body):
        return body
    z = zlib.compress(body[span[0] : span[1]])
    meta = bytearray(body[_HEADER.size : _HEADER.size + _META.size])
    struct.pack_into("<I", meta, _META.size - 4, len(z))
    return body[: _HEADER.size] + bytes(meta) + body[_HEADER.size + _META.size : span[0]] + z + body[span[1] :]


def test_one_input(data: bytes) -> None:
    mode = data[0] if data else 0
    body = bytes(data[1:])
    if mode & 4:
        body = close_table(body)
    if mode & 1 and len(body) >= _HEADER.size:
        body = reframe(body)
    with contextlib.suppress(CodecError):  # any other exception is a finding
        decode(
            body,
            expected=SHAPES if mode & 2 else None,
            max_bytes=MAX_BYTES,
            max_numel=MAX_NUMEL,
        )


def seeds() -> list[bytes]:
    """Valid payloads (with a mode byte) covering every index and value encoding."""
    rng = np.random.default_rng(0)
    out = []
    for i, (values, index) in enumerate(
        [
            ("fp32", "auto"),
            ("fp16", "rice"),
            ("int8", "bitmap"),
            ("ternary", "bitmap_zlib"),
            ("fp16", "dense"),
        ]
    ):
        tensors = []
        for name, shape in SHAPES.items():
            n = int(np.prod(shape))
            k = int(rng.integers(0, n + 1)) if i else n // 3
            idx = np.sort(rng.choice(n, size=k, replace=False))
            tensors.append(SparseTensor(name, shape, idx, rng.normal(size=k)))
        meta = DeltaMeta("fed", i, i, 10 + i, "delta")
        payload = encode(ModelDelta(meta, tuple(tensors)), values=values, index=index)  # type: ignore[arg-type]
        opened = open_table(payload)
        out += [bytes([m]) + payload for m in (1, 3)] + [bytes([m]) + opened for m in (5, 7)]
    return out


def _instrument_codec(atheris: Any) -> None:
    """Coverage for the decoder's own modules only: instrument_all() would patch
    thousands of numpy functions and take minutes on a small machine."""
    import inspect

    from sparse_kernels import _indexcodes, _values, codec, types

    for mod in (codec, _indexcodes, _values, types):
        for obj in vars(mod).values():
            members = vars(obj).values() if inspect.isclass(obj) else (obj,)
            for f in members:
                f = getattr(f, "__func__", f)  # classmethod / staticmethod
                if inspect.isfunction(f) and f.__module__ == mod.__name__:
                    atheris.instrument_func(f)


def main(argv: list[str] | None = None) -> None:
    import atheris  # lazily: only the fuzz run needs it

    argv = list(sys.argv if argv is None else argv)
    corpus = [a for a in argv[1:] if not a.startswith("-")]
    for d in corpus[:1]:
        from pathlib import Path

        p = Path(d)
        p.mkdir(parents=True, exist_ok=True)
        for i, s in enumerate(seeds()):
            (p / f"seed-{i}").write_bytes(s)
    _instrument_codec(atheris)
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
