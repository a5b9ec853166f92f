"""Training one width level of the global model (the task's `levels`).

The agent slices the global weights to its level (`apply_reshape`), trains the slice as an
ordinary model, and uploads the delta in the slice's shapes with `report.level` saying
which. It starts at the level the coordinator gave it and steps down to narrower levels
when its own plan (hooks included, its real allocator) says a level does not fit.

The error-feedback residual is kept in global coordinates: a round's slice of it is
trained on and written back, and what lies outside the slice waits until a round whose
level covers it again, so moving between levels loses nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from coordinator.protocol import Task, TaskLevel
from edge_agent.budget import BudgetExceeded
from edge_agent.local import LocalResult, run_task
from models import ImageDataset
from sparse_kernels import ErrorFeedback, Weights
from sparse_kernels.errors import MalformedPayload
from sparse_kernels.reshape import Reshape, apply_reshape, from_runs, scatter_slice, slice_shapes

__all__ = ["SliceSource", "level_reshape", "local_slices", "merge_feedback", "sliced_feedback", "train_level"]

log = logging.getLogger("fedslim.agent")


def level_reshape(level: TaskLevel, shapes: Mapping[str, tuple[int, ...]]) -> Reshape:
    """The level's kept indices, checked against the global weights' shapes (ValueError)."""
    reshape: Reshape = {}
    for name, dims in level.slices.items():
        if name not in shapes or len(dims) != len(shapes[name]):
            raise ValueError(f"level {level.width}: slice of {name!r} does not match the model")
        try:
            reshape[name] = [None if runs is None else from_runs(runs, size)
                             for runs, size in zip(dims, shapes[name], strict=True)]
        except MalformedPayload as exc:
            raise ValueError(f"level {level.width}: {name}: {exc}") from None
    return reshape


def sliced_feedback(feedback: ErrorFeedback, reshape: Reshape) -> ErrorFeedback:
    """An ErrorFeedback holding the slice of `feedback`'s (global) residual."""
    local = ErrorFeedback()
    local.load_state_dict(apply_reshape(feedback.state_dict(), {k: v for k, v in reshape.items()
                                                                 if k in feedback.residual}))
    return local


def merge_feedback(feedback: ErrorFeedback, local: ErrorFeedback, reshape: Reshape,
                   shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Write the slice's new residual back into the global one (zeros where none was)."""
    state = feedback.state_dict()
    for name in local.residual:
        state.setdefault(name, np.zeros(shapes[name], dtype=np.float32))
    scatter_slice(state, local.state_dict(), reshape)
    feedback.load_state_dict(state)


# level index -> that level's slice of the global weights (downloaded, or cut locally)
SliceSource = Callable[[int], Weights]


def train_level(task: Task, slice_for: SliceSource, data: ImageDataset, feedback: ErrorFeedback,
                **run_kwargs: Any) -> LocalResult:
    """Train the task's level (or the widest narrower one that fits); the upload is a delta
    on that slice. Raises BudgetExceeded when not even the narrowest fits, naming what it needs."""
    shapes = {k: tuple(v) for k, v in task.model_shapes.items()}
    start = task.level or 0
    if not 0 <= start < len(task.levels):
        raise ValueError(f"task level {start} is not one of its {len(task.levels)} levels")
    last: BudgetExceeded | None = None
    for i in range(start, len(task.levels)):
        reshape = level_reshape(task.levels[i], shapes)
        weights = slice_for(i)
        expected = slice_shapes(shapes, reshape)
        if {k: v.shape for k, v in weights.items()} != expected:
            raise ValueError(f"level {i}: the slice's shapes do not match the task's levels")
        local = sliced_feedback(feedback, reshape)
        try:
            result = run_task(task, weights, data, local, level=i, **run_kwargs)
        except BudgetExceeded as exc:
            log.warning("round %d: level %d (width %.3g) does not fit (%s)%s", task.round, i, task.levels[i].width, exc,
                        "; trying a narrower one" if i + 1 < len(task.levels) else "")
            last = exc
            continue
        merge_feedback(feedback, local, reshape, shapes)
        return result
    assert last is not None
    raise last


def local_slices(task: Task, weights: Weights) -> SliceSource:
    """Slices cut from global weights the agent holds (the seeded initial model it rebuilt)."""
    shapes = {k: v.shape for k, v in weights.items()}
    return lambda i: apply_reshape(weights, level_reshape(task.levels[i], shapes))
