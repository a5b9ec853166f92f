"""Value encodings. `dequantize(*quantize(v))` is exactly what a decoder sees, which
is what `ErrorFeedback` subtracts so its residual holds the true remainder."""

from __future__ import annotations

import numpy as np

from sparse_kernels.errors import MalformedPayload, NonFiniteValues

VALUE_MODES: tuple[str, ...] = ("fp32", "fp16", "int8", "ternary")
_FP16_MAX = np.float32(65504.0)
_F32_MAX = np.float32(np.finfo(np.float32).max)


def value_nbytes(mode: str, nnz: int) -> int:
    if mode == "fp32":
        return 4 * nnz
    if mode == "fp16":
        return 2 * nnz
    if mode == "int8":
        return nnz
    if mode == "ternary":
        return (nnz + 7) // 8
    raise ValueError(f"unknown value mode {mode!r}")


def quantize(values: np.ndarray, mode: str) -> tuple[bytes, float]:
    """(bytes, scale). scale: int8 step, ternary magnitude mu, else 0."""
    v = np.asarray(values, dtype=np.float32).reshape(-1)
    if mode == "fp32":
        return v.astype("<f4", copy=False).tobytes(), 0.0
    if mode == "fp16":
        # clip, so a large value becomes +-65504 instead of an Inf the decoder rejects
        return np.clip(v, -_FP16_MAX, _FP16_MAX).astype("<f2").tobytes(), 0.0
    if mode == "int8":
        amax = float(np.abs(v).max()) if v.size else 0.0
        scale = np.float32(amax / 127.0)
        if not np.isfinite(scale):
            raise NonFiniteValues("int8 scale is not finite")
        if scale > 0 and not np.isfinite(np.float32(127) * scale):
            scale = np.nextafter(_F32_MAX / np.float32(127), np.float32(0))
        if scale == 0:  # all zero, or so small the step underflows: send zeros
            return bytes(v.size), 0.0
        # Values that are already k * s for a neighbouring step s (the output of
        # quantize_values) keep that step, so re-encoding them is exact (idempotent).
        best = np.clip(np.rint(v / scale), -127, 127)
        if not np.array_equal(best.astype(np.float32) * scale, v):
            for s in (np.nextafter(scale, _F32_MAX), np.nextafter(scale, np.float32(0))):
                q = np.clip(np.rint(v / s), -127, 127)
                if np.array_equal(q.astype(np.float32) * s, v):
                    best, scale = q, s
                    break
        return best.astype(np.int8).tobytes(), float(scale)
    if mode == "ternary":
        # STC: every kept value becomes sign * mu, mu = mean |v| (1 bit per value)
        mu = np.float32(np.abs(v, dtype=np.float64).mean()) if v.size else np.float32(0)
        return np.packbits(v < 0).tobytes(), float(mu)
    raise ValueError(f"unknown value mode {mode!r}; expected one of {VALUE_MODES}")


def dequantize(buf: bytes | memoryview, mode: str, nnz: int, scale: float, name: str = "") -> np.ndarray:
    """(nnz,) float32, freshly allocated (writable). Rejects NaN/Inf."""
    if len(buf) != value_nbytes(mode, nnz):
        raise MalformedPayload(
            f"{name}: {len(buf)} value bytes for {nnz} {mode} values"
        )
    if not np.isfinite(scale) or scale < 0:
        raise NonFiniteValues(f"{name}: bad value scale {scale}")
    if mode == "fp32":
        out = np.frombuffer(buf, dtype="<f4").astype(np.float32)
    elif mode == "fp16":
        out = np.frombuffer(buf, dtype="<f2").astype(np.float32)
    elif mode == "int8":
        out = np.frombuffer(buf, dtype=np.int8).astype(np.float32)
        if scale == 0:
            if out.any():
                raise MalformedPayload(f"{name}: nonzero int8 values with zero scale")
        elif int(np.abs(out).max(initial=0)) > 127:
            raise MalformedPayload(f"{name}: int8 value -128 is not produced by the encoder")
        with np.errstate(over="ignore"):  # an overflow becomes Inf, rejected below
            out *= np.float32(scale)
    elif mode == "ternary":
        raw = np.frombuffer(buf, dtype=np.uint8)
        if nnz % 8 and raw[-1] & ((1 << (8 - nnz % 8)) - 1):
            raise MalformedPayload(f"{name}: nonzero padding in ternary signs")
        neg = np.unpackbits(raw, count=nnz).astype(bool)
        mu = np.float32(scale)
        out = np.where(neg, -mu, mu).astype(np.float32)
    else:
        raise ValueError(f"unknown value mode {mode!r}")
    if not bool(np.isfinite(out).all()):
        raise NonFiniteValues(f"{name}: NaN or Inf in values")
    return out


def quantize_values(values: np.ndarray, mode: str) -> np.ndarray:
    """The round trip the codec applies to a tensor's kept values (float32 out)."""
    v = np.asarray(values, dtype=np.float32).reshape(-1)
    if not bool(np.isfinite(v).all()):
        raise NonFiniteValues("NaN or Inf in values")
    buf, scale = quantize(v, mode)
    return dequantize(buf, mode, v.size, scale)
