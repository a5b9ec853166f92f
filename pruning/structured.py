"""Structured (channel) pruning: physically remove conv filters / linear units.

torch-pruning's `DependencyGraph` finds which layers are coupled (residual adds, BN, concat,
depthwise convs, flatten → linear) so that removing output channel k of one conv removes
the matching input channel everywhere it flows. We only choose *how many* and *which*
channels per coupled group; torch-pruning does the surgery in place.

Channel counts left in a pruned group are multiples of `round_to` (the CPU's SIMD block:
8 on AVX2, 16 on AVX-512), because ONNX Runtime's blocked (NCHWc) convolutions gain
nothing from widths in between. A group whose width is already ≤ `round_to` is left alone.

Grouped convolutions (ResNeXt, ShuffleNet: 1 < groups < channels) are pruned per group, as
torch-pruning's own pruners do (`BasePruner._get_channel_groups`): every conv group keeps
the same number of channels, and the same positions inside each group, chosen by the
importance averaged over the groups. Its `ConvPruner.prune_in_channels` relies on that
(it keeps the first kept/groups input positions for every group), so cutting different
positions per group would silently mix up the consumer's weights.

Pure torch, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch_pruning as tp
from torch import nn

from models.counting import count_macs

__all__ = [
    "IMPORTANCES",
    "ImportanceFn",
    "channel_importance",
    "conv_linear_macs",
    "kept_reshape",
    "macs_fraction",
    "prune_channels",
]

_CONV_TYPES = (nn.Conv1d, nn.Conv2d)
_ROOT_TYPES = (*_CONV_TYPES, nn.Linear)

# Per-channel importance of a coupled group, as torch-pruning scores it.
IMPORTANCES: dict[str, Callable[[], tp.importance.Importance]] = {
    "l1": lambda: tp.importance.GroupMagnitudeImportance(p=1),
    "l2": lambda: tp.importance.GroupMagnitudeImportance(p=2),
    "bn": lambda: tp.importance.BNScaleImportance(),
    "fpgm": lambda: tp.importance.FPGMImportance(),
    "random": lambda: tp.importance.RandomImportance(),
}

# A scorer of one's own: torch-pruning group → (n,) score per channel of the group's root
# (higher = keep). Called again after every cut, so it must read the current widths.
ImportanceFn = Callable[[Any], torch.Tensor]

# target_macs: per-step ratio increment of the linear schedule (relative to the widths at
# call time), as torch-pruning's iterative_steps with linear_scheduler would use.
_STEP = 0.05


def prune_channels(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    ratio: float | None = None,
    target_macs: float | None = None,
    round_to: int = 8,
    importance: str | ImportanceFn = "l2",
    ignored: Sequence[nn.Module] = (),
    layers: Sequence[nn.Module] | None = None,
) -> nn.Module:
    """Remove channels from `model` in place and return it.

    Exactly one of:
    - `ratio`: remove this fraction of the channels of every eligible group, one shot
      (kept width rounded to the nearest multiple of `round_to`, at least `round_to`);
    - `target_macs`: a fraction of the model's MACs at call time; widths shrink by a
      linear schedule of 5% steps, re-scoring importance before each group is cut, until
      conv+linear MACs ≤ target (stops at the floor if the eligible groups cannot get
      there: check `macs_fraction` if that matters).

    The layer producing the model's output (the classifier) keeps its outputs; modules in
    `ignored` (and their submodules) are never the root of a pruned group. `layers`
    restricts pruning to the groups that remove output channels of a Conv2d/Linear inside
    one of those modules; coupled channels elsewhere (a residual stream shared by a whole
    ResNet stage) go with them, since they cannot be removed alone. `importance` is a
    name in IMPORTANCES or a callable scoring a group (`ImportanceFn`).
    """
    if (ratio is None) == (target_macs is None):
        raise ValueError("give exactly one of ratio= or target_macs=")
    if ratio is not None and not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must be in [0, 1), got {ratio}")
    if target_macs is not None and not 0.0 < target_macs <= 1.0:
        raise ValueError(f"target_macs is a fraction of the current MACs in (0, 1], got {target_macs}")
    if round_to < 1:
        raise ValueError(f"round_to must be >= 1, got {round_to}")
    scorer = _importance(importance, model)

    was_training = model.training
    model.eval()  # tracing must not update BN running stats
    try:
        graph, roots = _eligible_roots(model, example_input, ignored, layers)
        if ratio is not None:
            if ratio == 0.0:
                return model
            for root in roots:
                current = graph.get_out_channels(root)
                _cut(graph, root, _kept(current, current, ratio, _block(graph, root, round_to)), scorer)
            return model
        assert target_macs is not None
        positions = _output_positions(model, example_input)
        goal = target_macs * conv_linear_macs(model, positions)
        reference = {root: graph.get_out_channels(root) for root in roots}
        step = 1
        while conv_linear_macs(model, positions) > goal and step * _STEP < 1.0:
            for root in reversed(roots):  # last layers first, as FedTiny adjusts them
                kept = _kept(graph.get_out_channels(root), reference[root], step * _STEP,
                             _block(graph, root, round_to))
                _cut(graph, root, kept, scorer)
                if conv_linear_macs(model, positions) <= goal:
                    break
            step += 1
        return model
    finally:
        model.train(was_training)


def channel_importance(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    importance: str | ImportanceFn = "l2",
    ignored: Sequence[nn.Module] = (),
    layers: Sequence[nn.Module] | None = None,
) -> dict[str, torch.Tensor]:
    """Per-channel importance (1-D, one score per output channel) of every prunable group,
    keyed by the qualified name of the group's root layer. Does not modify the model."""
    scorer = _importance(importance, model)
    names = {m: n for n, m in model.named_modules()}
    was_training = model.training
    model.eval()
    try:
        graph, roots = _eligible_roots(model, example_input, ignored, layers)
        out: dict[str, torch.Tensor] = {}
        for root in roots:
            with torch.no_grad():
                out[names[root]] = scorer(_full_group(graph, root)).detach().cpu()
        return out
    finally:
        model.train(was_training)


def macs_fraction(model: nn.Module, dense_macs: float, input_shape: tuple[int, ...]) -> float:
    """MACs of `model` for one sample of `input_shape` (C, H, W) over `dense_macs`."""
    return count_macs(model, input_shape) / float(dense_macs)


def conv_linear_macs(model: nn.Module, positions: dict[nn.Module, int]) -> int:
    """Conv + linear MACs per sample from the current weight shapes: each layer does
    `weight.numel()` multiply-adds per output position (H_out·W_out for a conv; the
    product of the leading non-batch dims for a linear). Equals `count_macs` for models
    made of these layers, without a forward pass (pruning never changes positions)."""
    total = 0
    for module, n in positions.items():
        weight = module.weight
        assert isinstance(weight, torch.Tensor)
        total += n * weight.numel()
    return total


def kept_reshape(model: nn.Module, old: dict[str, Any]) -> dict[str, list[list[int] | None]]:
    """Which indices of the tensors in `old` (name → array) a pruned `model` kept, per
    tensor and dimension (a `sparse_kernels.reshape.Reshape`), for a model whose
    parameters' .grad were seeded with their flat positions before pruning (torch-pruning
    slices .grad with the parameter). BN running statistics follow their layer's weight."""
    kept = {name: _kept_dims(p.grad, old[name].shape) for name, p in model.named_parameters()
            if p.grad is not None and tuple(p.shape) != old[name].shape}
    for name, value in model.state_dict().items():
        owner = name.rsplit(".", 1)[0] + ".weight"
        if name in old and name not in kept and tuple(value.shape) != old[name].shape and owner in kept:
            kept[name] = kept[owner]
    return kept


def _kept_dims(positions: torch.Tensor, old_shape: tuple[int, ...]) -> list[list[int] | None]:
    """Per dimension, the sorted kept indices (None if unchanged), from a tensor holding
    the flat positions its entries had in a tensor of `old_shape`."""
    coords = np.unravel_index(positions.detach().numpy().astype(np.int64).reshape(-1), old_shape)
    dims: list[list[int] | None] = []
    for axis, size in enumerate(old_shape):
        keep = np.unique(coords[axis])
        dims.append(None if keep.size == size else keep.tolist())
    return dims


# ---------------------------------------------------------------- helpers


def _importance(name: str | ImportanceFn, model: nn.Module) -> ImportanceFn:
    if not isinstance(name, str):
        return name
    grouped = next((n for n, m in model.named_modules() if _is_grouped(m)), None)
    if name == "fpgm" and grouped is not None:
        # torch-pruning 1.6's FPGMImportance repeats a 2-D tensor with one repeat count
        # for grouped consumers and fails inside; refuse before the model is touched
        raise ValueError(f"importance 'fpgm' does not support grouped convs ({grouped}); use l1, l2, bn or random")
    try:
        return IMPORTANCES[name]()
    except KeyError:
        raise ValueError(f"unknown importance {name!r}; valid: {', '.join(IMPORTANCES)}") from None


def _is_grouped(m: nn.Module) -> bool:
    """A grouped conv that is not depthwise (depthwise convs prune any channel alone)."""
    return isinstance(m, _CONV_TYPES) and 1 < m.groups != m.out_channels


def _conv_groups(group: tp.dependency.Group) -> int:
    """How many equal conv groups the channels of a coupled group fall into: the largest
    `groups` of the grouped convs it touches (1 without any), as torch-pruning counts it."""
    return max((dep.target.module.groups for dep, _ in group if _is_grouped(dep.target.module)), default=1)


def _block(graph: tp.DependencyGraph, root: nn.Module, round_to: int) -> int:
    """Widths of root's group are multiples of this: the SIMD block, and of its conv groups."""
    return math.lcm(round_to, _conv_groups(_full_group(graph, root)))


@torch.no_grad()
def _output_positions(model: nn.Module, example_input: torch.Tensor) -> dict[nn.Module, int]:
    """Output positions per sample of every Conv1d/Conv2d/Linear (run order preserved)."""
    positions: dict[nn.Module, int] = {}

    def hook(module: nn.Module, _inp: object, out: torch.Tensor) -> None:
        channels = out.shape[1] if isinstance(module, _CONV_TYPES) else out.shape[-1]
        positions[module] = out[0].numel() // channels  # (C, H, W) → H·W; (C, L) → L; (..., F) → prod(...)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, _ROOT_TYPES)]
    try:
        model(example_input[:1])
    finally:
        for h in handles:
            h.remove()
    return positions


def _eligible_roots(
    model: nn.Module,
    example_input: torch.Tensor,
    ignored: Sequence[nn.Module],
    layers: Sequence[nn.Module] | None,
) -> tuple[tp.DependencyGraph, list[nn.Module]]:
    """Dependency graph and the root layers of the groups we may prune, in module order."""
    positions = _output_positions(model, example_input)
    if not positions:
        raise ValueError("model has no Conv/Linear layer to prune")
    classifier = list(positions)[-1]  # the last conv/linear to run produces the logits
    skip: list[nn.Module] = [classifier]
    for m in ignored:
        skip.extend(m.modules())
    allowed = None if layers is None else {s for m in layers for s in m.modules()}

    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_input[:1])
    roots: list[nn.Module] = []
    for group in graph.get_all_groups(ignored_layers=skip, root_module_types=list(_ROOT_TYPES)):
        root = group[0].dep.target.module
        if allowed is not None:
            cut = [
                dep.target.module
                for dep, _ in group
                if graph.is_out_channel_pruning_fn(dep.handler) and isinstance(dep.target.module, _ROOT_TYPES)
            ]
            if not any(m in allowed for m in cut):
                continue
        roots.append(root)
    return graph, roots


def _full_group(graph: tp.DependencyGraph, root: nn.Module) -> tp.dependency.Group:
    pruner = graph.get_pruner_of_module(root)
    n = graph.get_out_channels(root)
    return graph.get_pruning_group(root, pruner.prune_out_channels, list(range(n)))


def _kept(current: int, reference: int, ratio: float, round_to: int) -> int:
    """Width to keep: reference·(1−ratio) rounded to the nearest multiple of round_to,
    at least round_to, never wider than now."""
    keep = round(reference * (1.0 - ratio) / round_to) * round_to
    return min(current, max(keep, round_to))


@torch.no_grad()
def _cut(graph: tp.DependencyGraph, root: nn.Module, kept: int, scorer: ImportanceFn) -> None:
    """Remove the least important channels of root's group so that `kept` remain (per
    conv group: `kept` is a multiple of the group count, `_block`)."""
    current = graph.get_out_channels(root)
    if kept >= current:
        return
    full = _full_group(graph, root)
    scores = scorer(full)  # (current,)
    groups = _conv_groups(full)
    size = current // groups  # channels per conv group
    per_position = scores.reshape(groups, size).mean(dim=0)  # (size,): one score per position in a group
    cut = torch.argsort(per_position)[: size - kept // groups]
    drop = sorted(int(p) + g * size for g in range(groups) for p in cut)  # the same positions in every group
    pruner = graph.get_pruner_of_module(root)
    graph.get_pruning_group(root, pruner.prune_out_channels, drop).prune()
