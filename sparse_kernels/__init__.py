"""Sparse model deltas: types, top-k with error feedback, the binary wire codec and
streaming sparse aggregation. Imports numpy only (never torch, coordinator, edge_agent
or models)."""

from sparse_kernels.aggregate import SparseAccumulator
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
from sparse_kernels.patch import apply_delta, encode_model, model_values, round_for_broadcast
from sparse_kernels.reshape import Reshape, apply_reshape, decode_reshape, encode_reshape
from sparse_kernels.select import SMALL_TENSOR, ErrorFeedback, energy_density, select_topk, topk_mask, warmup_density
from sparse_kernels.types import MAX_MODEL_BYTES, DeltaMeta, ModelDelta, SparseTensor, Weights

__all__ = [
    "FORMAT_VERSION",
    "MAX_MODEL_BYTES",
    "SMALL_TENSOR",
    "BadMagic",
    "ChecksumMismatch",
    "CodecError",
    "DeltaMeta",
    "ErrorFeedback",
    "LimitExceeded",
    "MalformedIndices",
    "MalformedPayload",
    "ModelDelta",
    "Reshape",
    "NonFiniteValues",
    "ShapeMismatch",
    "SparseAccumulator",
    "SparseTensor",
    "TruncatedPayload",
    "Weights",
    "UnsupportedVersion",
    "apply_delta",
    "apply_reshape",
    "decode",
    "decode_reshape",
    "encode",
    "encode_model",
    "encode_reshape",
    "energy_density",
    "model_values",
    "peek_meta",
    "quantize_values",
    "round_for_broadcast",
    "select_topk",
    "topk_mask",
    "warmup_density",
]
