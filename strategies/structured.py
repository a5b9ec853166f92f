"""Structured progressive pruning (the system's default): FedAvg aggregation, and on a
schedule the server removes whole channels (dependency-aware, via torch-pruning; widths
rounded to the SIMD block) until the model's MACs reach `target_macs` of the dense model.
Agents receive the smaller structure and train it, so compute and memory shrink for real.

Pruning is spread over `prune_steps` rounds starting after round `start_round`, each
step cutting the same MACs factor (target^(1/steps)), last layers first as FedTiny does.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from strategies.base import RoundContext, RoundResult, Strategy, Weights
from strategies.fedavg import apply_mean_delta

__all__ = ["StructuredPruning", "step_targets"]


def step_targets(target_macs: float, steps: int) -> list[float]:
    """MACs fraction of the dense model after each pruning step (geometric)."""
    return [target_macs ** ((i + 1) / steps) for i in range(steps)]


class StructuredPruning(Strategy):
    name = "structured"

    def __init__(self, *, target_macs: float = 0.25, start_round: int = 1, prune_steps: int = 3,
                 every: int = 1, round_to: int = 8, importance: str = "l2",
                 server_lr: float = 1.0, server_momentum: float = 0.0) -> None:
        if not 0 < target_macs <= 1 or prune_steps < 1 or every < 1 or start_round < 1:
            raise ValueError("need 0 < target_macs <= 1, prune_steps >= 1, every >= 1, start_round >= 1")
        self.target_macs, self.start_round, self.prune_steps = target_macs, start_round, prune_steps
        self.every, self.round_to, self.importance = every, round_to, importance
        self.server_lr, self.server_momentum = server_lr, server_momentum

    def prune_step(self, rnd: int) -> int | None:
        """Index of the pruning step done when closing round `rnd`, or None."""
        offset = rnd - self.start_round
        if offset < 0 or offset % self.every:
            return None
        step = offset // self.every
        return step if step < self.prune_steps else None

    def aggregate(self, ctx: RoundContext, weights: Weights, mean_delta: Weights, state: dict[str, np.ndarray]) -> RoundResult:
        new, new_state = apply_mean_delta(weights, mean_delta, state, server_lr=self.server_lr, momentum=self.server_momentum)
        step = self.prune_step(ctx.round)
        dense_macs = float(state["dense_macs"][0]) if "dense_macs" in state else None
        if step is None:
            return RoundResult(new, state=_keep(state, new_state), metrics=self._metrics(ctx, new, dense_macs))
        pruned, reshape, dense_macs = self._prune(ctx, new, step, dense_macs)
        new_state = {"dense_macs": np.array([dense_macs])}  # momentum buffers no longer fit
        return RoundResult(pruned, structure_changed=reshape is not None, reshape=reshape or None, state=new_state,
                           metrics=self._metrics(ctx, pruned, dense_macs))

    def _prune(self, ctx: RoundContext, weights: Weights, step: int,
               dense_macs: float | None) -> tuple[Weights, dict[str, list[list[int] | None]] | None, float]:
        import torch  # the pure maths above needs no torch; the pruning itself does

        from models import count_macs
        from models.state import build_from_state, to_numpy_state
        from models.zoo import default_image_size
        from pruning.structured import kept_reshape, prune_channels

        model = build_from_state(ctx.model, weights, in_channels=ctx.in_channels,
                                 num_classes=ctx.num_classes, image_size=ctx.image_size)
        size = ctx.image_size or default_image_size(ctx.in_channels)
        shape = (ctx.in_channels, size, size)
        current = count_macs(model, shape)
        if dense_macs is None:
            dense_macs = float(current)
        goal = step_targets(self.target_macs, self.prune_steps)[step] * dense_macs
        if current <= goal:
            return weights, None, dense_macs
        # torch-pruning slices each parameter's .grad with the same indices as the
        # parameter: seeded with flat positions, the grads come out as the kept positions
        for p in model.parameters():
            p.grad = torch.arange(p.numel(), dtype=torch.float32).reshape(p.shape)
        prune_channels(model, torch.zeros(1, *shape), target_macs=goal / current,
                       round_to=self.round_to, importance=self.importance)
        pruned = to_numpy_state(model)
        # every tensor whose shape changed must have its kept indices, or the agents download
        reshape = kept_reshape(model, weights)
        if not all(n in reshape for n in pruned if pruned[n].shape != weights[n].shape):
            reshape = {}
        return pruned, reshape, dense_macs

    def _metrics(self, ctx: RoundContext, weights: Weights, dense_macs: float | None) -> dict[str, Any]:
        return {"dense_macs": dense_macs} if dense_macs else {}


def _keep(state: dict[str, np.ndarray], new_state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {**new_state, **({"dense_macs": state["dense_macs"]} if "dense_macs" in state else {})}
