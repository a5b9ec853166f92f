"""The compression options of issue 13 (DGC's density warm-up and local clipping, global
top-k, adaptive density), end to end through the service where they act there.

Mutations these tests kill: a warm-up that returns the target density from round 1 (or
never reaches it); the service sending the configured density instead of the round's, or
the broadcast ignoring the warm-up; `clip_grad_norm` accepted but not applied; the agent
ignoring `upload_scope` or `upload_energy`, the broadcast ignoring `download_energy`."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from coordinator.protocol import Task, TrainingConfig
from edge_agent.agent import EdgeAgent
from edge_agent.local import run_task
from models import ImageDataset, train_epochs
from sparse_kernels import SMALL_TENSOR, ErrorFeedback, decode, energy_density, select_topk, warmup_density
from tests.helpers import ADMIN, wait_for


def test_warmup_density_falls_geometrically_to_the_target() -> None:
    schedule = [warmup_density(0.1, r, 2) for r in range(1, 6)]
    np.testing.assert_allclose(schedule, [0.1 ** (1 / 3), 0.1 ** (2 / 3), 0.1, 0.1, 0.1])
    assert [warmup_density(0.1, r, 0) for r in (1, 2)] == [0.1, 0.1]  # off
    assert warmup_density(1.0, 1, 5) == 1.0  # dense stays dense
    with pytest.raises(ValueError):
        warmup_density(0.0, 1, 2)


def _sent_fraction(body: bytes, name: str) -> float:
    t = next(t for t in decode(body).tensors if t.name == name)
    return len(t.indices) / int(np.prod(t.shape))


def test_density_warmup_reaches_tasks_and_broadcasts(coordinator: TestClient, make_agent: Callable[[int], EdgeAgent],
                                                     start_federation: Callable[..., str]) -> None:
    # Arrange: 2 agents, 3 rounds, warm-up over 2 rounds towards 10 % both ways
    agents = [make_agent(0), make_agent(1)]
    fid = start_federation(rounds=3, density_warmup_rounds=2, download_density=0.1, download_values="fp16",
                           training={"batch_size": 32, "lr": 0.05, "max_steps": 4,
                                     "upload_density": 0.1, "upload_values": "fp16"})
    big = "classifier.1.weight"  # lenet5's largest tensor (48,000), far above SMALL_TENSOR
    densities, sent = [], []
    # Act: each round, both agents take their task and upload
    for rnd in (1, 2, 3):
        for agent in agents:
            task = agent.client.poll_task(5)
            assert task is not None and task.round == rnd
            weights = agent.sync_model(fid, task.model_version)
            result = run_task(task, weights, agent.data, ErrorFeedback())
            assert agent.client.upload_update(fid, rnd, result.body, result.report).accepted
            densities.append(task.training.upload_density)
            sent.append(_sent_fraction(result.body, big))
        wait_for(lambda rnd=rnd: coordinator.get(f"/v1/federations/{fid}", headers=ADMIN).json()["model_version"] >= rnd)
    # Assert: the task's density is the round's, the upload sends that share, and so does
    # the broadcast made when the round closed (its patch to the next version)
    expected = [warmup_density(0.1, r, 2) for r in (1, 1, 2, 2, 3, 3)]
    np.testing.assert_allclose(densities, expected)
    np.testing.assert_allclose(sent, expected, atol=0.01)
    for version in (1, 2, 3):
        patch = coordinator.get(f"/v1/federations/{fid}/models/{version}/patch", headers=ADMIN)
        assert patch.status_code == 200
        assert _sent_fraction(patch.content, big) == pytest.approx(warmup_density(0.1, version, 2), abs=0.01)


def test_clip_grad_norm_bounds_every_step() -> None:
    # Arrange: one SGD step without momentum moves the weights by lr × the clipped gradient
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 4))
    data = ImageDataset(np.random.default_rng(0).normal(0, 50, (8, 4, 4, 1)).astype(np.float32),
                        np.arange(8, dtype=np.int64) % 4, num_classes=4, name="features",
                        mean=(0.0,), std=(1.0,))
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    # Act
    train_epochs(model, data, optimizer=torch.optim.SGD(model.parameters(), lr=1.0), batch_size=8, max_steps=1,
                 clip_grad_norm=0.5)
    # Assert: ‖Δw‖ = lr·min(‖g‖, 0.5); the inputs' scale makes ‖g‖ far larger than 0.5
    moved = torch.linalg.vector_norm(torch.cat([p.detach().flatten() for p in model.parameters()]) - before)
    assert float(moved) == pytest.approx(0.5, rel=1e-4)


def test_clip_grad_norm_is_validated() -> None:
    with pytest.raises(ValueError):
        TrainingConfig(clip_grad_norm=0)


def test_global_upload_scope_ranks_the_whole_model(coordinator: TestClient, make_agent: Callable[[int], EdgeAgent],
                                                    start_federation: Callable[..., str]) -> None:
    # Arrange: one task, trained twice from the same weights with the same seed
    agent = make_agent(0)
    start_federation(rounds=1, clients_per_round=1, min_clients=1,
                     training={"batch_size": 32, "lr": 0.05, "max_steps": 4, "upload_density": 0.1,
                               "upload_values": "fp32"})
    task = agent.client.poll_task(5)
    assert task is not None
    weights = agent.sync_model(task.federation_id, task.model_version)
    scoped = {scope: Task.model_validate({**task.model_dump(), "training": {**task.training.model_dump(),
                                                                            "upload_scope": scope}})
              for scope in ("per_tensor", "global")}
    # Act
    sent = {scope: decode(run_task(t, weights, agent.data, ErrorFeedback(), seed=1).body) for scope, t in scoped.items()}
    # Assert: each upload is numpy's top-k of the same change under that scope
    full = run_task(Task.model_validate({**task.model_dump(), "training": {**task.training.model_dump(),
                                                                             "upload_density": 1.0}}),
                    weights, agent.data, ErrorFeedback(), seed=1).delta.to_dense()
    for scope, delta in sent.items():
        expected = select_topk(full, density=0.1, scope=scope, min_dense_numel=SMALL_TENSOR)
        for t in delta.tensors:
            assert set(t.indices.tolist()) == set(expected[t.name].indices.tolist()), (scope, t.name)
    big = [k for k, v in full.items() if v.size > SMALL_TENSOR]
    counts = {s: [len(t.indices) for t in d.tensors if t.name in big] for s, d in sent.items()}
    assert counts["per_tensor"] != counts["global"]  # the scopes really differ here


def test_upload_energy_sends_the_fewest_coordinates_carrying_that_share(
        coordinator: TestClient, make_agent: Callable[[int], EdgeAgent], start_federation: Callable[..., str]) -> None:
    # Mutation killed: the agent ignoring `upload_energy` (it would send the 10 % cap)
    # Arrange: one task, trained twice from the same weights with the same seed
    agent = make_agent(0)
    start_federation(rounds=1, clients_per_round=1, min_clients=1,
                     training={"batch_size": 32, "lr": 0.05, "max_steps": 4, "upload_density": 0.1,
                               "upload_values": "fp32", "upload_scope": "global", "upload_energy": 0.5})
    task = agent.client.poll_task(5)
    assert task is not None and task.training.upload_energy == 0.5
    weights = agent.sync_model(task.federation_id, task.model_version)
    # Act
    sent = decode(run_task(task, weights, agent.data, ErrorFeedback(), seed=1).body)
    full = run_task(Task.model_validate({**task.model_dump(), "training": {**task.training.model_dump(),
                                                                             "upload_density": 1.0,
                                                                             "upload_energy": None}}),
                    weights, agent.data, ErrorFeedback(), seed=1).delta.to_dense()
    # Assert: the upload is global top-k at the adaptive density of the same change, below the cap
    density = energy_density(full, 0.5, cap=0.1, min_dense_numel=SMALL_TENSOR)
    assert density < 0.1
    expected = select_topk(full, density=density, scope="global", min_dense_numel=SMALL_TENSOR)
    for t in sent.tensors:
        assert set(t.indices.tolist()) == set(expected[t.name].indices.tolist()), t.name


@pytest.mark.parametrize("energy", [0.0, 1.5, float("nan")])
def test_upload_energy_is_validated(energy: float) -> None:
    with pytest.raises(ValueError):
        TrainingConfig(upload_energy=energy)


def test_download_energy_broadcasts_the_fewest_coordinates_carrying_that_share(
        coordinator: TestClient, make_agent: Callable[[int], EdgeAgent], start_federation: Callable[..., str]) -> None:
    # Mutation killed: the service (or make_broadcast) ignoring `download_energy`: the patch
    # would send the 50 % cap of every large tensor
    # Arrange: one agent, one round, a dense fp32 upload, so the round's change is its delta
    agent = make_agent(0)
    fid = start_federation(rounds=1, clients_per_round=1, min_clients=1, download_density=0.5,
                           download_values="fp16", download_energy=0.5,
                           training={"batch_size": 32, "lr": 0.05, "max_steps": 4})
    task = agent.client.poll_task(5)
    assert task is not None
    weights = agent.sync_model(fid, task.model_version)
    result = run_task(task, weights, agent.data, ErrorFeedback())
    # Act
    assert agent.client.upload_update(fid, 1, result.body, result.report).accepted
    wait_for(lambda: coordinator.get(f"/v1/federations/{fid}", headers=ADMIN).json()["model_version"] >= 1)
    patch = coordinator.get(f"/v1/federations/{fid}/models/1/patch", headers=ADMIN)
    # Assert: per large tensor, the count top-k sends at the change's adaptive density
    # (the server's float32 change may differ from the delta in the last bit: ±1 %)
    change = result.delta.to_dense()
    density = energy_density(change, 0.5, cap=0.5, min_dense_numel=SMALL_TENSOR)
    assert density < 0.25
    expected = select_topk(change, density=density, min_dense_numel=SMALL_TENSOR)
    for t in decode(patch.content).tensors:
        if t.indices.size and np.prod(t.shape) > SMALL_TENSOR:
            assert len(t.indices) == pytest.approx(len(expected[t.name].indices), rel=0.01, abs=1), t.name
