"""Round rules as pure functions: who trains, and when a round closes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

__all__ = ["round_decision", "select_clients"]


def select_clients(
    live: Sequence[str], per_round: int, min_clients: int, *, seed: int, rnd: int, attempt: int
) -> list[str] | None:
    """Sample up to `per_round` of the live agents (seeded by federation seed, round and
    attempt, so a restart re-draws the same sample); None while fewer than `min_clients`."""
    if len(live) < min_clients:
        return None
    rng = np.random.default_rng([seed, rnd, attempt])
    pool = sorted(live)
    k = min(per_round, len(pool))
    return sorted(pool[i] for i in rng.choice(len(pool), size=k, replace=False))


def round_decision(
    *, received: int, selected: int, min_clients: int, deadline: float, now: float, declined: int = 0
) -> Literal["wait", "close", "retry"]:
    """Close when every selected agent answered (an update, or a decline: its budget fits
    nothing), or at the deadline, with at least `min_clients` updates; with fewer, retry
    the round with a new sample — at once when everyone has answered, not at the deadline."""
    if received + declined >= selected or now >= deadline:
        return "close" if received >= min_clients else "retry"
    return "wait"
