"""FedTiny (Huang et al., ICDCS 2023): candidate pool, adaptive BN selection, progressive
prune-and-grow from top-k gradients at pruned positions.

Flow of one federation (the strategy wires these)::

    pool = candidate_pool(prunable_weights(model, include_first=False), d, K, rng)
    # each client, per candidate: apply mask, stats = recalibrate_bn(model, batches)
    # server: avg = average_bn_stats([(stats, n), ...]); load_bn_stats(model, avg)
    # clients evaluate each candidate with avg stats; server keeps the lowest loss one.
    # every ΔT rounds until T_end: clients run training inside PrunedGradientTopK(...),
    # upload .result(); server averages them (average_gradient_tops) and calls
    # prune_and_grow(weights, masks, avg, grow_counts(masks, rate_t)).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from types import TracebackType

import numpy as np
import torch
from torch import nn

from pruning.masks import Masks, magnitude_masks, prunable_weights

__all__ = [
    "GradientTops",
    "PrunedGradientTopK",
    "average_bn_stats",
    "average_gradient_tops",
    "candidate_pool",
    "fedtiny_weight_names",
    "grow_counts",
    "load_bn_stats",
    "pool_from_state",
    "prune_and_grow",
    "recalibrate_bn",
    "topk_pruned_gradients",
]

# name → (flat int64 indices, float values), at most n_grow entries per layer.
GradientTops = dict[str, tuple[torch.Tensor, torch.Tensor]]


# --------------------------------------------------------------------------- candidate pool


def candidate_pool(
    weights: Mapping[str, torch.Tensor],
    target_density: float,
    k: int,
    rng: np.random.Generator,
    *,
    tol: float = 0.02,
    max_tries: int = 10_000,
) -> list[Masks]:
    """K coarse-pruned candidates: layer density target·(1+U(−½,½)) clipped to (0, 1],
    magnitude pruning per layer, resampled until the overall density of `weights` is within
    `tol` (relative: |d − target| ≤ tol·target) of the target.

    Pass only the weights to prune: the first layer, biases and BN stay dense by not being
    in `weights` (use `prunable_weights(model, include_first=False)`).
    """
    if not 0.0 < target_density <= 1.0:
        raise ValueError(f"target_density must be in (0, 1], got {target_density}")
    names = list(weights)
    numel = np.array([weights[n].numel() for n in names], dtype=np.float64)
    pool: list[Masks] = []
    for _ in range(k):
        for _attempt in range(max_tries):
            dens = np.clip(target_density * (1.0 + rng.uniform(-0.5, 0.5, len(names))), 0.0, 1.0)
            kept = np.maximum(np.round(dens * numel), 1.0)  # every layer keeps ≥ 1 weight
            if abs(kept.sum() / numel.sum() - target_density) <= tol * target_density:
                break
        else:
            raise ValueError(f"no candidate within {tol:.0%} of density {target_density} "
                             f"after {max_tries} draws")
        per_layer = {n: float(kept[i] / numel[i]) for i, n in enumerate(names)}
        pool.append(magnitude_masks(weights, per_layer, scope="layer"))
    return pool


# --------------------------------------------------------------------------- BN statistics


def _bn_layers(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


@torch.no_grad()
def recalibrate_bn(
    model: nn.Module, data_batches: Iterable[torch.Tensor | Sequence[torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """Re-estimate every BN layer's running mean/var on `data_batches` (inputs, or (x, y)
    pairs) with forward passes only, averaging over batches (momentum=None), in place.

    Returns the new statistics keyed by state_dict name (``"bn1.running_mean"``, …).
    The model's mode and BN momenta are restored; weights are untouched.
    """
    bns = _bn_layers(model)
    was_training = model.training
    momenta = {n: m.momentum for n, m in bns.items()}
    for m in bns.values():
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over the batches seen
    model.train()
    try:
        for batch in data_batches:
            x = batch if isinstance(batch, torch.Tensor) else batch[0]
            model(x)
    finally:
        model.train(was_training)
        for n, m in bns.items():
            m.momentum = momenta[n]
    stats = {}
    for n, m in bns.items():
        prefix = f"{n}." if n else ""
        assert m.running_mean is not None and m.running_var is not None
        stats[prefix + "running_mean"] = m.running_mean.detach().clone()
        stats[prefix + "running_var"] = m.running_var.detach().clone()
    return stats


def average_bn_stats(
    client_stats: Sequence[tuple[Mapping[str, torch.Tensor], int]],
) -> dict[str, torch.Tensor]:
    """Sample-count-weighted mean of clients' BN statistics, as FedTiny's server does
    (means and variances averaged alike; between-client spread of the means is not added,
    consistently with BN's own averaging of per-batch variances)."""
    total = sum(n for _, n in client_stats)
    if not client_stats or total <= 0:
        raise ValueError("average_bn_stats needs at least one client with samples")
    keys = client_stats[0][0].keys()
    return {k: sum((s[k].double() * (n / total) for s, n in client_stats),
                   torch.zeros((), dtype=torch.float64)).to(client_stats[0][0][k].dtype)
            for k in keys}


@torch.no_grad()
def load_bn_stats(model: nn.Module, stats: Mapping[str, torch.Tensor]) -> None:
    """Copy BN running statistics (as returned by `recalibrate_bn`) into `model`."""
    buffers = dict(model.named_buffers())
    for k, v in stats.items():
        buffers[k].copy_(v)


# --------------------------------------------------------------------------- prune and grow


def grow_counts(masks: Mapping[str, torch.Tensor], rate: float) -> dict[str, int]:
    """n_grow per layer = ceil(rate · nonzeros), capped at the pruned count (and 0 at rate 0)."""
    out = {}
    for name, m in masks.items():
        nonzero = int(m.sum())
        out[name] = min(math.ceil(rate * nonzero), m.numel() - nonzero, nonzero) if rate > 0 else 0
    return out


@torch.no_grad()
def topk_pruned_gradients(
    grads: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor],
    n_grow_per_layer: Mapping[str, int],
) -> GradientTops:
    """Per layer, the n largest-|grad| entries at currently pruned positions (mask False),
    as (flat indices, gradient values). Never more than n entries per layer."""
    out: GradientTops = {}
    for name, n in n_grow_per_layer.items():
        g = grads[name].detach().flatten()
        pruned = ~masks[name].flatten()
        n = min(n, int(pruned.sum()))
        # Score −1 at kept positions: |g| ≥ 0 elsewhere, so they are never chosen while
        # n ≤ pruned count.
        scores = g.abs().masked_fill(~pruned, -1.0)
        idx = torch.topk(scores, n).indices if n > 0 else torch.zeros(0, dtype=torch.long)
        out[name] = (idx, g[idx].clone())
    return out


class PrunedGradientTopK:
    """Accumulate top-|grad| entries at pruned positions over a local epoch, without dense
    gradient state between steps.

    A post-accumulate-grad hook on each masked weight runs after every backward: it takes
    the top `buffer_factor·n` |grad| at pruned positions of this step (a transient, freed at
    once) and merges them into a running buffer of at most `buffer_factor·n` (index, sum)
    pairs: tracked indices add this step's gradient exactly; new indices enter with this
    step's value; the buffer is cut back to the largest |sum|. Trade-off (documented, as
    FedTiny's budget demands): an index that only becomes large late, or that was evicted,
    misses earlier steps' contributions, so the result approximates the top-n of the
    epoch-summed gradient; the memory is O(n) per layer instead of O(weights).

    Use::

        with PrunedGradientTopK(model, masks, grow_counts(masks, rate)) as tops:
            train_epochs(model, data, optimizer=opt, epochs=E)
        upload(tops.result())  # mean gradient per step at the top-n indices
    """

    def __init__(self, model: nn.Module, masks: Mapping[str, torch.Tensor],
                 n_grow: Mapping[str, int], *, buffer_factor: int = 2) -> None:
        self.model = model
        self.masks = dict(masks)
        self.n_grow = dict(n_grow)
        self.capacity = {n: max(0, buffer_factor * k) for n, k in self.n_grow.items()}
        self._buffers: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._steps: dict[str, int] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _update(self, name: str, grad: torch.Tensor) -> None:
        cap = self.capacity[name]
        step = topk_pruned_gradients({name: grad}, self.masks, {name: cap})[name]
        idx, val = self._buffers.get(name, (torch.zeros(0, dtype=torch.long), torch.zeros(0)))
        merged_idx = torch.cat([idx, step[0]])
        merged_val = torch.cat([val, step[1].to(val.dtype)])
        uniq, inverse = torch.unique(merged_idx, return_inverse=True)
        sums = torch.zeros(len(uniq), dtype=merged_val.dtype).index_add_(0, inverse, merged_val)
        keep = torch.topk(sums.abs(), min(cap, len(uniq))).indices
        self._buffers[name] = (uniq[keep], sums[keep])
        self._steps[name] = self._steps.get(name, 0) + 1

    def __enter__(self) -> PrunedGradientTopK:
        params = dict(self.model.named_parameters())
        for name in self.n_grow:
            p = params[name]

            def hook(param: torch.Tensor, name: str = name) -> None:
                if param.grad is not None:
                    self._update(name, param.grad)

            self._handles.append(p.register_post_accumulate_grad_hook(hook))
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def result(self) -> GradientTops:
        """Top-n (index, mean gradient per step) per layer, largest |value| first."""
        out: GradientTops = {}
        for name, n in self.n_grow.items():
            idx, sums = self._buffers.get(name, (torch.zeros(0, dtype=torch.long), torch.zeros(0)))
            steps = max(self._steps.get(name, 0), 1)
            order = torch.topk(sums.abs(), min(n, len(sums))).indices
            out[name] = (idx[order], sums[order] / steps)
        return out


def average_gradient_tops(client_tops: Sequence[GradientTops],
                          weights: Sequence[float] | None = None) -> GradientTops:
    """Server side: (weighted) mean of clients' sparse gradient tops; an index a client did
    not send counts as 0 for that client. Returns the union of indices per layer."""
    if not client_tops:
        raise ValueError("average_gradient_tops needs at least one client")
    w = [1.0] * len(client_tops) if weights is None else list(weights)
    total = sum(w)
    out: GradientTops = {}
    for name in client_tops[0]:
        idx = torch.cat([c[name][0] for c in client_tops])
        val = torch.cat([c[name][1].double() * (wi / total) for c, wi in zip(client_tops, w, strict=True)])
        uniq, inverse = torch.unique(idx, return_inverse=True)
        out[name] = (uniq, torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse, val).float())
    return out


@torch.no_grad()
def prune_and_grow(
    weights: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor],
    avg_grad_tops: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    n_grow: Mapping[str, int],
    *,
    grow_lr: float = 0.0,
) -> tuple[Masks, dict[str, torch.Tensor]]:
    """One FedTiny adjustment: per layer in `n_grow`, grow the n largest-|avg grad|
    positions among those pruned now (new weights = −grow_lr·grad: 0 by default, as in
    the paper) and drop the n smallest-|w| active weights (set to 0), so each layer's
    density is unchanged. n is cut to the number of growable candidates with a nonzero
    gradient. Returns new masks and new weights, zero wherever the new mask is False
    (every masked layer, adjusted or not); inputs are untouched.
    Layers not in `n_grow` pass through (FedTiny adjusts one layer/block at a time).
    """
    new_masks = {k: v.clone() for k, v in masks.items()}
    new_weights = {k: v.detach().clone() for k, v in weights.items()}
    for name, n in n_grow.items():
        mask = new_masks[name].flatten()
        w = new_weights[name].view(-1)
        idx, val = avg_grad_tops.get(name, (torch.zeros(0, dtype=torch.long), torch.zeros(0)))
        growable = ~mask[idx] & (val != 0)  # only positions pruned before this step
        idx, val = idx[growable], val[growable]
        n = min(n, len(idx), int(mask.sum()))
        if n <= 0:
            continue
        top = torch.topk(val.abs(), n).indices
        grow = idx[top]
        active_scores = w.abs().masked_fill(~mask, float("inf"))
        drop = torch.topk(active_scores, n, largest=False).indices
        mask[drop] = False
        w[drop] = 0.0
        mask[grow] = True
        w[grow] = -grow_lr * val[top].to(w.dtype)
        new_masks[name] = mask.view_as(masks[name])
    for name, mask in new_masks.items():
        new_weights[name].mul_(mask)
    return new_masks, new_weights


# --------------------------------------------------------------------------- shared by both halves


def fedtiny_weight_names(model: nn.Module) -> list[str]:
    """The weights FedTiny prunes: conv and linear weights except the first layer (biases
    and BN stay dense). Server and agents derive the same list from the same model."""
    return list(prunable_weights(model, include_first=False))


def pool_from_state(
    weights: Mapping[str, np.ndarray], names: Sequence[str], target_density: float, k: int, seed: int,
) -> list[dict[str, np.ndarray]]:
    """The candidate pool as numpy bool masks, a pure function of the global weights and
    the seed: agents rebuild exactly the server's pool instead of downloading K masks."""
    rng = np.random.default_rng(seed)
    pool = candidate_pool({n: torch.from_numpy(np.asarray(weights[n])) for n in names}, target_density, k, rng)
    return [{n: m.numpy() for n, m in masks.items()} for masks in pool]
