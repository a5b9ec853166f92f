"""FedDIP (Long et al., ICDM 2023; ALGORITHMS.md §4): dynamic pruning with error feedback
and incremental regularisation. Everything of the method is in this folder:

- `server.py`: the server half (`FedDIP`: ERK start, FedAvg, global magnitude
  reconfiguration on the cubic schedule, λ_t in the task);
- `agent.py`: the agent half (masked forward with error feedback, the regulariser);
- `ops.py`: its torch building blocks; `common.py`: what both halves share.
"""

from strategies.base import AgentHalf
from strategies.feddip.agent import feddip_hooks
from strategies.feddip.common import initial_masks_from_params, initial_weights_from_params
from strategies.feddip.server import FedDIP

__all__ = ["AGENT", "FedDIP"]

AGENT = AgentHalf(hooks=feddip_hooks, initial_weights=initial_weights_from_params,
                  initial_masks=initial_masks_from_params)
