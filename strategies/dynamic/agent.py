"""Agent-side half of adaptive dynamic pruning (ALGORITHMS.md §1; server half:
`strategies.dynamic.server`).

The global model arrives gated (`build_from_state` rebuilds the gates from the weights),
so local training is ordinary: a channel a sample drops has zero output and zero gradient.
The hooks only clear the gates' statistics before training and report, after it, per
gated layer: the mean gate of each channel (E[g·keep], the scale the server folds into
the static export), the fraction of samples that kept it, and the conv's mean MACs
fraction — all over the training samples this agent saw, so that the service's
sample-weighted mean is the mean over every client's samples.

The upload needs nothing special: `run_task` sends only coordinates that changed (dense
fp32) or the top-k change; filters no sample kept did not change (unless momentum or
weight decay moves them).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from torch import nn

from models import ImageDataset
from models.gating import (
    channel_usage,
    gated_layers,
    gated_macs_fraction,
    mean_gate,
    reset_gate_stats,
)
from strategies.base import AUX_PREFIX, LocalHooks
from strategies.dynamic.common import stat_key

__all__ = ["dynamic_hooks", "gate_report"]


def gate_report(model: nn.Module) -> dict[str, np.ndarray]:
    """The auxiliary uploads: "aux/gate|usage|macs/<layer>" for every gated layer."""
    gates, usage, macs = mean_gate(model), channel_usage(model), gated_macs_fraction(model)
    out: dict[str, np.ndarray] = {}
    for layer in gated_layers(model):
        out[AUX_PREFIX + stat_key("gate", layer)] = gates[layer].numpy().astype(np.float32)
        out[AUX_PREFIX + stat_key("usage", layer)] = usage[layer].numpy().astype(np.float32)
        out[AUX_PREFIX + stat_key("macs", layer)] = np.array([macs[layer]], dtype=np.float32)
    return out


def dynamic_hooks(params: Mapping[str, Any], model: nn.Module, weights: dict[str, np.ndarray],
                  data: ImageDataset) -> LocalHooks:
    if not gated_layers(model):
        return LocalHooks()  # the static model after the export: plain FedAvg fine-tuning
    reset_gate_stats(model)  # forward passes before training (memory planning) do not count
    return LocalHooks(aux=lambda: gate_report(model))

