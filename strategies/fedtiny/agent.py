"""Agent half of FedTiny (ALGORITHMS.md §2; server half in `strategies.fedtiny.server`).

- phase "bn": rebuild the candidate pool from the global weights, re-estimate BN
  statistics per candidate on local data (forward passes only), upload them; no training.
- phase "select": evaluate each candidate with the averaged BN statistics from the task,
  upload the mean losses; no training.
- phase "train": the global model's zeros are the mask; re-apply it after every step and
  upload only kept coordinates. When the task asks for growth, keep the top-n |grad| at
  pruned positions of the named layers over the epoch (O(n) state, `PrunedGradientTopK`)
  and upload them as ``aux/grow/<layer>``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from models import ImageDataset
from models.training import evaluate, iterate_batches
from pruning.masks import apply_masks
from strategies.base import LocalHooks, Weights
from strategies.fedtiny.ops import (
    PrunedGradientTopK,
    fedtiny_weight_names,
    load_bn_stats,
    pool_from_state,
    recalibrate_bn,
)

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
    masks = {n: torch.from_numpy(np.asarray(weights[n]) != 0) for n in fedtiny_weight_names(model)}
    apply_masks(model, masks)

    def after_step() -> None:
        apply_masks(model, masks)

    grow = {n: int(k) for n, k in params.get("grow", {}).items()}
    hooks = LocalHooks(after_step=after_step, upload_support={n: m.numpy() for n, m in masks.items()})
    if grow:
        tops = PrunedGradientTopK(model, masks, grow)
        hooks.context = tops
        hooks.aux = _grow_upload(tops, weights)
    return hooks


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


def _grow_upload(tops: PrunedGradientTopK, weights: Weights) -> Callable[[], Weights]:
    def aux() -> Weights:
        out = {}
        for name, (idx, val) in tops.result().items():
            g = np.zeros(weights[name].size, dtype=np.float32)
            g[idx.numpy()] = val.numpy()
            out[f"aux/grow/{name}"] = g.reshape(weights[name].shape)
        return out

    return aux

