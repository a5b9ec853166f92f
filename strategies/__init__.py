"""The federated methods, one module or folder each, with the two contracts (`base`) and
the explicit registry (`registry`):

    fedavg.py       FedAvg / FedAvgM (server half; agents train plain)
    structured.py   structured progressive pruning (server half; agents train plain)
    feddip/         FedDIP          server.py, agent.py, ops.py, common.py
    fedtiny/        FedTiny         server.py, agent.py, ops.py
    autoflip/       AutoFLIP        server.py, agent.py, ops.py
    dynamic/        dynamic gating  server.py, agent.py, common.py
    masking.py      server-side mask helpers the three mask methods share

Imports models, sparse_kernels and pruning only: never coordinator or edge_agent.
"""

from strategies.base import (
    AUX_PREFIX,
    TRAINS_PLAIN,
    AgentHalf,
    LocalHooks,
    RoundContext,
    RoundResult,
    Strategy,
    Weights,
)
from strategies.registry import REGISTRY, STRATEGIES, agent_half, build_strategy, hooks_for

__all__ = [
    "AUX_PREFIX",
    "REGISTRY",
    "STRATEGIES",
    "TRAINS_PLAIN",
    "AgentHalf",
    "LocalHooks",
    "RoundContext",
    "RoundResult",
    "Strategy",
    "Weights",
    "agent_half",
    "build_strategy",
    "hooks_for",
]
