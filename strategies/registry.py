"""The explicit registry of federated methods: name → server half + agent half.

Adding a method: one folder `strategies/<name>/` (server.py, agent.py, an `AGENT` in its
`__init__`) and one entry below. Nothing registers itself on import; a method whose
agents train exactly as FedAvg's do says so with `TRAINS_PLAIN`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from strategies import autoflip, dynamic, feddip, fedtiny
from strategies.base import TRAINS_PLAIN, AgentHalf, LocalHooks, Strategy, Weights
from strategies.fedavg import FedAvg
from strategies.structured import StructuredPruning

if TYPE_CHECKING:
    from torch import nn

    from models.datasets import ImageDataset

__all__ = ["REGISTRY", "STRATEGIES", "Registered", "agent_half", "build_strategy", "hooks_for"]


@dataclass(frozen=True)
class Registered:
    server: type[Strategy]
    agent: AgentHalf | Literal["trains plain"]


REGISTRY: dict[str, Registered] = {
    "fedavg": Registered(FedAvg, TRAINS_PLAIN),
    "structured": Registered(StructuredPruning, TRAINS_PLAIN),  # the structure arrives in the shapes
    "feddip": Registered(feddip.FedDIP, feddip.AGENT),
    "fedtiny": Registered(fedtiny.FedTiny, fedtiny.AGENT),
    "autoflip": Registered(autoflip.AutoFLIP, autoflip.AGENT),
    "dynamic": Registered(dynamic.DynamicPruning, dynamic.AGENT),
}

# name → server class (the coordinator's view)
STRATEGIES: dict[str, type[Strategy]] = {name: r.server for name, r in REGISTRY.items()}


def _registered(name: str) -> Registered:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; valid: {', '.join(sorted(REGISTRY))}") from None


def build_strategy(name: str, params: dict[str, Any]) -> Strategy:
    """Instantiate a server half; unknown names and bad params raise ValueError."""
    cls = _registered(name).server
    try:
        return cls(**params)
    except TypeError as exc:
        raise ValueError(f"bad params for strategy {name!r}: {exc}") from None


def agent_half(name: str) -> AgentHalf | None:
    """The agent half of `name`; None when it trains plain. Unknown names raise ValueError."""
    agent = _registered(name).agent
    return None if agent == TRAINS_PLAIN else agent  # type: ignore[return-value]


def hooks_for(name: str, params: Mapping[str, Any], model: nn.Module, weights: Weights,
              data: ImageDataset) -> LocalHooks:
    """The local-training hooks for one task of strategy `name` with the task's params."""
    half = agent_half(name)
    return half.hooks(params, model, weights, data) if half else LocalHooks()
