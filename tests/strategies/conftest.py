"""Helpers for the mask strategies' tests: small models, contexts, tasks, and an
in-process coordinator (copied from tests/coordinator/conftest.py, trimmed)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from coordinator.app import create_app
from coordinator.protocol import StrategySpec, Task, TrainingConfig
from coordinator.settings import CoordinatorSettings
from coordinator.strategies import RoundContext
from edge_agent.agent import AgentState, EdgeAgent
from edge_agent.client import CoordinatorClient
from models import build_model, make_synthetic
from models.state import to_numpy_state

ADMIN = {"Authorization": "Bearer dev-admin-token"}
Weights = dict[str, np.ndarray]


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


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


def small_federation(**overrides: Any) -> dict[str, Any]:
    """A LeNet-5 federation on synthetic data that trains in about a second per round."""
    config: dict[str, Any] = {
        "model": "lenet5", "rounds": 2, "clients_per_round": 2, "min_clients": 2,
        "round_deadline_s": 60, "data": {"dataset": "synthetic", "eval_samples": 200},
        "training": {"batch_size": 32, "lr": 0.05, "max_steps": 4},
    }
    config.update(overrides)
    return config


@pytest.fixture
def coordinator(tmp_path: Path) -> Iterator[TestClient]:
    settings = CoordinatorSettings(data_dir=tmp_path / "coord", dev_mode=True, tick_s=0.05, long_poll_s=2)
    with TestClient(create_app(settings)) as client:
        yield client


@pytest.fixture
def make_agent(coordinator: TestClient, tmp_path: Path) -> Callable[[int], EdgeAgent]:
    data = make_synthetic(400, seed=0)

    def make(i: int) -> EdgeAgent:
        client = CoordinatorClient(coordinator, max_tries=2, backoff_s=0.01)
        client.enroll("dev-enroll-token", name=f"agent-{i}")
        return EdgeAgent(client, data.subset(np.arange(i * 200, (i + 1) * 200)), AgentState(tmp_path / f"agent-{i}"))

    return make


def create_started(coordinator: TestClient, **overrides: Any) -> str:
    resp = coordinator.post("/v1/federations", json=small_federation(**overrides), headers=ADMIN)
    assert resp.status_code == 201, resp.text
    fid = resp.json()["id"]
    assert coordinator.post(f"/v1/federations/{fid}/start", headers=ADMIN).status_code == 200
    return fid


def wait_for(cond: Callable[[], bool], timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not reached in time"
        time.sleep(0.05)


class Helpers:
    """The helpers above as a fixture (test modules cannot import conftest under
    --import-mode=importlib)."""

    ADMIN = ADMIN
    weights_of = staticmethod(weights_of)
    context = staticmethod(context)
    task_for = staticmethod(task_for)
    create_started = staticmethod(create_started)
    wait_for = staticmethod(wait_for)


@pytest.fixture
def h() -> type[Helpers]:
    return Helpers
