"""Index encodings, vectorised: Golomb-Rice coded gaps and bitmaps.

Rice section layout (per tensor, byte aligned; see docs/wire-format.md):
    remainders: nnz fixed-width r-bit fields, MSB first, packed, zero-padded to a byte
    quotients:  nnz unary codes (q zero bits then a one), packed, zero-padded to a byte
Splitting the two streams costs nothing in size (the bit count is that of interleaved
Rice codes, plus at most one pad byte) and lets numpy do both halves without a
per-element loop.
"""

from __future__ import annotations

import math
import zlib

import numpy as np

from sparse_kernels.errors import LimitExceeded, MalformedIndices, MalformedPayload

MAX_RICE_PARAM = 31


def gaps_of(idx: np.ndarray) -> np.ndarray:
    """(nnz,) int64 gaps: number of skipped positions before each index."""
    if idx.size == 0:
        return idx.astype(np.int64)
    g = np.empty_like(idx)
    g[0] = idx[0]
    np.subtract(idx[1:], idx[:-1], out=g[1:])
    g[1:] -= 1
    return g


def rice_param_guess(numel: int, nnz: int) -> int:
    """Rice parameter from density: 2**r ~ ln2 * mean gap (Gallager–Van Voorhis)."""
    if nnz == 0 or numel <= nnz:
        return 0
    mean_gap = (numel - nnz) / nnz
    return int(min(MAX_RICE_PARAM, max(0, round(math.log2(max(mean_gap * math.log(2), 1.0))))))


def rice_nbytes(gaps: np.ndarray, r: int) -> int:
    k = gaps.size
    unary_bits = int((gaps >> r).sum()) + k
    return (k * r + 7) // 8 + (unary_bits + 7) // 8


def rice_choose(gaps: np.ndarray, numel: int) -> tuple[int, int]:
    """(r, nbytes): the guess from density, refined by exact size on its neighbours."""
    r0 = rice_param_guess(numel, gaps.size)
    best = (r0, rice_nbytes(gaps, r0))
    for r in (r0 - 1, r0 + 1):
        if 0 <= r <= MAX_RICE_PARAM:
            n = rice_nbytes(gaps, r)
            if n < best[1]:
                best = (r, n)
    return best


def rice_encode(gaps: np.ndarray, r: int) -> bytes:
    k = gaps.size
    if k == 0:
        return b""
    parts = []
    if r:
        shifts = np.arange(r - 1, -1, -1, dtype=np.int64)  # MSB first
        bits = ((gaps[:, None] >> shifts) & 1).astype(np.uint8)  # (k, r)
        parts.append(np.packbits(bits).tobytes())
    q = gaps >> r
    ends = np.cumsum(q + 1) - 1  # position of each terminating one
    unary = np.zeros(int(ends[-1]) + 1, dtype=np.uint8)
    unary[ends] = 1
    parts.append(np.packbits(unary).tobytes())
    return b"".join(parts)


def rice_decode(buf: memoryview, r: int, nnz: int, numel: int, name: str) -> np.ndarray:
    """Indices from a Rice section; every inconsistency is a typed error."""
    if r > MAX_RICE_PARAM:
        raise MalformedPayload(f"{name}: Rice parameter {r} > {MAX_RICE_PARAM}")
    if nnz == 0:
        if len(buf):
            raise MalformedPayload(f"{name}: index bytes for an empty tensor")
        return np.zeros(0, dtype=np.int64)
    rem_bytes = (nnz * r + 7) // 8
    unary_bytes = len(buf) - rem_bytes
    # A valid quotient stream has nnz ones and at most (numel - nnz) >> r zeros:
    # checking this first bounds the unpacked allocation by the tensor size.
    max_unary = ((((numel - nnz) >> r) + nnz) + 7) // 8
    if unary_bytes < (nnz + 7) // 8 or unary_bytes > max_unary:
        raise MalformedIndices(
            f"{name}: Rice section of {len(buf)} bytes cannot hold {nnz} indices < {numel}"
        )
    raw = np.frombuffer(buf, dtype=np.uint8)
    # bits are 0/1, so a bool view is valid, and nonzero on bool is ~5x faster than on uint8
    ends = np.unpackbits(raw[rem_bytes:]).view(bool).nonzero()[0]
    if ends.size != nnz or (int(ends[-1]) >> 3) != unary_bytes - 1:
        raise MalformedIndices(
            f"{name}: Rice quotient stream holds {ends.size} codes, expected {nnz}"
        )
    # q_i = ends_i - ends_{i-1} - 1, so sum_{j<=i} q_j = ends_i - i and
    # idx_i = sum_{j<=i} (q_j << r | rem_j) + i = ((ends_i - i) << r) + cumsum(rem)_i + i.
    # Every step adds >= 1, so indices are strictly increasing by construction; with
    # numel < 2**31 and the unary length bounded above, nothing here can overflow int64.
    ar = np.arange(nnz, dtype=np.int64)
    idx = ends - ar
    if r:
        bits = np.unpackbits(raw[:rem_bytes], count=nnz * r).reshape(nnz, r)
        if nnz * r % 8 and raw[rem_bytes - 1] & ((1 << (8 - nnz * r % 8)) - 1):
            raise MalformedPayload(f"{name}: nonzero padding in Rice remainders")
        rem = bits[:, 0].astype(np.int64)  # (nnz,) MSB first; a loop over r bit columns
        for j in range(1, r):
            rem <<= 1
            rem |= bits[:, j]
        idx <<= r
        idx += np.cumsum(rem)
    idx += ar
    if int(idx[-1]) >= numel:
        raise MalformedIndices(f"{name}: index {int(idx[-1])} out of range [0, {numel})")
    return idx


def bitmap_encode(idx: np.ndarray, numel: int) -> bytes:
    bits = np.zeros(numel, dtype=np.uint8)
    bits[idx] = 1
    return np.packbits(bits).tobytes()


def bitmap_decode(buf: bytes | memoryview, nnz: int, numel: int, name: str) -> np.ndarray:
    if len(buf) != (numel + 7) // 8:
        raise MalformedPayload(
            f"{name}: bitmap of {len(buf)} bytes for {numel} entries"
        )
    bits = np.unpackbits(np.frombuffer(buf, dtype=np.uint8)).view(bool)
    if numel % 8 and bits[numel:].any():
        raise MalformedPayload(f"{name}: nonzero padding in bitmap")
    idx = bits[:numel].nonzero()[0]
    if idx.size != nnz:
        raise MalformedIndices(f"{name}: bitmap has {idx.size} bits set, declared nnz {nnz}")
    return idx.astype(np.int64, copy=False)


def inflate_exact(buf: bytes | memoryview, size: int, what: str) -> bytes:
    """zlib-decompress to exactly `size` bytes; never produces more (bomb-safe)."""
    d = zlib.decompressobj()
    try:
        out = d.decompress(buf, size + 1)
    except zlib.error as e:
        raise MalformedPayload(f"{what}: bad zlib stream ({e})") from None
    if len(out) > size:
        raise LimitExceeded(f"{what}: inflates beyond the declared {size} bytes")
    if len(out) != size or not d.eof or d.unused_data or d.unconsumed_tail:
        raise MalformedPayload(f"{what}: zlib stream does not inflate to exactly {size} bytes")
    return out
