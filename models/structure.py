"""Model structure as tensor shapes, and rebuilding a pruned structure from a dense model.

The coordinator ships tensors, never pickled modules. An agent that receives the state of
a channel-pruned model builds the dense zoo model, then `reshape_to` swaps every
Conv1d/Conv2d, BatchNorm1d/BatchNorm2d and Linear for one of the pruned size read from
the weight shapes:

    model = reshape_to(build_model(name), structure_of(pruned))
    model.load_state_dict(pruned.state_dict())
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import nn

__all__ = ["StructureError", "reshape_to", "structure_of"]


class StructureError(ValueError):
    """The shapes do not describe a pruned version of this model; the message says where."""


def structure_of(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of the state_dict (parameters and buffers), by state_dict key."""
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def reshape_to(model: nn.Module, shapes: Mapping[str, Sequence[int]]) -> nn.Module:
    """Replace, in place, each Conv/BatchNorm (1-D or 2-D)/Linear of `model` whose shapes
    differ from `shapes` by a freshly initialised module of the pruned size; returns `model`.

    Depthwise convs (groups == in_channels) stay depthwise at the new width; grouped convs
    keep their number of groups (pruned per group: `pruning.structured`); other
    hyperparameters (stride, padding, bias, eps, momentum…) are kept. Raises
    `StructureError` if a key is missing or extra, or a shape cannot be explained.
    """
    own = structure_of(model)
    missing, extra = sorted(set(own) - set(shapes)), sorted(set(shapes) - set(own))
    if missing or extra:
        raise StructureError(f"state_dict keys differ: missing {missing[:5]}, unexpected {extra[:5]}")
    wanted = {k: tuple(int(d) for d in v) for k, v in shapes.items()}

    for name, module in list(model.named_modules()):
        prefix = f"{name}." if name else ""
        if isinstance(module, nn.Conv1d | nn.Conv2d):
            new: nn.Module | None = _conv(module, wanted[prefix + "weight"], name)
        elif isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
            new = _batchnorm(module, wanted, prefix)
        elif isinstance(module, nn.Linear):
            out_f, in_f = wanted[prefix + "weight"]
            new = None
            if (out_f, in_f) != (module.out_features, module.in_features):
                new = nn.Linear(in_f, out_f, bias=module.bias is not None)
        else:
            continue
        if new is not None:
            _set_submodule(model, name, new)

    now = structure_of(model)
    wrong = [f"{k}: {now[k]} vs {wanted[k]}" for k in now if now[k] != wanted[k]]
    if wrong:
        raise StructureError(f"shapes not explained by Conv/BatchNorm/Linear widths: {wrong[:5]}")
    return model


def _conv(m: nn.Conv1d | nn.Conv2d, shape: tuple[int, ...], name: str) -> nn.Conv1d | nn.Conv2d | None:
    out_c, in_per_group, *kernel = shape  # weight: (out, in/groups, k) or (out, in/groups, kh, kw)
    if tuple(kernel) != tuple(m.kernel_size):
        raise StructureError(f"{name}: kernel {tuple(kernel)} differs from {m.kernel_size}")
    depthwise = m.groups > 1 and m.groups == m.in_channels
    if depthwise:
        if in_per_group != 1:
            raise StructureError(f"{name}: depthwise conv weight {shape} must have 1 input per group")
        # depthwise with a channel multiplier (out = k·in) keeps the multiplier
        multiplier = m.out_channels // m.in_channels
        if out_c % multiplier:
            raise StructureError(f"{name}: {out_c} outputs is not a multiple of the depth multiplier {multiplier}")
        groups = in_c = out_c // multiplier
    else:
        groups, in_c = m.groups, in_per_group * m.groups
        if out_c % groups:
            raise StructureError(f"{name}: {out_c} outputs do not split into its {groups} groups")
    if (out_c, in_c, groups) == (m.out_channels, m.in_channels, m.groups):
        return None
    return type(m)(
        in_c, out_c, m.kernel_size, stride=m.stride, padding=m.padding,  # type: ignore[arg-type]
        dilation=m.dilation, groups=groups, bias=m.bias is not None,  # type: ignore[arg-type]
        padding_mode=m.padding_mode,
    )


def _batchnorm(m: nn.BatchNorm1d | nn.BatchNorm2d, wanted: dict[str, tuple[int, ...]],
               prefix: str) -> nn.BatchNorm1d | nn.BatchNorm2d | None:
    key = prefix + ("weight" if m.affine else "running_mean")
    if key not in wanted:
        raise StructureError(f"{prefix[:-1]}: BatchNorm without affine weight or running stats")
    (features,) = wanted[key]
    if features == m.num_features:
        return None
    return type(m)(
        features, eps=m.eps, momentum=m.momentum, affine=m.affine,
        track_running_stats=m.track_running_stats,
    )


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
