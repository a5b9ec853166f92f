"""Named arrays in .npz files: the one key escaping both the coordinator (strategy state
blobs) and the agent (its state directory) use.

State names contain "/" ("momentum/conv1.weight", "residual/fc.bias"); inside a zip an
"/" would be a directory, so keys store it as "|" (which no state_dict name contains).
Never pickles: `allow_pickle=False` on every load.
"""

from __future__ import annotations

import io
from collections.abc import Mapping

import numpy as np

from sparse_kernels.types import Weights

__all__ = ["arrays_from_npz", "arrays_to_npz", "escape_key", "unescape_key"]


def escape_key(name: str) -> str:
    return name.replace("/", "|")


def unescape_key(key: str) -> str:
    return key.replace("|", "/")


def arrays_to_npz(arrays: Mapping[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **{escape_key(k): v for k, v in arrays.items()})  # type: ignore[arg-type]
    return buf.getvalue()


def arrays_from_npz(data: bytes) -> Weights:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return {unescape_key(k): z[k] for k in z.files}
