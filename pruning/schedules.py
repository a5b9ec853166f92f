"""Schedules as pure callables of the round number t (frozen dataclasses with __call__).

They hold no state: a strategy asks ``schedule(t)`` each round, and a restarted coordinator
gets the same answer for the same round.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = [
    "CosineGrowRate",
    "CubicSparsity",
    "IncrementalLambda",
    "is_reconfiguration_round",
]


@dataclass(frozen=True)
class CubicSparsity:
    """FedDIP (Zhu & Gupta style): s_t = s_T + (s_0 − s_T)(1 − t/T)³, held at s_T after T.

    Sparsity is the pruned fraction; density = 1 − s_t (see `density`).
    """

    total_rounds: int
    initial: float = 0.5
    final: float = 0.95

    def __post_init__(self) -> None:
        if self.total_rounds < 1:
            raise ValueError(f"total_rounds must be >= 1, got {self.total_rounds}")
        if not (0.0 <= self.initial <= 1.0 and 0.0 <= self.final <= 1.0):
            raise ValueError("sparsities must be in [0, 1]")

    def __call__(self, t: int) -> float:
        frac = min(max(t, 0), self.total_rounds) / self.total_rounds
        return self.final + (self.initial - self.final) * (1.0 - frac) ** 3

    def density(self, t: int) -> float:
        return 1.0 - self(t)


@dataclass(frozen=True)
class IncrementalLambda:
    """FedDIP incremental regularisation: λ rises from 0 to λ_max in `steps` equal steps
    over `total_rounds`: λ_t = λ_max · min(⌊t·steps/T⌋, steps) / steps."""

    total_rounds: int
    lam_max: float = 1e-3
    steps: int = 20

    def __call__(self, t: int) -> float:
        level = min(max(t, 0) * self.steps // self.total_rounds, self.steps)
        return self.lam_max * level / self.steps


@dataclass(frozen=True)
class CosineGrowRate:
    """FedTiny prune-and-grow rate: rate_t = ½·rate_0·(1 + cos(π t / T_end)), 0 after T_end."""

    end_round: int
    initial: float = 0.1

    def __call__(self, t: int) -> float:
        if t >= self.end_round:
            return 0.0
        return 0.5 * self.initial * (1.0 + math.cos(math.pi * max(t, 0) / self.end_round))


def is_reconfiguration_round(t: int, *, every: int, until: int | None = None) -> bool:
    """Round t re-decides the mask: t = every, 2·every, … (not round 0, which sets the initial
    mask) up to and including `until` (None: forever)."""
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    return t > 0 and t % every == 0 and (until is None or t <= until)
