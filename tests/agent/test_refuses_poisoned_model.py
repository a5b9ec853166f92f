"""An agent refuses a poisoned global model and keeps serving, instead of crashing.

The coordinator here is a hostile one (httpx.MockTransport serving a model with absurd
weights): our real coordinator clips updates, so it cannot be made to serve one.
Mutations this kills: no check before caching, a check that lets ±1e30 through, a run
loop that lets the refusal escape (`fedslim-agent run` exiting 1, as the audit found).
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from coordinator.protocol import Task, TrainingConfig
from edge_agent.agent import AgentState, EdgeAgent, UnsafeModel, check_model
from edge_agent.client import CoordinatorClient
from models import make_synthetic
from models.state import seeded_weights
from sparse_kernels.patch import encode_model


def _task(version: int) -> Task:
    return Task(federation_id="f00d", round=2, model="lenet5", in_channels=1, num_classes=10, image_size=None,
                model_version=version, training=TrainingConfig(max_steps=1), strategy={"name": "fedavg"},  # type: ignore[arg-type]
                deadline=time.time() + 0.5)


def _hostile(poison: np.ndarray) -> httpx.Client:
    weights = seeded_weights("lenet5", 0, in_channels=1, num_classes=10)
    first = next(iter(weights))
    weights[first] = weights[first] + poison
    model = encode_model("f00d", 1, weights)
    polls = {"n": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/tasks":
            polls["n"] += 1
            return httpx.Response(200, content=_task(1).model_dump_json()) if polls["n"] == 1 else httpx.Response(204)
        if request.url.path.endswith("/models/1"):
            return httpx.Response(200, content=model, headers={"X-Fedslim-Version": "1", "X-Fedslim-Kind": "model"})
        return httpx.Response(404, json={"detail": "nothing here"})

    return httpx.Client(transport=httpx.MockTransport(handler), base_url="http://hostile")


@pytest.mark.parametrize("poison", [np.float32(1e30), np.float32(-1e9)])
def test_agent_skips_a_poisoned_model_and_keeps_running(tmp_path: Path, poison: np.float32) -> None:
    http = _hostile(np.asarray(poison))
    agent = EdgeAgent(CoordinatorClient(http, token="t", max_tries=1), make_synthetic(64, seed=0),
                      AgentState(tmp_path / "agent"))

    with pytest.raises(UnsafeModel):
        agent.sync_model("f00d", 1, _task(1))
    assert not (tmp_path / "agent" / "model.npz").exists()  # never cached

    done = agent.run(idle_exit_s=0.3, poll_s=0.05)  # returns instead of raising
    assert done == 0


def test_check_model_accepts_an_honest_model() -> None:
    check_model(seeded_weights("lenet5", 0, in_channels=1, num_classes=10))
    with pytest.raises(UnsafeModel):
        check_model({"w": np.array([np.inf], np.float32)})
