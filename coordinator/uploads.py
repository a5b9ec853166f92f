"""What an upload may carry and the checks the codec cannot make. Pure."""

from __future__ import annotations

import numpy as np

from coordinator.errors import BadRequest, StaleUpdate
from sparse_kernels import CodecError, ModelDelta, decode
from sparse_kernels.robust import delta_norm
from strategies import AUX_PREFIX, Strategy, Weights

__all__ = ["upload_shapes", "validate_upload"]


def upload_shapes(strategy: Strategy, rnd: int, weights: Weights,
                  state: dict[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    """What an upload for round `rnd` may carry: the model's tensors and the strategy's
    auxiliary statistics."""
    aux = strategy.aux_shapes(rnd, weights, state)
    if any(not k.startswith(AUX_PREFIX) for k in aux):
        raise ValueError(f"auxiliary upload names must start with {AUX_PREFIX!r}: {sorted(aux)[:3]}")
    return {**{k: v.shape for k, v in weights.items()}, **aux}


def validate_upload(fid: str, rnd: int, base_version: int, body: bytes, shapes: dict[str, tuple[int, ...]],
                    max_norm: float | None, max_bytes: int) -> ModelDelta:
    """Decode an upload for round `rnd` from `base_version` (the codec checks CRC, caps,
    indices, NaN/Inf, shapes) and check what the codec cannot: that it is a delta for this
    round and base, within the federation's reject bound. Raises BadRequest / StaleUpdate."""
    try:
        delta = decode(body, expected=shapes, max_bytes=max_bytes)
    except CodecError as exc:
        raise BadRequest(f"malformed update: {exc}") from None
    meta = delta.meta
    if meta.kind != "delta" or meta.federation_id != fid or meta.round != rnd or meta.base_version != base_version:
        raise StaleUpdate(
            f"update is a {meta.kind!r} for federation {meta.federation_id!r} round {meta.round} base "
            f"{meta.base_version}; expected a delta for {fid!r} round {rnd} base {base_version}"
        )
    if max_norm:
        norm = delta_norm(delta, skip_prefix=AUX_PREFIX)
        if norm > max_norm:
            raise BadRequest(f"update norm {norm:.3g} exceeds the bound {max_norm:.3g}")
    return delta
