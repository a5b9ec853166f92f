"""Width levels on the coordinator: the round's levels with their estimated training
memory, which level each sampled agent gets, and the levels as a task carries them.

The estimate is the agents' own (`models.memory`, counted on the meta device: nothing is
allocated) at the federation's `min_batch` with nothing frozen. Levels go with strategies
whose agents train plainly (FedAvg, structured): their hooks hold no memory of their own,
so the estimate is the whole need. An agent still plans within its level and, if its own
plan says the level does not fit, trains a narrower one of the task's levels.
"""

from __future__ import annotations

from dataclasses import dataclass

from coordinator.protocol import FederationCreate, TaskLevel
from models.memory import estimate_training_memory
from models.state import build_from_state
from models.zoo import default_image_size
from pruning.levels import Level, level_slices
from sparse_kernels.reshape import apply_reshape, to_runs
from strategies import Weights

__all__ = ["PlannedLevel", "assign_level", "plan_levels", "task_levels"]


@dataclass(frozen=True)
class PlannedLevel:
    level: Level
    need_bytes: int  # estimated training working set at min_batch

    @property
    def width(self) -> float:
        return self.level.width


def plan_levels(cfg: FederationCreate, weights: Weights, rnd: int) -> list[PlannedLevel]:
    """The levels of round `rnd` over `weights`, widest first (`level_slices`)."""
    assert cfg.levels is not None
    spec = cfg.levels
    size = cfg.image_size or default_image_size(cfg.in_channels)
    planned: list[PlannedLevel] = []
    for level in level_slices(cfg.model, weights, spec.width_list(), rule=spec.rule, rnd=rnd,
                              in_channels=cfg.in_channels, num_classes=cfg.num_classes, image_size=cfg.image_size):
        net = build_from_state(cfg.model, apply_reshape(weights, level.reshape), in_channels=cfg.in_channels,
                               num_classes=cfg.num_classes, image_size=cfg.image_size)
        need = estimate_training_memory(net, (cfg.in_channels, size, size), spec.min_batch,
                                        optimizer="sgd_momentum" if cfg.training.momentum else "sgd").total
        planned.append(PlannedLevel(level, int(need)))
    return planned


def assign_level(levels: list[PlannedLevel], budget_bytes: int | None) -> int | None:
    """The widest level whose need fits `budget_bytes` (no budget: the widest); None when
    none does."""
    if budget_bytes is None:
        return 0
    return next((i for i, p in enumerate(levels) if p.need_bytes <= budget_bytes), None)


def task_levels(levels: list[PlannedLevel]) -> list[TaskLevel]:
    return [TaskLevel(width=p.width, need_bytes=p.need_bytes, macs=p.level.macs,
                      slices={name: [None if keep is None else to_runs(keep) for keep in dims]
                              for name, dims in p.level.reshape.items()})
            for p in levels]
