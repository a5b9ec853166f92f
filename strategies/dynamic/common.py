"""What both halves of adaptive dynamic pruning share: the names of the per-layer gate
statistics the agents upload ("aux/" + `stat_key(kind, layer)`), the defaults of the
params the agent half reads, and the round-0 model (the seeded model, gated), which the
server half installs and agents rebuild locally."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from strategies.base import RoundContext, Weights

__all__ = ["EXPORT_RANKS", "GATE_SEED", "RATIO", "SKIP_FIRST", "STAT_KINDS", "ZERO_RESIDUAL", "gated_initial_weights",
           "initial_weights_from_params", "stat_key"]

STAT_KINDS = ("gate", "usage", "macs")  # per layer: ḡ (C,), usage fraction (C,), MACs fraction (1,)
GATE_SEED = 0  # gate initialisation (the convs' init is the federation's seeded model)
RATIO, SKIP_FIRST = 0.7, True  # channels kept per sample; the first conv stays ungated
ZERO_RESIDUAL = True  # residual branches start as the identity (`models.gating.zero_init_residual`)
EXPORT_RANKS = ("usage", "gate_l2")  # how the static export ranks a gated layer's channels (`ops`)


def stat_key(kind: str, layer: str) -> str:
    """Name of one statistic of one gated layer, without the "aux/" of the upload."""
    return f"{kind}/{layer}"


def gated_initial_weights(weights: Weights, ctx: RoundContext, *, ratio: float, skip_first: bool,
                          zero_residual: bool = ZERO_RESIDUAL) -> Weights:
    """The seeded model with every conv but (optionally) the first gated at `ratio`; with
    `zero_residual`, each residual branch's last BN starts at γ = 0 (`zero_init_residual`:
    without it the gates' gain diverges ResNet-32 at init)."""
    import torch
    from torch import nn

    from models.gating import gate_model, zero_init_residual
    from models.state import build_from_state, to_numpy_state

    model = build_from_state(ctx.model, weights, in_channels=ctx.in_channels, num_classes=ctx.num_classes,
                             image_size=ctx.image_size)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    skip = tuple(convs[:1]) if skip_first else ()
    if zero_residual:
        zero_init_residual(model)
    # a private generator: agents in threads of one process (tests) draw concurrently
    gate_model(model, ratio, skip=skip, generator=torch.Generator().manual_seed(GATE_SEED))
    return to_numpy_state(model)


def initial_weights_from_params(params: Mapping[str, Any], weights: Weights, ctx: RoundContext) -> Weights:
    """The agent's rebuild of the server's `DynamicPruning.initial_weights`, from the task params."""
    return gated_initial_weights(weights, ctx, ratio=float(params.get("ratio", RATIO)),
                                 skip_first=bool(params.get("skip_first", SKIP_FIRST)),
                                 zero_residual=bool(params.get("zero_residual", ZERO_RESIDUAL)))
