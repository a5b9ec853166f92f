"""Adaptive dynamic pruning (Yu et al. 2021; ALGORITHMS.md §1): per-sample channel gates
during training, folded into a static channel-pruned model at the end. Everything of the
method is in this folder (the gate modules themselves are `models.gating`, because
`models.state` rebuilds gated models from their weights):

- `server.py`: the server half (`DynamicPruning`: FedAvg, gate metrics, the export);
- `agent.py`: the agent half (gate statistics as auxiliary uploads);
- `common.py`: the statistics' names and the gated round-0 model, shared.
"""

from strategies.base import AgentHalf
from strategies.dynamic.agent import dynamic_hooks
from strategies.dynamic.common import initial_weights_from_params
from strategies.dynamic.server import DynamicPruning

__all__ = ["AGENT", "DynamicPruning"]

AGENT = AgentHalf(hooks=dynamic_hooks, initial_weights=initial_weights_from_params)
