"""Adaptive dynamic pruning's channel gates live in `models.gating` (a model
transformation the coordinator needs too); re-exported here for the agent's pruning API."""

from models.gating import (
    ChannelGate,
    GatedConvBN,
    channel_usage,
    effective_macs,
    gate_model,
    gated_layers,
    gated_macs_fraction,
    mean_gate,
    reset_gate_stats,
    static_keep_channels,
    ungate,
)

__all__ = [
    "ChannelGate",
    "GatedConvBN",
    "channel_usage",
    "effective_macs",
    "gate_model",
    "gated_layers",
    "gated_macs_fraction",
    "mean_gate",
    "reset_gate_stats",
    "static_keep_channels",
    "ungate",
]
