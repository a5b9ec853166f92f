"""Fixtures for in-process federations (the real app and store on a tmp SQLite file,
driven by the real agent client), shared by tests/coordinator and tests/strategies.
Loaded as a pytest plugin from tests/conftest.py."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from coordinator.app import create_app
from coordinator.settings import CoordinatorSettings
from edge_agent.agent import AgentState, EdgeAgent
from edge_agent.client import CoordinatorClient
from models import make_synthetic
from tests.helpers import ADMIN, ENROLL


@pytest.fixture
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


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
def coordinator(tmp_path: Path, database_url: str | None) -> Iterator[TestClient]:
    # database_url (tests/pg.py): SQLite unless the test is marked both_databases
    settings = CoordinatorSettings(data_dir=tmp_path / "coord", database_url=database_url, dev_mode=True,
                                   tick_s=0.05, long_poll_s=2)
    with TestClient(create_app(settings)) as client:
        yield client


@pytest.fixture
def make_agent(coordinator: TestClient, tmp_path: Path) -> Callable[[int], EdgeAgent]:
    data = make_synthetic(400, seed=0)

    def make(i: int) -> EdgeAgent:
        client = CoordinatorClient(coordinator, max_tries=2, backoff_s=0.01)
        client.enroll(ENROLL, name=f"agent-{i}")
        return EdgeAgent(client, data.subset(np.arange(i * 200, (i + 1) * 200)), AgentState(tmp_path / f"agent-{i}"))

    return make


def create_started(coordinator: TestClient, **overrides: Any) -> str:
    resp = coordinator.post("/v1/federations", json=small_federation(**overrides), headers=ADMIN)
    assert resp.status_code == 201, resp.text
    fid = resp.json()["id"]
    assert coordinator.post(f"/v1/federations/{fid}/start", headers=ADMIN).status_code == 200
    return fid


@pytest.fixture
def start_federation(coordinator: TestClient) -> Callable[..., str]:
    """Create and start a small federation; returns its id."""
    return lambda **overrides: create_started(coordinator, **overrides)


def run_to_completion(coordinator: TestClient, fid: str, agents: list[EdgeAgent], *, max_tasks: int,
                      poll_s: float = 1.0, timeout: float = 30.0) -> list[dict[str, Any]]:
    """Run `agents` in threads of this process for `max_tasks` tasks each, wait until the
    federation completes, and return its rounds' metrics."""
    workers = [threading.Thread(target=a.run, kwargs={"max_tasks": max_tasks, "poll_s": poll_s}) for a in agents]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    end = time.monotonic() + timeout
    while coordinator.get(f"/v1/federations/{fid}", headers=ADMIN).json()["status"] != "completed":
        assert time.monotonic() < end, f"federation {fid} did not complete in {timeout:.0f} s"
        time.sleep(0.05)
    rows: list[dict[str, Any]] = coordinator.get(f"/v1/federations/{fid}/rounds", headers=ADMIN).json()
    return rows


@pytest.fixture
def run_federation(coordinator: TestClient) -> Callable[..., list[dict[str, Any]]]:
    """`run_federation(fid, agents, max_tasks=N)`: `run_to_completion` on this coordinator."""
    return lambda fid, agents, **kw: run_to_completion(coordinator, fid, agents, **kw)

