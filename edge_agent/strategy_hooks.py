"""Agent-side halves of the federation strategies: how local training changes for the
strategy named in the task. Each entry maps (task, model, global weights, local data) to
hooks that `models.training.train_epochs` understands, plus the auxiliary statistics the
strategy's server half asked for; strategies that need nothing special (fedavg,
structured: the structure arrives in the weights' shapes) use the default.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from coordinator.protocol import Task
from models import ImageDataset

__all__ = ["AGENT_HOOKS", "HookFactory", "LocalHooks", "hooks_for"]


@dataclass
class LocalHooks:
    regularizer: Callable[[nn.Module], torch.Tensor] | None = None
    after_step: Callable[[], None] | None = None
    # entered around local training (e.g. a masked forward with error feedback)
    context: AbstractContextManager[object] = field(default_factory=nullcontext)
    # boolean masks restricting which coordinates may be uploaded (None: any)
    upload_support: dict[str, np.ndarray] | None = None
    # False for statistics-only rounds (FedTiny's candidate selection): no training, no delta
    train: bool = True
    # called after training: auxiliary tensors to upload ("aux/<name>" → array)
    aux: Callable[[], dict[str, np.ndarray]] | None = None


HookFactory = Callable[[Task, nn.Module, dict[str, np.ndarray], ImageDataset], LocalHooks]
AGENT_HOOKS: dict[str, HookFactory] = {}


def hooks_for(task: Task, model: nn.Module, weights: dict[str, np.ndarray], data: ImageDataset) -> LocalHooks:
    factory = AGENT_HOOKS.get(task.strategy.name)
    return factory(task, model, weights, data) if factory else LocalHooks()


# Strategy modules register their factories in AGENT_HOOKS when imported (at the bottom,
# so that LocalHooks and AGENT_HOOKS exist when they do).
import edge_agent.dynamic_hooks  # noqa: E402, F401
import edge_agent.fedtiny_hooks  # noqa: E402, F401
import edge_agent.mask_hooks  # noqa: E402, F401
