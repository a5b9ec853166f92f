"""Typed errors of the sparse wire codec.

Everything the decoder rejects raises a subclass of `CodecError` (itself a
`ValueError`), so the API layer maps one family to one HTTP status::

    CodecError
    ├── TruncatedPayload      fewer bytes than the header or a record declares
    ├── BadMagic              not a fedslim sparse payload at all
    ├── UnsupportedVersion    a format version or flag this decoder does not know
    ├── ChecksumMismatch      CRC32 of the payload differs from the header
    ├── LimitExceeded         a declared size above a cap (bytes, numel, tensors, zlib output)
    ├── MalformedPayload      lengths that disagree, unknown codes, trailing bytes, bad UTF-8
    ├── MalformedIndices      indices out of range / not strictly increasing / count mismatch
    ├── NonFiniteValues       NaN or Inf in values, scales or weights
    └── ShapeMismatch         unknown tensor name or a shape that differs from the model
"""

from __future__ import annotations

__all__ = [
    "BadMagic",
    "ChecksumMismatch",
    "CodecError",
    "LimitExceeded",
    "MalformedIndices",
    "MalformedPayload",
    "NonFiniteValues",
    "ShapeMismatch",
    "TruncatedPayload",
    "UnsupportedVersion",
]


class CodecError(ValueError):
    """Base of every error raised while encoding or decoding a sparse payload."""


class TruncatedPayload(CodecError):
    pass


class BadMagic(CodecError):
    pass


class UnsupportedVersion(CodecError):
    pass


class ChecksumMismatch(CodecError):
    pass


class LimitExceeded(CodecError):
    pass


class MalformedPayload(CodecError):
    pass


class MalformedIndices(CodecError):
    pass


class NonFiniteValues(CodecError):
    pass


class ShapeMismatch(CodecError):
    pass
