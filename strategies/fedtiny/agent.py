"""Agent half of FedTiny (ALGORITHMS.md §2; server half in `strategies.fedtiny.server`).

- phase "bn": rebuild the candidate pool from the global weights, re-estimate BN
  statistics per candidate on local data (forward passes only), upload them; no training.
- phase "select": evaluate each candidate with the averaged BN statistics from the task,
  upload the mean losses; no training.
- phase "train": the mask is the task's mask artifact (`strategies.masking.agent_masks`,
  the selected candidate after the select round); train with `KeptSGD` (updates and
  momentum at kept coordinates only, so the mask holds without re-masking and no dense
  momentum buffer is held) and upload only kept coordinates. When the task asks for growth, keep the top-n |grad| at
  pruned positions of the named layers over the epoch (O(n) state, `PrunedGradientTopK`)
  and upload them as ``aux/grow/<layer>``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from typing import Any

import numpy as np
import torch
from torch import nn

from models import ImageDataset
from models.training import evaluate, iterate_batches
from pruning.masks import apply_masks
from strategies.base import LocalHooks, Weights, largest_bytes, masks_bytes
from strategies.fedtiny.ops import (
    PrunedGradientTopK,
    fedtiny_weight_names,
    load_bn_stats,
    pool_from_state,
    recalibrate_bn,
)
from strategies.fedtiny.sparse_sgd import KeptSGD, kept_sgd_grad_bytes, kept_sgd_state_bytes
from strategies.masking import agent_masks

__all__ = ["fedtiny_hooks"]
_STATS_BATCH = 64


def fedtiny_hooks(params: Mapping[str, Any], model: nn.Module, weights: Weights, data: ImageDataset) -> LocalHooks:
    phase = params.get("phase", "train")
    if phase in ("bn", "select"):
        spec = params["pool"]
        pool = pool_from_state(weights, fedtiny_weight_names(model), float(spec["density"]), int(spec["k"]),
                               int(spec["seed"]))
        stats = _bn_statistics if phase == "bn" else _candidate_losses
        bn = params.get("bn", {})
        return LocalHooks(train=False, aux=lambda: stats(model, pool, data, bn))
    masks = agent_masks(params, model, weights, fedtiny_weight_names(model))
    apply_masks(model, masks)
    named = dict(model.named_parameters())
    by_param = {id(named[n]): m for n, m in masks.items()}
    built: list[KeptSGD] = []  # the optimizer run_task builds, for the training context

    def optimizer(trainable: list[nn.Parameter], lr: float, momentum: float, wd: float) -> torch.optim.Optimizer:
        # updates (and momentum) at kept coordinates only: the mask holds without re-masking
        built[:] = [KeptSGD(trainable, masks=by_param, lr=lr, momentum=momentum, weight_decay=wd)]
        return built[0]

    def optimizer_memory(frozen: tuple[str, ...], momentum: bool) -> tuple[int, int]:
        trains = {n: p for n, p in named.items() if n not in frozen and p.requires_grad}
        return kept_sgd_grad_bytes(trains, masks), kept_sgd_state_bytes(trains, masks, momentum=momentum)

    grow = {n: int(k) for n, k in params.get("grow", {}).items()}
    extra = masks_bytes(masks)  # the boolean masks (the upload's support, the tops' pruned positions)
    training = _Training(model, masks, grow, built)
    hooks = LocalHooks(optimizer=optimizer, optimizer_memory=optimizer_memory, context=training,
                       upload_support={n: m.cpu().numpy() for n, m in masks.items()})
    if grow:
        hooks.aux = _grow_upload(training, weights)

        def with_tops(frozen: tuple[str, ...]) -> int:
            trains = {n: k for n, k in grow.items() if n not in frozen}  # frozen layers get no tops
            # per step: |grad| scores and the pruned mask of one layer (float + bool), and per
            # layer the running (index int64, sum fp32) buffer of 2n entries, concatenated and
            # de-duplicated while it merges (about 3 copies)
            return (extra + largest_bytes({n: masks[n] for n in trains}, itemsize=5)
                    + sum(3 * 12 * 2 * k for k in trains.values()))

        hooks.extra_memory_frozen = with_tops
        hooks.extra_memory_bytes = with_tops(())
    else:
        hooks.extra_memory_bytes = extra
    return hooks


class _Training:
    """Around local training: `PrunedGradientTopK` over the grown layers that train (a
    memory plan may freeze leading layers, which then get no gradient: their tops upload as
    zeros), then the optimizer's `consume_in_backward`, entered second so that its gradient
    hooks run after the tops' (they need each gradient whole, at pruned positions)."""

    def __init__(self, model: nn.Module, masks: dict[str, torch.Tensor], grow: dict[str, int],
                 built: list[KeptSGD]) -> None:
        self.model, self.masks, self.grow, self.built = model, masks, grow, built
        self.tops: PrunedGradientTopK | None = None
        self._stack = ExitStack()

    def __enter__(self) -> _Training:
        if self.grow:
            trainable = {n for n, p in self.model.named_parameters() if p.requires_grad}
            self.tops = self._stack.enter_context(
                PrunedGradientTopK(self.model, self.masks, {n: k for n, k in self.grow.items() if n in trainable}))
        if self.built:  # built before training starts (run_task); else the step gathers itself
            self._stack.enter_context(self.built[0].consume_in_backward())
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def result(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return self.tops.result() if self.tops is not None else {}


def _masked_copy(model: nn.Module, masks: dict[str, np.ndarray]) -> nn.Module:
    candidate = copy.deepcopy(model)
    apply_masks(candidate, {n: torch.from_numpy(m) for n, m in masks.items()})
    return candidate


def _bn_statistics(model: nn.Module, pool: list[Weights], data: ImageDataset,
                   bn: dict[str, dict[str, list[float]]]) -> Weights:
    out = {}
    for c, masks in enumerate(pool):
        candidate = _masked_copy(model, masks)
        stats = recalibrate_bn(candidate, (x for x, _ in iterate_batches(data, _STATS_BATCH)))
        out.update({f"aux/bn/{c}/{k}": v.numpy() for k, v in stats.items()})
    return out


def _candidate_losses(model: nn.Module, pool: list[Weights], data: ImageDataset,
                      bn: dict[str, dict[str, list[float]]]) -> Weights:
    losses = np.zeros(len(pool), dtype=np.float32)
    for c, masks in enumerate(pool):
        candidate = _masked_copy(model, masks)
        if bn:
            load_bn_stats(candidate, {k: torch.tensor(v, dtype=torch.float32) for k, v in bn[str(c)].items()})
        losses[c] = evaluate(candidate, data).loss
    return {"aux/loss": losses}


def _grow_upload(tops: _Training, weights: Weights) -> Callable[[], Weights]:
    def aux() -> Weights:
        out = {}
        result = tops.result()
        for name in tops.grow:  # every layer the server asked for; a frozen one uploads zeros
            g = np.zeros(weights[name].size, dtype=np.float32)
            if name in result:
                idx, val = result[name]
                g[idx.numpy()] = val.numpy()
            out[f"aux/grow/{name}"] = g.reshape(weights[name].shape)
        return out

    return aux

