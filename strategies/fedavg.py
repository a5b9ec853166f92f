"""FedAvg (McMahan et al. 2017), with optional server momentum (FedAvgM, Hsu et al. 2019).

Server half only: agents train plainly (`TRAINS_PLAIN` in the registry). `apply_mean_delta`
is the one home of the FedAvg(M) step; every other strategy calls it. The "sparse" preset
of the demo (`sim.presets`) is this strategy with top-k fp16 exchanges, not a method.
"""

from __future__ import annotations

import numpy as np

from strategies.base import RoundContext, RoundResult, Strategy, Weights

__all__ = ["FedAvg", "apply_mean_delta"]


def apply_mean_delta(
    weights: Weights, mean_delta: Weights, state: dict[str, np.ndarray], *, server_lr: float, momentum: float
) -> tuple[Weights, dict[str, np.ndarray]]:
    """w ← w + lr·v with v ← β·v + Δ̄ (β = 0: plain FedAvg). Pure."""
    new_weights, new_state = {}, {}
    for k, w in weights.items():
        d = mean_delta.get(k)
        if d is None:
            new_weights[k] = w
            continue
        if momentum:
            v = momentum * state.get(f"momentum/{k}", np.zeros_like(w)) + d
            new_state[f"momentum/{k}"] = v.astype(np.float32)
            d = v
        new_weights[k] = (w + server_lr * d).astype(np.float32)
    return new_weights, new_state


class FedAvg(Strategy):
    name = "fedavg"

    def __init__(self, *, server_lr: float = 1.0, server_momentum: float = 0.0) -> None:
        if not 0 <= server_momentum < 1 or server_lr <= 0:
            raise ValueError("need 0 <= server_momentum < 1 and server_lr > 0")
        self.server_lr, self.server_momentum = server_lr, server_momentum

    def aggregate(self, ctx: RoundContext, weights: Weights, mean_delta: Weights, state: dict[str, np.ndarray]) -> RoundResult:
        new, new_state = apply_mean_delta(weights, mean_delta, state, server_lr=self.server_lr, momentum=self.server_momentum)
        return RoundResult(new, state=new_state)
