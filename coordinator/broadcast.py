"""What agents will hold after a round: the strategy's target weights turned into the old
weights (sliced when channels were pruned) plus a possibly sparse, quantised patch, the
remainder carried in the server's residual (error feedback on the way down). Pure."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from coordinator.protocol import ValueEncoding
from sparse_kernels import (
    SMALL_TENSOR,
    DeltaMeta,
    ErrorFeedback,
    ModelDelta,
    SparseTensor,
    decode,
    encode,
)
from sparse_kernels.patch import apply_delta, round_for_broadcast
from sparse_kernels.reshape import apply_reshape, encode_reshape
from strategies.base import RoundResult, Weights

__all__ = ["RESIDUAL_PREFIX", "Broadcast", "make_broadcast", "round_for_broadcast"]

RESIDUAL_PREFIX = "residual/"


@dataclass(frozen=True)
class Broadcast:
    weights: Weights  # exactly what an agent computes from the old weights + patch
    patch: bytes | None  # codec delta from the previous version; None: full download
    reshape: bytes | None  # kept channels (JSON) when the structure changed
    residual: dict[str, np.ndarray]  # "residual/<name>" arrays for the next round


def make_broadcast(fid: str, version: int, old: Weights, state: dict[str, np.ndarray], result: RoundResult,
                   *, density: float, values: ValueEncoding) -> Broadcast:
    target = result.weights
    residual_before = {k.removeprefix(RESIDUAL_PREFIX): v for k, v in state.items() if k.startswith(RESIDUAL_PREFIX)}
    base, reshape_bytes = old, None
    if result.structure_changed:
        if result.reshape is None:  # structure unknown: a full download (fp16 when lossy anyway)
            return Broadcast(round_for_broadcast(target, values), None, None, {})
        base = apply_reshape(old, result.reshape)
        residual_before = apply_reshape(residual_before, result.reshape)
        reshape_bytes = encode_reshape(result.reshape)
    feedback = ErrorFeedback()
    feedback.load_state_dict(residual_before)
    change = {k: target[k] - base[k] for k in target}
    meta = DeltaMeta(federation_id=fid, round=version, base_version=version - 1, num_samples=0, kind="delta")
    if density >= 1.0 and values == "fp32":
        delta = ModelDelta(meta, tuple(SparseTensor.from_dense_nonzero(k, v) for k, v in change.items()))
    else:
        delta = feedback.compress(change, density=density, meta=meta, values=values, min_dense_numel=SMALL_TENSOR)
    patch = encode(delta, values=values)
    new_weights = {k: v.copy() for k, v in base.items()}
    apply_delta(new_weights, decode(patch))  # exactly what an agent will compute
    residual = {f"{RESIDUAL_PREFIX}{k}": v for k, v in feedback.state_dict().items()}
    return Broadcast(new_weights, patch, reshape_bytes, residual)
