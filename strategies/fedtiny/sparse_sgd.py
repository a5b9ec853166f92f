"""SGD whose state for masked weights lives only at the kept coordinates (FedTiny's local
training at low density, ALGORITHMS.md §2: "within memory budgets").

torch.optim.SGD with momentum holds one dense buffer per weight, and the mask is then
re-applied after every step (a float copy of the mask, and momentum piling up at pruned
positions only to be zeroed away). At density d the kept coordinates are d·n of n: here a
masked weight's state is its kept flat indices (int32) and a momentum value per kept
coordinate (fp32), 8·d·n bytes instead of 4·n, and the update touches only those
coordinates, so pruned weights stay exactly 0 without re-masking. The gradients are
consumed by the step (set to None), so the dense gradients of one step do not live on
through the next forward pass; inside `consume_in_backward()` a masked weight's gradient
is cut to its kept coordinates as soon as backward has produced it, so at most one masked
layer's dense gradient exists at a time (hooks registered earlier on the same weight, such
as `PrunedGradientTopK`'s, still see it whole: hooks run in registration order).

Unmasked parameters (first layer, biases, BN) get plain SGD with a dense buffer. The
update is torch.optim.SGD's (dampening 0, no Nesterov; weight decay added to the gradient):
on kept coordinates the two agree exactly (`tests/strategies/test_fedtiny_sparse_sgd.py`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["KeptSGD", "kept_sgd_grad_bytes", "kept_sgd_state_bytes"]

_INDEX = torch.int32  # flat indices of one layer: < 2^31 elements in any model here


class KeptSGD(torch.optim.Optimizer):
    """`torch.optim.SGD(params, lr, momentum, weight_decay)` where every parameter in
    `masks` (keyed by the parameter object's id) is updated, and holds momentum, only where
    its boolean mask is True. `step` consumes the gradients (sets `.grad` to None)."""

    def __init__(self, params: Iterable[nn.Parameter], *, masks: Mapping[int, torch.Tensor], lr: float,
                 momentum: float = 0.0, weight_decay: float = 0.0) -> None:
        if lr <= 0 or not 0.0 <= momentum < 1.0 or weight_decay < 0:
            raise ValueError("need lr > 0, 0 <= momentum < 1, weight_decay >= 0")
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})
        for group in self.param_groups:
            for p in group["params"]:
                mask = masks.get(id(p))
                if mask is not None:
                    if mask.shape != p.shape:
                        raise ValueError(f"mask of shape {tuple(mask.shape)} for a parameter of {tuple(p.shape)}")
                    self.state[p]["kept"] = mask.flatten().nonzero().flatten().to(_INDEX)  # (k,)

    @contextmanager
    def consume_in_backward(self) -> Iterator[KeptSGD]:
        """Within: each masked weight's gradient is gathered to its kept coordinates (k,)
        right after backward accumulates it, and its dense `.grad` freed."""
        handles = []
        for group in self.param_groups:
            for p in group["params"]:
                if "kept" in self.state[p]:
                    handles.append(p.register_post_accumulate_grad_hook(self._gather))
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    @torch.no_grad()
    def _gather(self, p: torch.Tensor) -> None:
        if p.grad is None:
            return
        state = self.state[p]
        g = p.grad.view(-1).index_select(0, state["kept"])
        state["grad"] = g if "grad" not in state else state["grad"].add_(g)  # several backwards: summed
        p.grad = None

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> float:
        """`nn.utils.clip_grad_norm_` over what this optimizer will step: the kept
        gradients gathered in backward and the dense `.grad`s. Returns the norm before
        clipping. (`clip_grad_norm_(model.parameters())` would miss the gathered ones:
        their `.grad` is None by then.)"""
        grads, norms = [], []
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                g = state.get("grad", p.grad)
                if g is None:
                    continue
                grads.append(g)
                # a masked weight steps on its kept coordinates only: only those count
                dense_masked = "kept" in state and "grad" not in state
                norms.append(torch.linalg.vector_norm(g.view(-1).index_select(0, state["kept"]) if dense_masked else g))
        if not grads:
            return 0.0
        norm = torch.linalg.vector_norm(torch.stack(norms))
        scale = max_norm / (float(norm) + 1e-6)
        if scale < 1.0:
            for g in grads:
                g.mul_(scale)
        return float(norm)

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                state = self.state[p]
                kept = state.get("kept")
                gathered = state.pop("grad", None)  # (k,), from consume_in_backward
                if p.grad is None and gathered is None:
                    continue
                # the update direction on the coordinates this parameter trains: (k,) or dense
                if kept is not None:
                    g = gathered if gathered is not None else p.grad.view(-1).index_select(0, kept)
                    if wd:
                        g.add_(p.view(-1).index_select(0, kept), alpha=wd)
                else:
                    g = p.grad.add(p, alpha=wd) if wd else p.grad.clone()
                p.grad = None  # consumed: no dense gradient lives on into the next forward
                if mu:
                    buf = state.get("momentum")
                    if buf is None:
                        state["momentum"] = buf = g  # torch's first step: buf = g
                    else:
                        buf.mul_(mu).add_(g)
                    g = buf
                if kept is not None:
                    p.view(-1).index_add_(0, kept, g, alpha=-lr)
                else:
                    p.add_(g, alpha=-lr)


def kept_sgd_state_bytes(params: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor], *,
                         momentum: bool) -> int:
    """Bytes of `KeptSGD`'s state over `params` (name → trainable parameter): per masked
    weight its kept indices (int32) and, with momentum, one fp32 value per kept coordinate;
    per other parameter a dense fp32 buffer with momentum, nothing without."""
    total = 0
    for name, p in params.items():
        if name in masks:
            total += int(masks[name].sum()) * (4 + (4 if momentum else 0))
        elif momentum:
            total += p.numel() * p.element_size()
    return total


def kept_sgd_grad_bytes(params: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> int:
    """Bytes of the gradients training with `KeptSGD.consume_in_backward` holds at once over
    `params` (name → trainable parameter): dense ones of the unmasked parameters, kept
    values (fp32) of the masked weights, and one masked weight's dense gradient (the one
    backward has just produced, before the gather frees it)."""
    dense = sum(p.numel() * p.element_size() for n, p in params.items() if n not in masks)
    kept = sum(int(masks[n].sum()) * 4 for n in params if n in masks)
    largest = max((params[n].numel() * params[n].element_size() for n in params if n in masks), default=0)
    return dense + kept + largest
