"""A model's weights as plain numpy data: the form that strategies, the codec and the
store handle (float32 arrays keyed by state_dict name; integer buffers such as BN's
`num_batches_tracked` are not part of it)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from models.gating import GATE_KEY, gate_as
from sparse_kernels.types import Weights

__all__ = [
    "BN_STAT_SUFFIXES",
    "Weights",
    "build_from_state",
    "is_bn_stat",
    "load_numpy_state",
    "seeded_rng",
    "seeded_weights",
    "to_numpy_state",
]

_SEED_LOCK = threading.Lock()

# BatchNorm's running statistics: state, not parameters (estimated, never trained; the
# FedTiny setup rounds average them; the `params` metric leaves them out).
BN_STAT_SUFFIXES: tuple[str, str] = ("running_mean", "running_var")


def is_bn_stat(name: str) -> bool:
    return name.endswith(BN_STAT_SUFFIXES)


def to_numpy_state(model: nn.Module) -> Weights:
    return {
        k: v.detach().cpu().numpy().astype(np.float32, copy=True)
        for k, v in model.state_dict().items()
        if v.is_floating_point()
    }


def load_numpy_state(model: nn.Module, weights: Weights) -> nn.Module:
    """Copy `weights` into `model` (shapes must match; missing float entries are an error)."""
    state = model.state_dict()
    floats = {k for k, v in state.items() if v.is_floating_point()}
    if floats != set(weights):
        missing, extra = sorted(floats - set(weights)), sorted(set(weights) - floats)
        raise KeyError(f"weights do not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
    with torch.no_grad():
        for k in floats:
            if tuple(state[k].shape) != weights[k].shape:
                raise ValueError(f"{k}: model has shape {tuple(state[k].shape)}, weights {weights[k].shape}")
            state[k].copy_(torch.from_numpy(weights[k]))
    return model


def build_from_state(
    name: str, weights: Weights, *, in_channels: int, num_classes: int, image_size: int | None = None
) -> nn.Module:
    """Build zoo model `name` with the (possibly channel-pruned, possibly gated) structure
    of `weights`. Gated weights (adaptive dynamic pruning: `models.gating`) carry their
    gates and each gate's width, so the same convs are gated before loading."""
    from models.zoo import build_model

    # The initialisation is overwritten below; the lock only keeps its draws from the
    # global RNG out of a concurrent `seeded_weights` in another thread.
    with _SEED_LOCK:
        model = build_model(name, in_channels=in_channels, num_classes=num_classes, image_size=image_size)
        if any(k.endswith(GATE_KEY) for k in weights):
            model = gate_as(model, weights)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if any(shapes.get(k) != w.shape for k, w in weights.items()):
        from models.structure import reshape_to  # structured-pruned: shrink modules first

        model = reshape_to(model, {**shapes, **{k: tuple(w.shape) for k, w in weights.items()}})
    return load_numpy_state(model, weights)


def seeded_weights(name: str, seed: int, *, in_channels: int, num_classes: int, image_size: int | None = None) -> Weights:
    """The initial weights of zoo model `name` under `torch.manual_seed(seed)`: the same in
    every process with the same torch build, so agents can rebuild instead of download.
    The global RNG is left untouched (`seeded_rng`)."""
    from models.zoo import build_model

    with seeded_rng(seed):
        model = build_model(name, in_channels=in_channels, num_classes=num_classes, image_size=image_size)
    return to_numpy_state(model)


@contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """Run the block under `torch.manual_seed(seed)` with the global RNG forked (untouched
    afterwards) and locked (threads would interleave draws)."""
    with _SEED_LOCK, torch.random.fork_rng():
        torch.manual_seed(seed)
        yield
