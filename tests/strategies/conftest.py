"""Helpers for the mask strategies' tests: small models, contexts, tasks, and an
in-process coordinator (copied from tests/coordinator/conftest.py, trimmed)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
import torch

from coordinator.protocol import StrategySpec, Task, TrainingConfig
from models import build_model
from models.state import to_numpy_state
from sparse_kernels import Weights
from strategies import LocalHooks, RoundContext, hooks_for
from tests.helpers import ADMIN, wait_for


@pytest.fixture(autouse=True)
def _one_thread(one_thread: None) -> None:
    pass


def weights_of(model: str = "lenet5", seed: int = 0) -> Weights:
    torch.manual_seed(seed)
    return to_numpy_state(build_model(model))


def context(rnd: int, total: int, *, model: str = "lenet5", participants: int = 2,
            mean_sq_delta: Weights | None = None) -> RoundContext:
    return RoundContext(rnd, total, model, 1, 10, None, participants, mean_sq_delta)


def task_for(strategy: str, params: dict[str, Any], *, rnd: int = 1, model: str = "lenet5",
             **training: Any) -> Task:
    return Task(federation_id="f", round=rnd, model=model, in_channels=1, num_classes=10, image_size=None,
                model_version=rnd - 1, training=TrainingConfig(**{"batch_size": 32, "lr": 0.05, **training}),
                strategy=StrategySpec(name=strategy, params=params), deadline=time.time() + 600)


def task_hooks(task: Task, model: torch.nn.Module, weights: Weights, data: Any) -> LocalHooks:
    """The agent half's hooks for `task`, as `edge_agent.local.run_task` gets them."""
    return hooks_for(task.strategy.name, task.strategy.params, model, weights, data)


class Helpers:
    """The helpers above as a fixture (test modules cannot import conftest under
    --import-mode=importlib)."""

    ADMIN = ADMIN
    weights_of = staticmethod(weights_of)
    context = staticmethod(context)
    task_for = staticmethod(task_for)
    task_hooks = staticmethod(task_hooks)
    wait_for = staticmethod(wait_for)


@pytest.fixture
def h(start_federation: Callable[..., str], run_federation: Callable[..., list[dict[str, Any]]]) -> Helpers:
    helpers = Helpers()
    helpers.create_started = lambda _coordinator, **kw: start_federation(**kw)  # type: ignore[attr-defined]
    helpers.run_federation = lambda _coordinator, fid, agents, **kw: run_federation(  # type: ignore[attr-defined]
        fid, agents, **kw)
    return helpers
