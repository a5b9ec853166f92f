"""Adaptive dynamic pruning (Yu et al. 2021; ALGORITHMS.md §1), server half.

- `initial_weights` gates the seeded model (`models.gating.gate_model`: every conv but
  the first, ratio 0.7 by default). The gated model describes itself in its weights (each
  gate's `top_k` travels with them), so `build_from_state` rebuilds it everywhere:
  agents train it, the coordinator evaluates it and counts its MACs, unchanged.
- Every round is FedAvg of the deltas. A channel a sample drops has zero output and zero
  gradient, so its filter only moves when other samples of the batch keep it; what the
  agents upload is the (top-k) change, as for any strategy.
- Agents report, per gated layer, the mean gate of each channel ḡ = E[g·keep], the
  fraction of samples keeping it, and the mean MACs fraction of the conv (active inputs ×
  kept outputs) over their training samples ("aux/gate|usage|macs/<layer>"); the service
  averages them by sample count. Metrics: `density` (channels kept per sample),
  `effective_macs` (expected MACs of the gated network, gate overhead included, over the
  plain model's), `gated_conv_macs` (the gated convs alone: ≈ ratio² inside the network).
- Closing round `total_rounds − finetune_rounds` (the last, by default) the server turns
  the gated network into a static one: `ungate` folds ḡ into each layer (rarely used
  channels get a small scale), then whole channels are removed (torch-pruning, widths
  rounded to `round_to`) until the MACs are `export_macs` of the plain model's, ranking a
  gated layer's channels (plain L2 elsewhere) by `export_rank`: "usage" (default, as
  ALGORITHMS.md §1 says: how often the gates kept each channel on the clients' data,
  ties broken by group L2) or "gate_l2" (ḡ × group L2 magnitude). The result is the
  plain zoo model, pruned: the final evaluation, the `macs` metric and the ONNX export
  see the static structured model. Rounds after it (`finetune_rounds`) fine-tune that
  model with plain FedAvg.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import numpy as np

from strategies.base import AUX_PREFIX, RoundContext, RoundResult, Strategy, Weights
from strategies.dynamic.common import (
    EXPORT_RANKS,
    RATIO,
    SKIP_FIRST,
    STAT_KINDS,
    ZERO_RESIDUAL,
    gated_initial_weights,
    stat_key,
)
from strategies.fedavg import apply_mean_delta

__all__ = ["DynamicPruning", "aux_shapes_for", "gate_stats"]


def aux_shapes_for(widths: Mapping[str, int]) -> dict[str, tuple[int, ...]]:
    """The auxiliary uploads for gated layers of the given widths (layer → C_out)."""
    out: dict[str, tuple[int, ...]] = {}
    for layer, c in widths.items():
        out[AUX_PREFIX + stat_key("gate", layer)] = (c,)
        out[AUX_PREFIX + stat_key("usage", layer)] = (c,)
        out[AUX_PREFIX + stat_key("macs", layer)] = (1,)
    return out


def gate_stats(source: Mapping[str, np.ndarray], widths: Mapping[str, int], *,
               prefix: str = "") -> dict[str, np.ndarray] | None:
    """The statistics of every gated layer from `source` (averaged aux uploads with
    prefix "aux/", or the strategy state with prefix ""), keyed by `stat_key`; None if
    some are missing or no sample was seen (every usage is 0: nobody reported)."""
    keys = [stat_key(kind, layer) for layer in widths for kind in STAT_KINDS]
    if not widths or any(prefix + k not in source for k in keys):
        return None
    stats = {k: np.asarray(source[prefix + k], dtype=np.float32) for k in keys}
    if not any(stats[stat_key("usage", layer)].any() for layer in widths):
        return None
    return stats


class DynamicPruning(Strategy):
    name = "dynamic"

    def __init__(self, *, ratio: float = RATIO, export_macs: float = 0.5, round_to: int = 8,
                 skip_first: bool = SKIP_FIRST, finetune_rounds: int = 0, server_lr: float = 1.0,
                 export_rank: Literal["usage", "gate_l2"] = "usage", zero_residual: bool = ZERO_RESIDUAL) -> None:
        if not 0 < ratio <= 1:
            raise ValueError("ratio must be in (0, 1]")
        if not 0 < export_macs <= 1:
            raise ValueError("export_macs must be in (0, 1]")
        if round_to < 1 or finetune_rounds < 0 or server_lr <= 0:
            raise ValueError("need round_to >= 1, finetune_rounds >= 0 and server_lr > 0")
        if export_rank not in EXPORT_RANKS:
            raise ValueError(f"export_rank must be one of {EXPORT_RANKS}, not {export_rank!r}")
        self.export_rank, self.zero_residual = export_rank, zero_residual
        self.ratio, self.export_macs, self.round_to = ratio, export_macs, round_to
        self.skip_first, self.finetune_rounds, self.server_lr = skip_first, finetune_rounds, server_lr

    # ------------------------------------------------------------------ contract
    def initial_weights(self, weights: Weights, ctx: RoundContext) -> Weights:
        return gated_initial_weights(weights, ctx, ratio=self.ratio, skip_first=self.skip_first,
                                     zero_residual=self.zero_residual)

    def aux_shapes(self, rnd: int, weights: Weights, state: dict[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
        from models.gating import gated_widths

        return aux_shapes_for(gated_widths(weights))  # none once the static model is exported

    def aggregate(self, ctx: RoundContext, weights: Weights, mean_delta: Weights,
                  state: dict[str, np.ndarray]) -> RoundResult:
        from models.gating import TOP_K_KEY, gated_widths

        new, _ = apply_mean_delta(weights, mean_delta, {}, server_lr=self.server_lr, momentum=0.0)
        widths = gated_widths(weights)
        if not widths:  # exported already: fine-tuning the static model
            return RoundResult(new, metrics={"exported": 1})
        for k in weights:  # a gate's width is configuration, never trained
            if k.endswith(TOP_K_KEY):
                new[k] = weights[k]
        stats = gate_stats(ctx.aux, widths, prefix=AUX_PREFIX) or gate_stats(state, widths)
        metrics: dict[str, Any] = {"exported": 0}
        profile = self._macs_profile(ctx, new)
        metrics["dense_macs"] = profile["dense"]
        if stats is not None:
            metrics.update(_gate_metrics(stats, widths, profile))
        if ctx.round < max(1, ctx.total_rounds - self.finetune_rounds):
            return RoundResult(new, state=dict(stats or {}), metrics=metrics)
        if stats is None:  # no agent ever reported: drop the gates unscaled rather than stall
            gates = {layer: np.ones(c, dtype=np.float32) for layer, c in widths.items()}
            usage = gates  # every channel equally used: the L2 tie-break ranks them
            metrics["export_without_stats"] = 1
        else:
            gates = {layer: stats[stat_key("gate", layer)] for layer in widths}
            usage = {layer: stats[stat_key("usage", layer)] for layer in widths}
        exported = self.export(ctx, new, gates, usage)
        metrics.update(exported=1, export_macs=_macs_of(ctx, exported) / profile["dense"])
        return RoundResult(exported, structure_changed=True, reshape=None, metrics=metrics)

    # ------------------------------------------------------------------ torch parts
    def export(self, ctx: RoundContext, weights: Weights, gates: Mapping[str, np.ndarray],
               usage: Mapping[str, np.ndarray] | None = None) -> Weights:
        """The static model: gated `weights` with the mean gates folded in (`ungate`),
        channel-pruned to `export_macs` of the plain model's MACs, a gated layer's channels
        ranked by `export_rank` (`usage`: per layer, the fraction of samples keeping each
        channel; needed for "usage"). Plain zoo keys."""
        import torch

        from models.gating import gated_layers, ungate
        from models.state import build_from_state, to_numpy_state
        from models.zoo import default_image_size
        from pruning.structured import prune_channels

        model = build_from_state(ctx.model, weights, in_channels=ctx.in_channels, num_classes=ctx.num_classes,
                                 image_size=ctx.image_size)
        ranked = gates if self.export_rank == "gate_l2" else usage
        if ranked is None:
            raise ValueError("export_rank 'usage' needs the channels' usage")
        convs = []
        for layer, gated in gated_layers(model).items():
            # torch-pruning slices a parameter's .grad with it: seeded with the ranking's
            # statistic (ḡ or usage) per output channel, the grad keeps telling each
            # surviving channel's value after every cut
            g = torch.as_tensor(np.asarray(ranked[layer]), dtype=torch.float32)
            gated.conv.weight.grad = g[:, None, None, None].expand_as(gated.conv.weight).clone()
            convs.append(gated.conv)
        ungate(model, gates)
        size = ctx.image_size or default_image_size(ctx.in_channels)
        prune_channels(model, torch.zeros(1, ctx.in_channels, size, size), target_macs=self.export_macs,
                       round_to=self.round_to, importance=_gated_importance(convs, self.export_rank))
        for p in model.parameters():
            p.grad = None
        return to_numpy_state(model)

    def _macs_profile(self, ctx: RoundContext, weights: Weights) -> dict[str, Any]:
        """MACs per sample: the plain model's ("dense"), the gated model's computed densely
        ("gated": the gates' own Linear layers are the difference), each gated conv's."""
        from models import build_model, count_macs
        from models.gating import gated_layers
        from models.state import build_from_state

        shape = _input_shape(ctx)
        gated = build_from_state(ctx.model, weights, in_channels=ctx.in_channels, num_classes=ctx.num_classes,
                                 image_size=ctx.image_size)
        gated_total = count_macs(gated, shape)  # its forward also records each layer's output size
        plain = build_model(ctx.model, in_channels=ctx.in_channels, num_classes=ctx.num_classes,
                            image_size=ctx.image_size)
        return {"dense": float(count_macs(plain, shape)), "gated": float(gated_total),
                "layers": {n: float(m.dense_macs()) for n, m in gated_layers(gated).items()}}


def _macs_of(ctx: RoundContext, weights: Weights) -> float:
    from models import count_macs
    from models.state import build_from_state

    model = build_from_state(ctx.model, weights, in_channels=ctx.in_channels, num_classes=ctx.num_classes,
                             image_size=ctx.image_size)
    return float(count_macs(model, _input_shape(ctx)))


def _input_shape(ctx: RoundContext) -> tuple[int, int, int]:
    from models.zoo import default_image_size

    size = ctx.image_size or default_image_size(ctx.in_channels)
    return (ctx.in_channels, size, size)


def _gate_metrics(stats: Mapping[str, np.ndarray], widths: Mapping[str, int],
                  profile: Mapping[str, Any]) -> dict[str, float]:
    """density: gated channels kept per sample; gated_conv_macs: the gated convs' expected
    MACs over their dense MACs; effective_macs: the whole gated network's expected MACs
    (ungated layers dense, gates' Linear layers included) over the plain model's."""
    kept = sum(float(stats[stat_key("usage", layer)].sum()) for layer in widths)
    unused = sum(int((stats[stat_key("gate", layer)] == 0).sum()) for layer in widths)
    channels = sum(widths.values())
    layers: Mapping[str, float] = profile["layers"]
    dense_gated = sum(layers.values())
    expected = sum(float(stats[stat_key("macs", n)][0]) * d for n, d in layers.items())
    dense = float(profile["dense"])
    overhead = float(profile["gated"]) - dense
    return {
        "density": kept / channels,
        "unused_channels": unused / channels,
        "gated_conv_macs": expected / dense_gated if dense_gated else 1.0,
        "effective_macs": (dense - dense_gated + expected + overhead) / dense,
        "gate_overhead_macs": overhead / dense,
    }


def _gated_importance(convs: list[Any], rank: str) -> Any:
    """Group L2 magnitude (torch-pruning's) where no gated conv is in the group; else the
    mean over the group's gated convs of each channel's statistic (read from the conv's
    seeded .grad, see `export`) combined with it: `usage_scores` or `gate_l2_scores`."""
    import torch
    from torch_pruning.pruner import function

    from pruning.structured import IMPORTANCES
    from strategies.dynamic.ops import gate_l2_scores, usage_scores

    base = IMPORTANCES["l2"]()
    gated = {id(c) for c in convs}
    combine = usage_scores if rank == "usage" else gate_l2_scores

    def score(group: Any) -> torch.Tensor:
        scores = base(group)  # (n,) over the root's current channels
        stat, count = torch.zeros_like(scores), 0
        for i, (dep, idxs) in enumerate(group):
            layer = dep.layer
            if dep.pruning_fn != function.prune_conv_out_channels or id(layer) not in gated:
                continue
            grad = layer.weight.grad
            if grad is None or len(idxs) != scores.numel():
                continue
            stat[torch.as_tensor(group[i].root_idxs)] += grad[torch.as_tensor(idxs), 0, 0, 0].to(scores.dtype)
            count += 1
        return combine(stat / count, scores) if count else scores

    return score
