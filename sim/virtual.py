"""Virtual clients: what one sampled client does with a task (the agent's own `run_task`),
the compact state a client keeps between rounds, and the in-process backend.

A virtual client is an index: its data is an index array into the one training set
loaded per process, its identity an agent id + token, its error-feedback residual a file
under the residual directory (only clients that uploaded a compressed delta have one), its
model the global model of the version it last trained (an int). Nothing of a client is
held in memory unless it is sampled this round.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from coordinator.protocol import Task, UpdateReport
from edge_agent.budget import BudgetExceeded
from edge_agent.levels import local_slices, train_level
from edge_agent.local import run_task
from models import ImageDataset
from sparse_kernels import ErrorFeedback, Weights
from sparse_kernels.npz import escape_key, unescape_key

__all__ = ["Backend", "ClientJob", "ClientResult", "LocalBackend", "ResidualStore", "agent_seed", "train_client"]


def agent_seed(federation_seed: int, index: int) -> int:
    """The seed `fedslim-agent run --seed S --client-index i` trains with (edge_agent.cli)."""
    return federation_seed * 1000 + index


@dataclass(frozen=True)
class ClientJob:
    index: int  # the virtual client: its shard is parts[index]
    seed: int
    residual: Weights | None  # the error-feedback residual it kept, None for none


@dataclass(frozen=True)
class ClientResult:
    index: int
    body: bytes | None  # the encoded update; None when the client declined
    report: UpdateReport | None
    residual: Weights  # to keep for its next round (empty: nothing to keep)
    decline_reason: str = ""
    needed_bytes: int | None = None
    error: str = ""  # the task failed (a NaN delta, a model it cannot build): no upload, as the agent skips it


def train_client(task: Task, weights: Weights, shard: ImageDataset, job: ClientJob, *,
                 memory_budget_bytes: int | None = None) -> ClientResult:
    """One sampled client's round, exactly as `EdgeAgent.handle` does it after the download:
    the residual is reused when it still fits the model's shapes (a structural prune
    starts it afresh), then the agent's `run_task` trains, compresses and encodes."""
    feedback = ErrorFeedback()
    if job.residual and all(k in weights and weights[k].shape == v.shape for k, v in job.residual.items()):
        feedback.load_state_dict(job.residual)
    try:
        if task.levels:  # width levels: the agent's own slice training (slices cut from the global weights)
            result = train_level(task, local_slices(task, weights), shard, feedback,
                                 memory_budget_bytes=memory_budget_bytes, seed=job.seed)
        else:
            result = run_task(task, weights, shard, feedback, memory_budget_bytes=memory_budget_bytes, seed=job.seed)
    except BudgetExceeded as exc:  # the agent declines: the round stops waiting for it
        return ClientResult(job.index, None, None, {}, str(exc)[:500] or "budget exceeded", exc.needed_bytes)
    except (ValueError, RuntimeError, KeyError) as exc:  # EdgeAgent.run skips the task (and keeps its residual)
        return ClientResult(job.index, None, None, job.residual or {}, error=f"{type(exc).__name__}: {exc}"[:500])
    return ClientResult(job.index, result.body, result.report, feedback.state_dict())


class Backend(Protocol):
    """Runs one round's jobs; results in the jobs' order."""

    def train(self, task: Task, weights: Weights, jobs: list[ClientJob]) -> list[ClientResult]: ...

    def close(self) -> None: ...


class LocalBackend:
    """Sampled clients one after another in this process (torch uses every core for each)."""

    def __init__(self, data: ImageDataset, parts: list[np.ndarray], *, memory_budget_bytes: int | None = None) -> None:
        self.data, self.parts, self.budget = data, parts, memory_budget_bytes

    def train(self, task: Task, weights: Weights, jobs: list[ClientJob]) -> list[ClientResult]:
        # the shard is materialised for the job only: a copy of its rows, dropped after
        return [train_client(task, weights, self.data.subset(self.parts[j.index]), j, memory_budget_bytes=self.budget)
                for j in jobs]

    def close(self) -> None:
        pass


class ResidualStore:
    """Error-feedback residuals on disk, one .npz per client that has one (the agent's own
    state directory keeps it the same way): memory stays flat in the number of clients."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def _path(self, index: int) -> Path:
        return self.root / f"client-{index}.npz"

    def get(self, index: int) -> Weights | None:
        path = self._path(index)
        if not path.exists():
            return None
        with np.load(path, allow_pickle=False) as z:
            return {unescape_key(k): z[k] for k in z.files}

    def put(self, index: int, residual: Weights) -> None:
        path = self._path(index)
        if not residual:
            path.unlink(missing_ok=True)
            return
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, **{escape_key(k): v for k, v in residual.items()})  # type: ignore[arg-type]
        tmp.replace(path)

    def __len__(self) -> int:
        return sum(1 for _ in self.root.glob("client-*.npz"))
