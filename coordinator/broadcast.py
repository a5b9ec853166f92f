"""What agents will hold after a round: the strategy's target weights turned into the old
weights (sliced when channels were pruned) plus a possibly sparse, quantised patch, the
remainder carried in the server's residual (error feedback on the way down). Pure.

With a mask (the new version's keep-masks, served as its mask artifact) both sides apply
it *after* the patch, held = (old + patch)⊙m: pruned coordinates are exactly 0 in what
agents hold whatever the patch's compression, so the patch and the residual carry kept
coordinates only (zeroing a pruned weight costs no patch bytes: FedTiny's selection
round sends just the BN statistics)."""

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
from strategies.masking import apply_np_masks

__all__ = ["RESIDUAL_PREFIX", "Broadcast", "make_broadcast", "round_for_broadcast"]

RESIDUAL_PREFIX = "residual/"


@dataclass(frozen=True)
class Broadcast:
    weights: Weights  # exactly what an agent computes from the old weights + patch
    patch: bytes | None  # codec delta from the previous version; None: full download
    reshape: bytes | None  # kept channels (JSON) when the structure changed
    residual: dict[str, np.ndarray]  # "residual/<name>" arrays for the next round


def make_broadcast(fid: str, version: int, old: Weights, state: dict[str, np.ndarray], result: RoundResult,
                   *, density: float, values: ValueEncoding,
                   masks: dict[str, np.ndarray] | None = None, energy: float | None = None) -> Broadcast:
    """`masks`: the new version's keep-masks (name → bool, the target's shapes), applied
    after the patch as agents apply them (None: no mask artifact). `energy`: adaptive
    density, `density` at most (`sparse_kernels.energy_density`)."""
    target = result.weights
    masks = masks or {}
    residual_before = {k.removeprefix(RESIDUAL_PREFIX): v for k, v in state.items() if k.startswith(RESIDUAL_PREFIX)}
    base, reshape_bytes = old, None
    if result.structure_changed:
        if result.reshape is None:  # structure unknown: a full download (fp16 when lossy anyway)
            return Broadcast(apply_np_masks(round_for_broadcast(target, values), masks), None, None, {})
        base = apply_reshape(old, result.reshape)
        residual_before = apply_reshape(residual_before, result.reshape)
        reshape_bytes = encode_reshape(result.reshape)
    # pruned coordinates: held at 0 by the mask, so neither patched nor owed later
    residual_before = apply_np_masks(residual_before, {k: m for k, m in masks.items() if k in residual_before})
    feedback = ErrorFeedback()
    feedback.load_state_dict(residual_before)
    change = apply_np_masks({k: target[k] - base[k] for k in target}, masks)
    meta = DeltaMeta(federation_id=fid, round=version, base_version=version - 1, num_samples=0, kind="delta")
    if density >= 1.0 and values == "fp32" and energy is None:
        delta = ModelDelta(meta, tuple(SparseTensor.from_dense_nonzero(k, v) for k, v in change.items()))
    else:
        delta = feedback.compress(change, density=density, meta=meta, values=values, min_dense_numel=SMALL_TENSOR,
                                  energy=energy)
    patch = encode(delta, values=values)
    new_weights = {k: v.copy() for k, v in base.items()}
    apply_delta(new_weights, decode(patch))  # exactly what an agent will compute
    new_weights = apply_np_masks(new_weights, masks)  # ... and then w⊙m, as the agent does
    residual = {f"{RESIDUAL_PREFIX}{k}": v for k, v in feedback.state_dict().items()}
    return Broadcast(new_weights, patch, reshape_bytes, residual)
