"""FedTiny's server pre-training (ALGORITHMS.md §2: "the server pre-trains briefly on a
tiny set, a few samples per class, if it has one") before the candidate pool is built, so
the pool's magnitude pruning ranks trained weights instead of random ones.

The strategy param ``pretrain`` (a dict) says what and how long::

    {"path": "/srv/tiny.npz",   # optional: x (N, C, H, W), y (N,); absent: the federation's
                                #   own training split (a benchmark's stand-in for data the
                                #   operator holds)
     "per_class": 5,            # the first that many samples of each class
     "epochs": 30, "lr": 0.05, "batch_size": 32, "momentum": 0.9}

The coordinator loads the set at create (`Strategy.labelled_set`; a bad path is refused
there) and hands it to `initial_weights` in the round-0 context. Agents do not hold the
set, so they cannot rebuild the pre-trained model from the seed: FedTiny's agent half
declares no `initial_weights`, the seeded rebuild fails the task's sha256 and agents
download the round-0 model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from strategies.base import LabelledSetRequest, RoundContext, Weights

if TYPE_CHECKING:
    from models.datasets import ImageDataset

__all__ = ["PretrainSpec", "pretrain_weights", "pretrained_initial_weights"]


@dataclass(frozen=True)
class PretrainSpec:
    path: str | None = None
    per_class: int = 5
    epochs: int = 30
    lr: float = 0.05
    batch_size: int = 32
    momentum: float = 0.9

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> PretrainSpec:
        """The spec from the strategy param; unknown keys and bad values raise ValueError."""
        if not isinstance(params, Mapping):
            raise ValueError(f"pretrain must be an object of {{path, per_class, epochs, lr, ...}}, got {params!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(f"unknown pretrain keys {unknown}; valid: {', '.join(sorted(known))}")
        spec = cls(**params)
        if spec.path is not None and not isinstance(spec.path, str):
            raise ValueError("pretrain.path must be a string")
        if not 1 <= int(spec.per_class) <= 1000 or not 1 <= int(spec.epochs) <= 1000:
            raise ValueError("need 1 <= pretrain.per_class <= 1000 and 1 <= pretrain.epochs <= 1000")
        if not 0.0 < float(spec.lr) <= 10.0 or not 1 <= int(spec.batch_size) <= 4096 \
                or not 0.0 <= float(spec.momentum) < 1.0:
            raise ValueError("need 0 < pretrain.lr <= 10, 1 <= pretrain.batch_size <= 4096, 0 <= momentum < 1")
        return spec

    def request(self) -> LabelledSetRequest:
        return LabelledSetRequest(self.path, int(self.per_class))


def pretrain_weights(weights: Weights, ctx: RoundContext, data: ImageDataset, spec: PretrainSpec, *,
                     seed: int) -> Weights:
    """`weights` after `spec.epochs` epochs of SGD on `data`: deterministic for a seed
    (seeded batch order; the model's BN statistics move with it, as in any training)."""
    import torch

    from models.state import build_from_state, to_numpy_state
    from models.training import train_epochs

    model = build_from_state(ctx.model, weights, in_channels=ctx.in_channels, num_classes=ctx.num_classes,
                             image_size=ctx.image_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=float(spec.lr), momentum=float(spec.momentum))
    train_epochs(model, data, optimizer=optimizer, epochs=int(spec.epochs),
                 batch_size=min(int(spec.batch_size), len(data)), seed=seed)
    return to_numpy_state(model)


def pretrained_initial_weights(weights: Weights, ctx: RoundContext, spec: PretrainSpec | None, *,
                               seed: int) -> Weights:
    """FedTiny's round-0 model: the seeded one, pre-trained when the spec asks for it."""
    if spec is None:
        return weights
    if ctx.labelled is None:
        raise ValueError("FedTiny's pretrain needs the labelled set the coordinator loads (ctx.labelled is None)")
    return pretrain_weights(weights, ctx, ctx.labelled, spec, seed=seed)
