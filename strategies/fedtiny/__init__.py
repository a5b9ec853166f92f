"""FedTiny (Huang et al., ICDCS 2023; ALGORITHMS.md §2): candidate pool, adaptive BN
selection, progressive prune-and-grow. Everything of the method is in this folder:

- `server.py`: the server half (`FedTiny`: setup rounds, selection, grow plans);
- `agent.py`: the agent half (BN statistics and candidate losses, masked training,
  gradient tops at pruned positions);
- `ops.py`: its torch building blocks (pool, BN recalibration, prune-and-grow).
"""

from strategies.base import AgentHalf
from strategies.fedtiny.agent import fedtiny_hooks
from strategies.fedtiny.server import FedTiny

__all__ = ["AGENT", "FedTiny"]

AGENT = AgentHalf(hooks=fedtiny_hooks)
