"""FedTiny's server pre-training on a tiny labelled set: the maths (deterministic, lowers
the set's loss), the params, loading at create (bad sets refused with a 422), and agents
downloading the pre-trained round-0 model instead of rebuilding the seeded one."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from coordinator.labelled import first_per_class
from edge_agent.agent import EdgeAgent
from edge_agent.local import initial_weights
from models import make_synthetic
from models.state import build_from_state
from models.training import evaluate
from sparse_kernels import decode
from sparse_kernels.patch import encode_model
from strategies.fedtiny.pretrain import PretrainSpec, pretrain_weights
from strategies.fedtiny.server import FedTiny
from strategies.registry import agent_half
from tests.federation_fixtures import small_federation


def _tiny(n: int = 40) -> Any:
    return make_synthetic(n, seed=1)


def _loss(weights: dict[str, np.ndarray], data: Any) -> float:
    return evaluate(build_from_state("lenet5", weights, in_channels=1, num_classes=10), data).loss


def test_pretraining_is_deterministic_for_a_seed_and_lowers_the_tiny_sets_loss(h: Any) -> None:
    # kills: an unseeded batch order (runs differ), a no-op pre-training (loss unchanged)
    w, data, ctx = h.weights_of("lenet5"), _tiny(), h.context(0, 1)
    spec = PretrainSpec(epochs=10, batch_size=8, lr=0.05)
    a = pretrain_weights(w, ctx, data, spec, seed=3)
    b = pretrain_weights(w, ctx, data, spec, seed=3)
    c = pretrain_weights(w, ctx, data, spec, seed=4)
    assert all(np.array_equal(a[k], b[k]) for k in w)
    assert any(not np.array_equal(a[k], c[k]) for k in w)  # the seed is the batch order's
    assert _loss(a, data) < 0.8 * _loss(w, data)


def test_initial_weights_pretrain_only_when_asked_and_need_the_set(h: Any) -> None:
    # kills: initial_weights ignoring `pretrain`, or silently skipping it without the set
    w, data = h.weights_of("lenet5"), _tiny()
    plain = FedTiny()
    assert plain.labelled_set() is None and plain.initial_weights(w, h.context(0, 1)) is w
    s = FedTiny(pretrain={"per_class": 4, "epochs": 3}, seed=1)
    assert s.labelled_set() is not None and s.labelled_set().per_class == 4  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="labelled set"):
        s.initial_weights(w, h.context(0, 1))
    out = s.initial_weights(w, replace(h.context(0, 1), labelled=data))
    assert any(not np.array_equal(out[k], w[k]) for k in w)


@pytest.mark.parametrize("params, match", [
    ({"epoch": 3}, "unknown pretrain keys"),  # a typo is refused, not ignored
    ({"per_class": 0}, "per_class"),
    ({"lr": -1}, "lr"),
    ("tiny.npz", "must be an object"),
])
def test_bad_pretrain_params_are_refused(params: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        FedTiny(pretrain=params)


def test_first_per_class_keeps_the_first_samples_of_each_class() -> None:
    labels = np.array([2, 0, 2, 1, 0, 2, 0])
    assert first_per_class(labels, 2).tolist() == [0, 1, 2, 3, 4]  # kills: a random or a global first-N pick


def _npz(path: Path, x: np.ndarray, y: np.ndarray) -> str:
    np.savez(path, x=x, y=y)
    return str(path)


def _create(coordinator: TestClient, h: Any, pretrain: dict[str, Any]) -> Any:
    cfg = small_federation(strategy={"name": "fedtiny", "params": {"density": 0.2, "pool_size": 2,
                                                                    "pretrain": pretrain}})
    return coordinator.post("/v1/federations", json=cfg, headers=h.ADMIN)


@pytest.mark.parametrize("case, match", [
    ("missing", "no such file"),
    ("not_npz", "unreadable"),
    ("wrong_shape", "the model takes"),  # (N, C, H, W) of a different image size
    ("bad_labels", "class indices"),
])
def test_a_bad_labelled_set_is_refused_at_create_with_a_clear_error(coordinator: TestClient, h: Any,
                                                                    tmp_path: Path, case: str, match: str) -> None:
    rng = np.random.default_rng(0)
    paths = {
        "missing": str(tmp_path / "absent.npz"),
        "not_npz": str(tmp_path / "text.npz"),
        "wrong_shape": _npz(tmp_path / "s.npz", rng.integers(0, 255, (10, 1, 32, 32), dtype=np.uint8),
                            np.arange(10) % 10),
        "bad_labels": _npz(tmp_path / "l.npz", rng.random((10, 1, 28, 28), dtype=np.float32), np.full(10, 12)),
    }
    (tmp_path / "text.npz").write_text("not a zip")
    resp = _create(coordinator, h, {"path": paths[case], "epochs": 1})
    assert resp.status_code == 422, resp.text
    assert "labelled set" in resp.json()["detail"] and match in resp.json()["detail"]
    assert coordinator.get("/v1/federations", headers=h.ADMIN).json() == []  # nothing half-created


def test_agents_download_the_pretrained_model_rather_than_rebuild_it(coordinator: TestClient,
                                                                      make_agent: Any, h: Any,
                                                                      tmp_path: Path) -> None:
    # kills: an agent half that rebuilds FedTiny's round-0 model from the seed (it lacks the
    # server's set, so it would train from the un-pre-trained model)
    assert agent_half("fedtiny").initial_weights is None  # type: ignore[union-attr]
    data = make_synthetic(60, seed=5)
    x = np.ascontiguousarray(data.images.transpose(0, 3, 1, 2))  # (N, C, H, W) uint8
    path = _npz(tmp_path / "tiny.npz", x, data.labels)
    resp = _create(coordinator, h, {"path": path, "per_class": 3, "epochs": 2})
    assert resp.status_code == 201, resp.text
    fid = resp.json()["id"]
    assert coordinator.post(f"/v1/federations/{fid}/start", headers=h.ADMIN).status_code == 200
    agent: EdgeAgent = make_agent(0)
    make_agent(1)
    task = h.wait_for(lambda: agent.client.poll_task(wait_s=1.0))
    server0 = decode(coordinator.get(f"/v1/federations/{fid}/models/0", headers=h.ADMIN).content).to_dense()
    rebuilt = initial_weights(task)  # the seeded model: not what the server holds
    assert hashlib.sha256(encode_model(fid, 0, rebuilt)).hexdigest() != task.model_sha256
    held = agent.sync_model(fid, 0, task)
    assert all(np.array_equal(held[k], server0[k]) for k in server0)
