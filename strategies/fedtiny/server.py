"""FedTiny (Huang et al., ICDCS 2023; ALGORITHMS.md §2), server half.

Round 0 (`initial_weights`, optional): with ``pretrain`` the server first trains the seeded
model briefly on a tiny labelled set the coordinator loads at create (an .npz the operator
holds, or the first samples of each class of the federation's own training split as a
benchmark's stand-in), so the pool prunes trained weights (`strategies.fedtiny.pretrain`).
Agents download that model: they do not hold the set to rebuild it.

Setup rounds (statistics only, on top of the federation's training rounds):

- **bn** (models with BatchNorm only): every sampled agent rebuilds the candidate pool —
  K coarse magnitude-pruned masks, a pure function of the global weights and the seed
  (`pool_from_state`), so no mask travels — re-estimates BN running mean/var per
  candidate on its local data (forward passes only) and uploads them as ``aux/bn/<k>/…``;
  the service averages them by sample count.
- **select**: agents evaluate each candidate with the averaged BN statistics (sent in the
  task) and upload their mean losses (``aux/loss``, K values); the server keeps the
  lowest-loss candidate with its averaged BN statistics: w ← w⊙m.

Training rounds t = 1..T: FedAvg over the kept coordinates (agents re-apply the mask after
every step and upload only kept coordinates). Every ΔT rounds until T_end one layer — or
one block — is adjusted, last first: the task asks for the top-n_grow |grad| at pruned
positions of that layer (n_grow = ceil(rate_t·nonzeros), rate_t cosine-decayed from
`grow_rate` to 0, `pruning.schedules.CosineGrowRate`), the service averages them, and the server drops the n_grow
smallest active weights and grows the n_grow largest-gradient positions.

Choice (documented deviation): grown weights start at −grow_lr·ḡ (one SGD step along the
averaged gradient) instead of exactly 0 (agents once read the mask from the global model's
zeros; they now read it from the version's mask artifact, and the start is kept); the
value is one step's size, far below the active weights.

The selection round's broadcast is "candidate k": the chosen candidate's mask is the new
version's mask artifact, which both sides apply after the patch, so the model patch
carries only the averaged BN statistics (`coordinator.broadcast.make_broadcast`).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np

from models.state import is_bn_stat
from pruning.schedules import CosineGrowRate
from strategies.base import LabelledSetRequest, RoundContext, RoundResult, Strategy, Weights
from strategies.fedavg import apply_mean_delta
from strategies.fedtiny.pretrain import PretrainSpec, pretrained_initial_weights
from strategies.masking import (
    apply_np_masks,
    density_of,
    masks_from_state,
    masks_to_state,
    pruned_names,
)

__all__ = ["FedTiny", "adjusted_layers", "has_bn", "layer_groups"]

Phase = Literal["bn", "select", "train"]


def has_bn(weights: Weights) -> bool:
    return any(is_bn_stat(k) for k in weights)


def bn_keys(weights: Weights) -> list[str]:
    return [k for k in weights if is_bn_stat(k)]


def layer_groups(names: list[str], granularity: Literal["layer", "block"]) -> list[list[str]]:
    """Adjustment units in model order: single layers, or blocks (top-level module, e.g.
    a ResNet stage ``layer2``; ``features``/``classifier`` for the small CNNs)."""
    if granularity == "layer":
        return [[n] for n in names]
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(n.split(".")[0], []).append(n)
    return list(groups.values())


def adjusted_layers(t: int, groups: list[list[str]], every: int, t_end: int) -> list[str]:
    """Layers adjusted when closing training round t: the k-th adjustment (t = k·ΔT)
    takes group k of the groups in reverse order (last first), cycling."""
    if t < every or t % every or t > t_end or not groups:
        return []
    k = t // every - 1
    return groups[::-1][k % len(groups)]


class FedTiny(Strategy):
    name = "fedtiny"

    def __init__(self, *, density: float = 0.1, pool_size: int = 5, every: int | None = None,
                 t_end: int | None = None, grow_rate: float = 0.1, granularity: Literal["layer", "block"] = "layer",
                 grow_lr: float = 0.05, seed: int = 0, server_lr: float = 1.0,
                 pretrain: dict[str, Any] | None = None) -> None:
        if not 0.0 < density <= 1.0:
            raise ValueError("density must be in (0, 1]")
        if pool_size < 1 or (every is not None and every < 1) or (t_end is not None and t_end < 1):
            raise ValueError("need pool_size >= 1, every >= 1, t_end >= 1")
        if not 0.0 <= grow_rate <= 1.0 or grow_lr < 0 or server_lr <= 0:
            raise ValueError("need 0 <= grow_rate <= 1, grow_lr >= 0, server_lr > 0")
        if granularity not in ("layer", "block"):
            raise ValueError("granularity must be 'layer' or 'block'")
        self.density, self.pool_size, self.every_, self.t_end_ = density, pool_size, every, t_end
        self.initial_rate, self.granularity, self.grow_lr = grow_rate, granularity, grow_lr
        self.seed, self.server_lr = seed, server_lr
        # the server's brief pre-training on a tiny labelled set (strategies.fedtiny.pretrain)
        self.pretrain = None if pretrain is None else PretrainSpec.from_params(pretrain)

    # ------------------------------------------------------------------ round 0
    def labelled_set(self) -> LabelledSetRequest | None:
        return None if self.pretrain is None else self.pretrain.request()

    def initial_weights(self, weights: Weights, ctx: RoundContext) -> Weights:
        # agents cannot rebuild this (they lack the tiny set): the agent half declares no
        # initial_weights, so they download the round-0 model
        return pretrained_initial_weights(weights, ctx, self.pretrain, seed=self.seed)

    # ------------------------------------------------------------------ schedule
    def setup_rounds(self, weights: Weights) -> int:
        return 2 if has_bn(weights) else 1

    def phase(self, rnd: int, weights: Weights) -> Phase:
        setup = self.setup_rounds(weights)
        if rnd > setup:
            return "train"
        return "select" if rnd == setup else "bn"

    def every(self, total: int) -> int:
        """ΔT: 10 as in the paper for long runs, every round for short ones."""
        return self.every_ or max(1, min(10, total // 30))

    def t_end(self, total: int) -> int:
        return self.t_end_ or max(1, math.ceil(0.8 * total))

    def grow_plan(self, t: int, total: int, names: list[str], masks: dict[str, np.ndarray]) -> dict[str, int]:
        """n_grow per adjusted layer when closing training round t (empty: no adjustment)."""
        import torch

        from strategies.fedtiny.ops import grow_counts

        layers = adjusted_layers(t, layer_groups(names, self.granularity), self.every(total), self.t_end(total))
        rate = CosineGrowRate(self.t_end(total), self.initial_rate)(t)
        plan = grow_counts({n: torch.from_numpy(masks[n]) for n in layers}, rate)
        return {n: k for n, k in plan.items() if k > 0}

    # ------------------------------------------------------------------ what agents do
    def pool_spec(self) -> dict[str, Any]:
        return {"k": self.pool_size, "density": self.density, "seed": self.seed}

    def task_params(self, rnd: int, weights: Weights, state: dict[str, np.ndarray]) -> dict[str, Any]:
        phase = self.phase(rnd, weights)
        if phase == "bn":
            return {"phase": "bn", "pool": self.pool_spec()}
        if phase == "select":
            bn = {str(c): {k: state[f"bn/{c}/{k}"].tolist() for k in bn_keys(weights)}
                  for c in range(self.pool_size)} if has_bn(weights) else {}
            return {"phase": "select", "pool": self.pool_spec(), "bn": bn}
        return {"phase": "train", "grow": self._grow(rnd, weights, state)}

    def aux_shapes(self, rnd: int, weights: Weights, state: dict[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
        phase = self.phase(rnd, weights)
        if phase == "bn":
            return {f"aux/bn/{c}/{k}": weights[k].shape for c in range(self.pool_size) for k in bn_keys(weights)}
        if phase == "select":
            return {"aux/loss": (self.pool_size,)}
        return {f"aux/grow/{n}": weights[n].shape for n in self._grow(rnd, weights, state)}

    def _grow(self, rnd: int, weights: Weights, state: dict[str, np.ndarray]) -> dict[str, int]:
        masks = masks_from_state(state)
        if not masks or "total_rounds" not in state:
            return {}
        t = rnd - self.setup_rounds(weights)
        names = [n for n in weights if n in masks]  # model order: "last first" needs it
        return self.grow_plan(t, int(state["total_rounds"][0]), names, masks)

    # ------------------------------------------------------------------ aggregation
    def aggregate(self, ctx: RoundContext, weights: Weights, mean_delta: Weights,
                  state: dict[str, np.ndarray]) -> RoundResult:
        phase = self.phase(ctx.round, weights)
        if phase == "bn":
            new_state = {**state, **{k.replace("aux/", "", 1): v for k, v in ctx.aux.items()}}
            return RoundResult(weights, state=new_state, metrics={"setup": 1, "density": 1.0})
        if phase == "select":
            return self._select(ctx, weights, state)
        return self._train(ctx, weights, mean_delta, state)

    def _select(self, ctx: RoundContext, weights: Weights, state: dict[str, np.ndarray]) -> RoundResult:
        from strategies.fedtiny.ops import pool_from_state

        names = fedtiny_names(ctx, weights)
        losses = ctx.aux.get("aux/loss")
        if losses is None or ctx.participants == 0:
            raise ValueError("FedTiny selection round closed without candidate losses")
        chosen = int(np.argmin(losses))
        masks = pool_from_state(weights, names, self.density, self.pool_size, self.seed)[chosen]
        new = apply_np_masks(weights, masks)
        for k in bn_keys(weights):  # the chosen candidate's averaged BN statistics
            new[k] = state[f"bn/{chosen}/{k}"].astype(np.float32)
        metrics = {"setup": 1, "density": density_of(new, names), "chosen": chosen,
                   "candidate_loss_min": float(losses.min()), "candidate_loss_max": float(losses.max())}
        new_state = {**masks_to_state(masks), "total_rounds": np.array([ctx.total_rounds], dtype=np.int64)}
        return RoundResult(new, state=new_state, metrics=metrics)

    def _train(self, ctx: RoundContext, weights: Weights, mean_delta: Weights,
               state: dict[str, np.ndarray]) -> RoundResult:
        names = fedtiny_names(ctx, weights)
        masks = masks_from_state(state)
        new, _ = apply_mean_delta(weights, mean_delta, {}, server_lr=self.server_lr, momentum=0.0)
        plan = self._grow(ctx.round, weights, state)
        changed = 0
        if plan:
            import torch

            from strategies.fedtiny.ops import prune_and_grow

            tops = {}
            for n in plan:
                g = ctx.aux.get(f"aux/grow/{n}", np.zeros_like(weights[n])).reshape(-1)
                idx = np.flatnonzero(g)
                tops[n] = (torch.from_numpy(idx), torch.from_numpy(g[idx]))
            t_masks, t_weights = prune_and_grow(
                {n: torch.from_numpy(new[n]) for n in plan}, {n: torch.from_numpy(masks[n]) for n in plan},
                tops, plan, grow_lr=self.grow_lr)
            for n in plan:
                changed += int(np.count_nonzero(t_masks[n].numpy() != masks[n]))
                masks[n] = t_masks[n].numpy()
                new[n] = t_weights[n].numpy()
        new = apply_np_masks(new, masks)
        metrics = {"density": density_of(new, names), "adjusted": len(plan),
                   "n_grow": sum(plan.values()), "mask_changes": changed}
        return RoundResult(new, state={**masks_to_state(masks), "total_rounds": state["total_rounds"]},
                           metrics=metrics)



def fedtiny_names(ctx: RoundContext, weights: Weights) -> list[str]:
    """The pruned weights' names, from the built model (`fedtiny_weight_names`)."""
    from strategies.fedtiny.ops import fedtiny_weight_names

    return pruned_names(ctx, weights, fedtiny_weight_names)
