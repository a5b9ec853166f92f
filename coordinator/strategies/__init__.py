"""Aggregation strategies, selected by name in the federation config."""

from __future__ import annotations

from typing import Any

from coordinator.strategies.autoflip import AutoFLIP
from coordinator.strategies.base import RoundContext, RoundResult, Strategy, Weights
from coordinator.strategies.dynamic import DynamicPruning
from coordinator.strategies.fedavg import FedAvg
from coordinator.strategies.feddip import FedDIP
from coordinator.strategies.fedtiny import FedTiny
from coordinator.strategies.structured import StructuredPruning

__all__ = ["STRATEGIES", "RoundContext", "RoundResult", "Strategy", "Weights", "build_strategy"]

STRATEGIES: dict[str, type[Strategy]] = {
    s.name: s for s in (FedAvg, StructuredPruning, FedDIP, FedTiny, AutoFLIP, DynamicPruning)
}


def build_strategy(name: str, params: dict[str, Any]) -> Strategy:
    """Instantiate a strategy; unknown names and bad params raise ValueError."""
    try:
        cls = STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; valid: {', '.join(sorted(STRATEGIES))}") from None
    try:
        return cls(**params)
    except TypeError as exc:
        raise ValueError(f"bad params for strategy {name!r}: {exc}") from None
