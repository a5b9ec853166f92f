"""Sparse model deltas: types, top-k with error feedback, the binary wire codec and
streaming sparse aggregation. Imports numpy only (never torch, coordinator, edge_agent
or models)."""

from sparse_kernels.aggregate import ServerMomentum, SparseAccumulator
from sparse_kernels.codec import FORMAT_VERSION, decode, encode, peek_meta, quantize_values
from sparse_kernels.errors import (
    BadMagic,
    ChecksumMismatch,
    CodecError,
    LimitExceeded,
    MalformedIndices,
    MalformedPayload,
    NonFiniteValues,
    ShapeMismatch,
    TruncatedPayload,
    UnsupportedVersion,
)
from sparse_kernels.select import ErrorFeedback, select_topk, topk_mask
from sparse_kernels.types import DeltaMeta, ModelDelta, SparseTensor

__all__ = [
    "FORMAT_VERSION",
    "BadMagic",
    "ChecksumMismatch",
    "CodecError",
    "DeltaMeta",
    "ErrorFeedback",
    "LimitExceeded",
    "MalformedIndices",
    "MalformedPayload",
    "ModelDelta",
    "NonFiniteValues",
    "ServerMomentum",
    "ShapeMismatch",
    "SparseAccumulator",
    "SparseTensor",
    "TruncatedPayload",
    "UnsupportedVersion",
    "decode",
    "encode",
    "peek_meta",
    "quantize_values",
    "select_topk",
    "topk_mask",
]
