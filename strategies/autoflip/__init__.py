"""AutoFLIP (Internò et al. 2024; ALGORITHMS.md §3): federated loss exploration →
guidance scores → quantile mask. Everything of the method is in this folder:

- `server.py`: the server half (`AutoFLIP`: exploration rounds before training, the
  guidance summed over them, the mask);
- `agent.py`: the agent half (a scout with early stopping uploading (θ_k − θ₀)², then
  masked training and uploads);
- `ops.py`: the scout's training loop and the guidance maths, pure functions;
- `common.py`: the exploration defaults and upload names both halves share.
"""

from strategies.autoflip.agent import autoflip_hooks
from strategies.autoflip.server import AutoFLIP
from strategies.base import AgentHalf

__all__ = ["AGENT", "AutoFLIP"]

AGENT = AgentHalf(hooks=autoflip_hooks)
