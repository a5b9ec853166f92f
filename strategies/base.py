"""The two contracts of a federated method.

- **Server half** (`Strategy`): data in, data out (no HTTP, no database, no logging of
  transport). It sees the global weights, the streaming mean of the round's deltas and
  its own persistent arrays, and proposes the next global weights. Broadcast
  compression, storage and evaluation are the coordinator service's job.
- **Agent half** (`AgentHalf`): how local training changes for the method. A hook
  factory maps (the task's strategy params, model, global weights, local data) to the
  `LocalHooks` that `models.training.train_epochs` understands plus the auxiliary
  statistics the server half asked for; optionally, how to rebuild the method's initial
  model locally from the params. An agent half reads the params the server sent in the
  task, never the server class. A method whose agents train plainly registers
  `TRAINS_PLAIN` instead (`strategies.registry`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np

from sparse_kernels.types import Weights

if TYPE_CHECKING:  # the agent contract's types; importing this module needs no torch
    import torch
    from torch import nn

    from models.datasets import ImageDataset
    from models.training import TrainStats
    from sparse_kernels.codec import ValueMode

__all__ = [
    "AUX_PREFIX",
    "TRAINS_PLAIN",
    "AgentHalf",
    "HookFactory",
    "InitialMasks",
    "InitialWeights",
    "LabelledSetRequest",
    "LocalHooks",
    "RoundContext",
    "RoundResult",
    "Strategy",
    "Weights",
    "largest_bytes",
    "masks_bytes",
]

AUX_PREFIX = "aux/"  # names of uploaded tensors that are statistics, not deltas


@dataclass(frozen=True)
class RoundContext:
    round: int  # the round being closed, 1-based
    total_rounds: int
    model: str
    in_channels: int
    num_classes: int
    image_size: int | None
    participants: int
    # Weighted mean of the squared deltas, for strategies with `wants_second_moment`
    # (none at present: AutoFLIP's scouts upload their squares as aux); None otherwise.
    mean_sq_delta: Weights | None = None
    # Sample-weighted means of the auxiliary tensors the agents uploaded (names from
    # `Strategy.aux_shapes`, "aux/..."): statistics that are not model deltas.
    aux: Weights = field(default_factory=dict)
    # round 0 only: the small labelled set the strategy asked for (`Strategy.labelled_set`),
    # loaded by the coordinator; None when it asked for none
    labelled: ImageDataset | None = None


@dataclass(frozen=True)
class LabelledSetRequest:
    """A small labelled set the server half trains on in `initial_weights` (FedTiny's
    pre-training), which the coordinator loads at create and refuses there when it cannot.

    path: an .npz with `x` (N, C, H, W) uint8 pixels or floats in [0, 1] and `y` (N,) class
    indices, data the operator holds; None: the federation's own training split, a
    stand-in for such data in benchmarks. per_class: the first that many samples of each
    class are kept."""

    path: str | None
    per_class: int


@dataclass
class RoundResult:
    weights: Weights  # proposed next global weights
    structure_changed: bool = False  # tensor shapes differ
    # when known: the kept indices per tensor and dimension (sparse_kernels.reshape), so
    # agents slice what they hold instead of downloading the smaller model whole
    reshape: dict[str, list[list[int] | None]] | None = None
    state: dict[str, np.ndarray] = field(default_factory=dict)  # strategy's persistent arrays
    metrics: dict[str, float] = field(default_factory=dict)


class Strategy(ABC):
    name: ClassVar[str]
    # How the accumulator averages coordinates not every client sent ("zero": missing
    # counts as no change; "senders": average over the clients that sent it).
    fill: ClassVar[Literal["zero", "senders"]] = "zero"
    wants_second_moment: ClassVar[bool] = False

    def task_params(self, rnd: int, weights: Weights, state: dict[str, np.ndarray]) -> dict[str, Any]:
        """Strategy parameters the agents need for round `rnd` (sent in the task)."""
        return {}

    def aux_shapes(self, rnd: int, weights: Weights, state: dict[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
        """Auxiliary tensors ("aux/<name>" → shape) agents upload in round `rnd` besides
        their delta (BN statistics, candidate losses, gradient tops, channel usage). The
        service validates them like the delta and averages them by sample count."""
        return {}

    def setup_rounds(self, weights: Weights) -> int:
        """Rounds before training that only gather statistics (FedTiny's selection);
        they come on top of the federation's `rounds`."""
        return 0

    def initial_weights(self, weights: Weights, ctx: RoundContext) -> Weights:
        """Chance to transform the freshly initialised model before round 1 (with
        `ctx.labelled` when `labelled_set` asked for one)."""
        return weights

    def labelled_set(self) -> LabelledSetRequest | None:
        """The small labelled set `initial_weights` needs at the server, if any."""
        return None

    def initial_state(self, weights: Weights, ctx: RoundContext) -> dict[str, np.ndarray]:
        """The strategy's arrays for model version 0 (`weights`: the seeded model, before
        `initial_weights`), e.g. a round-0 mask ("mask/<name>"), which the coordinator then
        serves as version 0's mask artifact."""
        return {}

    @abstractmethod
    def aggregate(
        self, ctx: RoundContext, weights: Weights, mean_delta: Weights, state: dict[str, np.ndarray]
    ) -> RoundResult: ...


# ---------------------------------------------------------------------- agent contract
@dataclass
class LocalHooks:
    regularizer: Callable[[nn.Module], torch.Tensor] | None = None
    after_step: Callable[[], None] | None = None
    # entered around local training (e.g. a masked forward with error feedback)
    context: AbstractContextManager[object] = field(default_factory=nullcontext)
    # boolean masks restricting which coordinates may be uploaded (None: any)
    upload_support: dict[str, np.ndarray] | None = None
    # False for statistics-only rounds (FedTiny's candidate selection): no training, no delta
    train: bool = True
    # replaces `models.training.train_epochs` (same arguments) for this task: AutoFLIP's
    # scouts train their own epochs with early stopping on a validation split
    fit: Callable[..., TrainStats] | None = None
    # False: the training is a probe whose delta stays home (AutoFLIP's scouts upload their
    # displacement as aux statistics); the error-feedback residual is left untouched
    upload_delta: bool = True
    # the upload's value mode instead of the task's (None: the task's): statistics whose
    # range fp16/int8 cannot hold, such as squared displacements of 1e-9, go up as fp32
    upload_values: ValueMode | None = None
    # called after training: auxiliary tensors to upload ("aux/<name>" → array)
    aux: Callable[[], dict[str, np.ndarray]] | None = None
    # training memory the hooks hold beyond the plain model's working set, in bytes (masks,
    # masked weight copies, gradient buffers, their per-step temporaries): the agent's
    # memory plan adds it before choosing the batch size and frozen layers
    extra_memory_bytes: int = 0
    # the same for a plan that freezes these parameter names (None: independent of it);
    # frozen layers save no masked copy for backward and get no gradient buffers
    extra_memory_frozen: Callable[[tuple[str, ...]], int] | None = None
    # the optimizer to train with instead of torch.optim.SGD: (trainable params, lr, momentum,
    # weight decay) → optimizer; FedTiny's KeptSGD keeps momentum at kept coordinates only
    optimizer: Callable[[list[torch.nn.Parameter], float, float, float], torch.optim.Optimizer] | None = None
    # (gradient bytes, optimizer state bytes) that optimizer holds at once for a plan freezing
    # these names, with momentum or not (None: the estimate's dense counts: one gradient and
    # one buffer per slot per trainable parameter)
    optimizer_memory: Callable[[tuple[str, ...], bool], tuple[int, int]] | None = None


def _numel(t: Any) -> int:
    return int(t.numel()) if callable(getattr(t, "numel", None)) else int(t.size)  # torch or numpy


def masks_bytes(masks: Mapping[str, Any], *, itemsize: int = 1) -> int:
    """Bytes of the tensors in `masks` at `itemsize` (1: boolean keep-masks, torch or numpy;
    4: float32 tensors of the masked weights' shapes)."""
    return sum(_numel(m) for m in masks.values()) * itemsize


def largest_bytes(masks: Mapping[str, Any], *, itemsize: int = 4) -> int:
    """Bytes of the largest tensor in `masks` at `itemsize`: a per-step float temporary."""
    return max((_numel(m) for m in masks.values()), default=0) * itemsize


# (task's strategy params, model built from the global weights, those weights, local data)
HookFactory = Callable[[Mapping[str, Any], "nn.Module", Weights, "ImageDataset"], LocalHooks]
# (task's strategy params, seeded weights, round-0 context) → the method's initial model
InitialWeights = Callable[[Mapping[str, Any], Weights, RoundContext], Weights]
# (task's strategy params, seeded weights, round-0 context) → the method's round-0 keep-masks
InitialMasks = Callable[[Mapping[str, Any], Weights, RoundContext], dict[str, np.ndarray]]


@dataclass(frozen=True)
class AgentHalf:
    hooks: HookFactory
    # how the server half's `initial_weights` transforms the seeded model, from the task's
    # params (None: it does not): agents rebuild the initial model instead of downloading
    initial_weights: InitialWeights | None = None
    # the server half's `initial_state` masks ("mask/<name>"), from the params (None: it has
    # none): agents rebuild version 0's mask artifact (sha256 checked) instead of downloading
    initial_masks: InitialMasks | None = None


# Registered instead of an AgentHalf by methods whose agents train exactly as FedAvg's do
# (the structure arrives in the weights' shapes): an explicit statement, never a default.
TRAINS_PLAIN: Literal["trains plain"] = "trains plain"
