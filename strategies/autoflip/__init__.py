"""AutoFLIP (Internò et al. 2024; ALGORITHMS.md §3): federated loss exploration →
guidance scores → quantile mask. Everything of the method is in this folder:

- `server.py`: the server half (`AutoFLIP`: scores from the deltas' second moment);
- `agent.py`: the agent half (plain exploration, then masked training and uploads);
- `ops.py`: guidance scores and masks as torch functions.
"""

from strategies.autoflip.agent import autoflip_hooks
from strategies.autoflip.server import AutoFLIP
from strategies.base import AgentHalf

__all__ = ["AGENT", "AutoFLIP"]

AGENT = AgentHalf(hooks=autoflip_hooks)
