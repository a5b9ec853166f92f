"""The strategy contract: data in, data out (no HTTP, no database, no logging of transport).

A strategy sees the global weights, the streaming mean of the round's deltas and its own
persistent arrays, and proposes the next global weights. Broadcast compression, storage
and evaluation are the service's job.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np

__all__ = ["AUX_PREFIX", "RoundContext", "RoundResult", "Strategy", "Weights"]

Weights = dict[str, np.ndarray]
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
    # (AutoFLIP's guidance scores); None otherwise.
    mean_sq_delta: Weights | None = None
    # Sample-weighted means of the auxiliary tensors the agents uploaded (names from
    # `Strategy.aux_shapes`, "aux/..."): statistics that are not model deltas.
    aux: Weights = field(default_factory=dict)


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
        """Chance to transform the freshly initialised model before round 1."""
        return weights

    @abstractmethod
    def aggregate(
        self, ctx: RoundContext, weights: Weights, mean_delta: Weights, state: dict[str, np.ndarray]
    ) -> RoundResult: ...
