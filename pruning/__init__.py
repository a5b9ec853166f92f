"""Model surgery that the coordinator and the agents both use: unstructured masks,
schedules, structured channel pruning on torch-pruning's dependency graph
(`pruning.structured`), and the verified ONNX export with its report (`pruning.export`).

Everything here is pure (tensors in, tensors out) or a small context manager around a
model; the federated methods in `strategies` compose these blocks. `pruning.structured`
and `pruning.export` are imported on demand (torch-pruning, onnx, onnxruntime).
Per-sample channel gating lives in `models.gating`: `models.state` must rebuild gated
models from their weights, and models sits below pruning.
"""

from pruning.masks import (
    DENSE_LAYERS,
    Masks,
    apply_masks,
    erk_densities,
    magnitude_masks,
    mask_density,
    masked_weight_names,
    masks_from_zeros,
    prunable_weights,
    random_erk_masks,
)
from pruning.schedules import (
    CosineGrowRate,
    CubicSparsity,
    IncrementalLambda,
    is_reconfiguration_round,
)

__all__ = [
    "DENSE_LAYERS",
    "CosineGrowRate",
    "CubicSparsity",
    "IncrementalLambda",
    "Masks",
    "apply_masks",
    "erk_densities",
    "is_reconfiguration_round",
    "magnitude_masks",
    "mask_density",
    "masked_weight_names",
    "masks_from_zeros",
    "prunable_weights",
    "random_erk_masks",
]
