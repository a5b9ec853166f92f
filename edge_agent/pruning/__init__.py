"""Pruning engine of the edge agent: masks, schedules and the building blocks of the four
methods in ALGORITHMS.md (FedDIP, FedTiny, AutoFLIP, adaptive dynamic gating).

Everything here is pure (tensors in, tensors out) or a small context manager around a
model; strategies compose them. Structured channel pruning lives in
`edge_agent.pruning.structured` (imported lazily: it needs torch-pruning).
"""

from edge_agent.pruning.autoflip import guidance_masks, guidance_scores
from edge_agent.pruning.feddip import MaskedForward, feddip_masks_for_round, feddip_regularizer
from edge_agent.pruning.fedtiny import (
    GradientTops,
    PrunedGradientTopK,
    average_bn_stats,
    average_gradient_tops,
    candidate_pool,
    grow_counts,
    load_bn_stats,
    prune_and_grow,
    recalibrate_bn,
    topk_pruned_gradients,
)
from edge_agent.pruning.masks import (
    Masks,
    apply_masks,
    erk_densities,
    magnitude_masks,
    mask_density,
    model_density,
    prunable_weights,
    random_erk_masks,
)
from edge_agent.pruning.schedules import (
    CosineGrowRate,
    CubicSparsity,
    IncrementalLambda,
    is_reconfiguration_round,
    reconfigure_rounds,
)
from models.gating import (
    ChannelGate,
    GatedConvBN,
    channel_usage,
    effective_macs,
    gate_model,
    gated_layers,
    static_keep_channels,
)

__all__ = [
    "ChannelGate",
    "CosineGrowRate",
    "CubicSparsity",
    "GatedConvBN",
    "GradientTops",
    "IncrementalLambda",
    "MaskedForward",
    "Masks",
    "PrunedGradientTopK",
    "apply_masks",
    "average_bn_stats",
    "average_gradient_tops",
    "candidate_pool",
    "channel_usage",
    "effective_macs",
    "erk_densities",
    "feddip_masks_for_round",
    "feddip_regularizer",
    "gate_model",
    "gated_layers",
    "grow_counts",
    "guidance_masks",
    "guidance_scores",
    "is_reconfiguration_round",
    "load_bn_stats",
    "magnitude_masks",
    "mask_density",
    "model_density",
    "prunable_weights",
    "prune_and_grow",
    "random_erk_masks",
    "recalibrate_bn",
    "reconfigure_rounds",
    "static_keep_channels",
    "topk_pruned_gradients",
]
