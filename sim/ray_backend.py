"""The Ray backend: sampled clients as Ray tasks, one core each, over the local machine's
cores or a cluster's (`--ray-address`), as Flower's simulation runtime spreads its
ClientApps. The training set and the partition go into the object store once; per round,
the task and the base weights once; each job carries only its index, seed and residual.

`ray` is the optional `sim` extra (`pip install fedslim[sim]`), imported here only.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from coordinator.protocol import Task
from models import ImageDataset
from sim.virtual import ClientJob, ClientResult, train_client
from sparse_kernels import Weights

__all__ = ["RayBackend"]


def _train_remote(task_json: str, weights: Weights, data: ImageDataset, parts: list[np.ndarray], job: ClientJob,
                  budget: int | None) -> ClientResult:
    import torch

    torch.set_num_threads(1)  # one core per client, as the task's num_cpus=1 reserves
    return train_client(Task.model_validate_json(task_json), weights, data.subset(parts[job.index]), job,
                        memory_budget_bytes=budget)


class RayBackend:
    def __init__(self, data: ImageDataset, parts: list[np.ndarray], *, memory_budget_bytes: int | None = None,
                 address: str | None = None, num_cpus: int | None = None) -> None:
        import ray

        self._ray = ray
        self._owns = not ray.is_initialized()
        if self._owns:
            # workers import this repository's packages: its root goes on their path
            root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            env = {"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
                                "OMP_NUM_THREADS": "1"}}
            ray.init(address=address, num_cpus=None if address else (num_cpus or os.cpu_count()),
                     include_dashboard=False, log_to_driver=False, runtime_env=env, logging_level=logging.ERROR)
        self._remote: Any = ray.remote(num_cpus=1, max_retries=0)(_train_remote)
        self._data = ray.put(data)
        self._parts = ray.put(parts)
        self.budget = memory_budget_bytes

    def train(self, task: Task, weights: Weights, jobs: list[ClientJob]) -> list[ClientResult]:
        ray = self._ray
        task_ref, weights_ref = ray.put(task.model_dump_json()), ray.put(weights)
        refs = [self._remote.remote(task_ref, weights_ref, self._data, self._parts, j, self.budget) for j in jobs]
        return list(ray.get(refs))  # in the jobs' order: the engine submits deterministically

    def close(self) -> None:
        if self._owns and self._ray.is_initialized():
            self._ray.shutdown()
