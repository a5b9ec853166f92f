"""A budget that shrinks the batch shrinks the learning rate in proportion (linear scaling
rule): training under a plan of batch 8 from a task of batch 64 gives exactly the update
of an unbudgeted task of batch 8 at lr/8. Mutations this kills: not scaling (the deltas
differ by ~8x), scaling up a batch the plan did not shrink."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from coordinator.protocol import StrategySpec, Task, TrainingConfig
from edge_agent.budget import MemoryEstimate, TrainingPlan
from edge_agent.local import run_task, scaled_lr
from models import make_synthetic
from models.state import seeded_weights
from sparse_kernels import ErrorFeedback


def _task(**training: Any) -> Task:
    return Task(federation_id="f", round=1, model="lenet5", in_channels=1, num_classes=10, image_size=None,
                model_version=0, training=TrainingConfig(max_steps=3, **training), strategy=StrategySpec(),
                deadline=time.time() + 60)


def batch_8(model: Any, input_shape: Any, budget: int, **_: Any) -> TrainingPlan:
    return TrainingPlan(8, (), MemoryEstimate(8, 1024, 0, 0, 0, 0, 0))


def _delta(task: Task, **kw: Any) -> dict[str, np.ndarray]:
    torch.manual_seed(0)
    weights = seeded_weights("lenet5", 0, in_channels=1, num_classes=10)
    result = run_task(task, weights, make_synthetic(64, seed=2), ErrorFeedback(), **kw)
    return {t.name: t.values for t in result.delta.tensors}


def test_a_budget_shrunk_batch_trains_at_the_scaled_rate() -> None:
    budgeted = _delta(_task(batch_size=64, lr=0.08), memory_budget_bytes=1 << 30, planner=batch_8)
    reference = _delta(_task(batch_size=8, lr=0.01))
    for name, values in reference.items():
        np.testing.assert_allclose(budgeted[name], values, rtol=1e-4, atol=1e-7, err_msg=name)


def test_scaled_lr_never_raises_the_rate() -> None:
    assert scaled_lr(0.05, 16, 64) == 0.0125
    assert scaled_lr(0.05, 64, 64) == 0.05
    assert scaled_lr(0.05, 128, 64) == 0.05
