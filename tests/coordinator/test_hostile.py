"""Hostile input against the real app: each case gets the right status, a bounded reply,
and leaves the round and the global model byte-identical.

One federation, one open round with two selected agents; every hostile request is sent,
then the test checks that the model blob, the round and its accepted updates are
unchanged, and finally that honest uploads still close the round. Mutations killed:
dropping any single validation (codec CRC, NaN, index range, shapes, meta binding,
report bounds, body caps, path bounds, auth), echoing input in a 422, a rejected upload
that is folded anyway.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from coordinator.protocol import REPORT_HEADER
from sparse_kernels import DeltaMeta, ModelDelta, SparseTensor, decode, encode
from sparse_kernels.fuzz import reframe
from tests.coordinator.test_aggregation_oracle import _enroll, _wait_version
from tests.federation_fixtures import small_federation
from tests.helpers import ADMIN

REPORT = {"num_samples": 10, "train_loss": 0.5, "train_accuracy": 0.5, "train_seconds": 1.0}


@pytest.fixture
def arena(coordinator: TestClient) -> dict[str, Any]:
    agents = _enroll(coordinator, 3)  # agents[2] will not be selected
    cfg = small_federation(rounds=1, clients_per_round=2, min_clients=2, seed=7)
    fid = coordinator.post("/v1/federations", json=cfg, headers=ADMIN).json()["id"]
    coordinator.post(f"/v1/federations/{fid}/start", headers=ADMIN)
    selected = []
    for auth in agents:
        r = coordinator.get("/v1/tasks", params={"wait": 2}, headers=auth)
        if r.status_code == 200:
            selected.append(auth)
    outsider = next(a for a in agents if a not in selected)
    model = coordinator.get(f"/v1/federations/{fid}/models/0", headers=ADMIN).content
    weights = decode(model).to_dense()
    return {"fid": fid, "selected": selected, "outsider": outsider, "model": model, "weights": weights}


def _delta(weights: dict[str, np.ndarray], fid: str, *, rnd: int = 1, base: int = 0, scale: float = 1e-3,
           kind: str = "delta", fill: float | None = None) -> bytes:
    meta = DeltaMeta(federation_id=fid, round=rnd, base_version=base, num_samples=10, kind=kind)
    rng = np.random.default_rng(int(scale * 1e6) % 1000)
    tensors = tuple(SparseTensor.from_dense_nonzero(k, np.full(v.shape, fill, np.float32) if fill is not None
                                                    else rng.normal(0, scale, v.shape).astype(np.float32))
                    for k, v in weights.items())
    return encode(ModelDelta(meta, tensors), values="fp32")


def _put(c: TestClient, auth: dict[str, str], fid: str, rnd: Any, body: bytes, report: Any = None,
         headers: dict[str, str] | None = None) -> Any:
    h = {**auth, "Content-Type": "application/octet-stream", **(headers or {})}
    if report is not False:
        h[REPORT_HEADER] = report if isinstance(report, str) else json.dumps(report or REPORT)
    return c.put(f"/v1/federations/{fid}/rounds/{rnd}/update", content=body, headers=h)


def _state(c: TestClient, fid: str) -> tuple[bytes, Any, Any]:
    fed = c.get(f"/v1/federations/{fid}", headers=ADMIN).json()
    model = c.get(f"/v1/federations/{fid}/model", headers=ADMIN).content
    svc = c.app.state.service  # type: ignore[attr-defined]
    with svc.store.tx() as conn:
        ups = [(u.agent_id, u.blob) for u in svc.store.list_updates(conn, fid, 1, 1)]
    return model, (fed["current_round"], fed["model_version"], fed["status"]), ups


def test_hostile_uploads_change_nothing(coordinator: TestClient, arena: dict[str, Any]) -> None:
    fid, (a, b), outsider, w = arena["fid"], arena["selected"], arena["outsider"], arena["weights"]
    good = _delta(w, fid)
    first = list(w)[0]
    shapes_wrong = encode(ModelDelta(DeltaMeta(federation_id=fid, round=1, base_version=0, num_samples=10),
                                     (SparseTensor(first, (3, 3), np.arange(2), np.ones(2, np.float32)),)))
    sentinel = np.float32(4321.5)
    marked = encode(ModelDelta(DeltaMeta(federation_id=fid, round=1, base_version=0, num_samples=10),
                               (SparseTensor(first, w[first].shape, np.array([0]), np.array([sentinel])),)),
                    values="fp32")
    nan_body = reframe(marked.replace(sentinel.tobytes(), np.float32(np.nan).tobytes()))
    flipped = bytearray(good)
    flipped[len(flipped) // 2] ^= 0x10
    # accepted first, so the replay below has something to copy
    assert _put(coordinator, a, fid, 1, good).status_code == 200
    before = _state(coordinator, fid)

    cases: list[tuple[str, Any, int]] = [
        # (what, request, expected status)
        ("no token", lambda: _put(coordinator, {}, fid, 1, good), 401),
        ("wrong token", lambda: _put(coordinator, {"Authorization": "Bearer nope"}, fid, 1, good), 401),
        ("admin token as agent", lambda: _put(coordinator, ADMIN, fid, 1, good), 403),
        ("not selected", lambda: _put(coordinator, outsider, fid, 1, _delta(w, fid, scale=2e-3)), 409),
        ("replay of a's bytes by b", lambda: _put(coordinator, b, fid, 1, good), 409),
        ("truncated", lambda: _put(coordinator, b, fid, 1, good[: len(good) // 2]), 422),
        ("bit flip (CRC)", lambda: _put(coordinator, b, fid, 1, bytes(flipped)), 422),
        ("NaN value", lambda: _put(coordinator, b, fid, 1, nan_body), 422),
        ("wrong shape", lambda: _put(coordinator, b, fid, 1, shapes_wrong), 422),
        ("garbage", lambda: _put(coordinator, b, fid, 1, b"\x00" * 100), 422),
        ("empty body", lambda: _put(coordinator, b, fid, 1, b""), 422),
        ("meta for another round", lambda: _put(coordinator, b, fid, 1, _delta(w, fid, rnd=2)), 409),
        ("meta for another base", lambda: _put(coordinator, b, fid, 1, _delta(w, fid, base=5)), 409),
        ("meta for another federation", lambda: _put(coordinator, b, fid, 1, _delta(w, "beef")), 409),
        ("a full model, not a delta", lambda: _put(coordinator, b, fid, 1, _delta(w, fid, kind="model")), 409),
        ("round not open", lambda: _put(coordinator, b, fid, 2, _delta(w, fid, rnd=2)), 409),
        ("round beyond SQL INTEGER", lambda: _put(coordinator, b, fid, 2**70, good), 422),
        ("negative round", lambda: _put(coordinator, b, fid, -1, good), 422),
        ("unknown federation", lambda: _put(coordinator, b, "abcdef", 1, good), 404),
        ("federation id not hex", lambda: _put(coordinator, b, "not-hex", 1, good), 422),
        ("missing report", lambda: _put(coordinator, b, fid, 1, good, report=False), 422),
        ("report not JSON", lambda: _put(coordinator, b, fid, 1, good, report="{"), 422),
        ("report with 10**400 bytes of memory", lambda: _put(
            coordinator, b, fid, 1, good, report='{"num_samples": 10, "train_loss": 0.5, "train_accuracy": 0.5, '
            '"train_seconds": 1, "peak_memory_bytes": 1' + "0" * 400 + "}"), 422),
        ("num_samples 10**10", lambda: _put(coordinator, b, fid, 1, good, report={**REPORT, "num_samples": 10**10}),
         422),
        ("NaN loss", lambda: _put(coordinator, b, fid, 1, good, report='{"num_samples": 10, "train_loss": NaN, '
                                  '"train_accuracy": 0.5, "train_seconds": 1}'), 422),
        ("extra report field", lambda: _put(coordinator, b, fid, 1, good, report={**REPORT, "x": 1}), 422),
        ("declared 10 GB body", lambda: _put(coordinator, b, fid, 1, good, headers={"Content-Length": str(10**10)}),
         413),
    ]
    for what, request, status in cases:
        resp = request()
        assert resp.status_code == status, f"{what}: {resp.status_code} {resp.text[:300]}"
        assert len(resp.content) < 4096, f"{what}: reply of {len(resp.content)} bytes"
        assert _state(coordinator, fid) == before, f"{what} changed the round or the model"

    # the honest second upload still closes the round
    assert _put(coordinator, b, fid, 1, _delta(w, fid, scale=2e-3)).status_code == 200
    _wait_version(coordinator, fid, 1, ADMIN)


def test_huge_json_bodies_are_refused_before_reading_and_never_echoed(coordinator: TestClient) -> None:
    big = b'{"enrollment_token": "' + b"x" * (1 << 20) + b'"}'
    r = coordinator.post("/v1/agents/enroll", content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and len(r.content) < 1000
    r = coordinator.post("/v1/agents/enroll", json={"enrollment_token": "y" * 5000, "name": "n"})
    assert r.status_code == 422 and "yyyy" not in r.text  # the validation error does not echo input
    chunked = coordinator.post("/v1/agents/enroll", content=iter([b"{" + b" " * 40000] * 3),
                               headers={"Content-Type": "application/json"})
    assert chunked.status_code == 413  # no Content-Length: counted while streaming


@pytest.mark.parametrize(("override", "needle"), [
    ({"seed": -1}, "seed"),
    ({"seed": 2**40}, "seed"),
    ({"data": {"dataset": "fashion_mnist", "data_dir": "/nonexistent/fmnist"}}, "refused"),
    ({"model": "fedavg_cnn", "image_size": 512}, "parameters"),  # its fc layer at 512×512: 520 M parameters
    ({"model": "resnet20", "in_channels": 3, "image_size": 512}, "GiB"),  # evaluation activations
    ({"model": "no_such_model"}, "unknown model"),
    ({"strategy": {"name": "fedavg", "params": {"bogus": 1}}}, "bogus"),
    ({"aggregation": {"rule": "median", "trim_ratio": 0.7}}, "trim_ratio"),
    ({"name": "x" * 1000}, "name"),
])
def test_create_refuses_what_would_fail_later(coordinator: TestClient, override: dict[str, Any], needle: str) -> None:
    cfg = {**small_federation(), **override}
    r = coordinator.post("/v1/federations", json=cfg, headers=ADMIN)
    assert r.status_code == 422, r.text
    assert needle in r.text
    assert coordinator.get("/v1/federations", headers=ADMIN).json() == []


def test_auth_scopes_models_exports_and_revocation(coordinator: TestClient, arena: dict[str, Any]) -> None:
    fid, (a, _), outsider = arena["fid"], arena["selected"], arena["outsider"]
    assert coordinator.get(f"/v1/federations/{fid}/models/0", headers=a).status_code == 200
    assert coordinator.get(f"/v1/federations/{fid}/models/0", headers=outsider).status_code == 403
    assert coordinator.get(f"/v1/federations/{fid}/export/report", headers=a).status_code == 403
    assert coordinator.get("/v1/federations", headers=a).status_code == 403
    agent_id = next(x["id"] for x in coordinator.get("/v1/agents", headers=ADMIN).json())
    token_of = {}
    for auth in [*arena["selected"], outsider]:
        r = coordinator.get("/v1/tasks", params={"wait": 0}, headers=auth)
        token_of[auth["Authorization"]] = r.status_code
    r = coordinator.delete(f"/v1/agents/{agent_id}", headers=ADMIN)
    assert r.status_code == 200 and r.json()["status"] == "revoked"
    statuses = [coordinator.get("/v1/tasks", params={"wait": 0}, headers=auth).status_code
                for auth in [*arena["selected"], outsider]]
    assert statuses.count(401) == 1  # exactly the revoked one
    assert coordinator.delete("/v1/agents/ffff", headers=ADMIN).status_code == 404


def test_enrollment_is_rate_limited_per_ip(tmp_path: Any) -> None:
    from coordinator.app import create_app
    from coordinator.settings import CoordinatorSettings

    settings = CoordinatorSettings(data_dir=tmp_path / "c", dev_mode=True, enroll_per_ip_per_minute=3, max_agents=5)
    with TestClient(create_app(settings)) as c:
        codes = [c.post("/v1/agents/enroll", json={"enrollment_token": "dev-enroll-token"}).status_code
                 for _ in range(5)]
        assert codes == [201, 201, 201, 429, 429]
        r = c.post("/v1/agents/enroll", json={"enrollment_token": "dev-enroll-token"})
        assert "Retry-After" in r.headers


def test_one_failing_federation_never_blocks_another(coordinator: TestClient) -> None:
    """Federation A (clipping off, server lr 2: an agent's +3e38 deltas overflow its
    weights to Inf) fails with its reason; federation B, created after it, completes."""
    agents = _enroll(coordinator, 2)
    bad_cfg = small_federation(rounds=1, clients_per_round=1, min_clients=1, name="doomed",
                               aggregation={"clip_relative": None},
                               strategy={"name": "fedavg", "params": {"server_lr": 2.0}})
    bad = coordinator.post("/v1/federations", json=bad_cfg, headers=ADMIN).json()["id"]
    good = coordinator.post("/v1/federations", json=small_federation(rounds=1, clients_per_round=1, min_clients=1),
                            headers=ADMIN).json()["id"]
    svc = coordinator.app.state.service  # type: ignore[attr-defined]
    svc.backoff.base_s = 0.05  # fast retries for the test; the policy is the same
    coordinator.post(f"/v1/federations/{bad}/start", headers=ADMIN)
    weights = decode(coordinator.get(f"/v1/federations/{bad}/models/0", headers=ADMIN).content).to_dense()
    sent = False
    end = time.monotonic() + 30
    while not sent and time.monotonic() < end:
        for auth in agents:
            task = coordinator.get("/v1/tasks", params={"wait": 0.5}, headers=auth)
            if task.status_code == 200 and task.json()["federation_id"] == bad:
                r = _put(coordinator, auth, bad, 1, _delta(weights, bad, fill=3e38))
                assert r.status_code == 200, r.text
                sent = True
                break
    assert sent
    coordinator.post(f"/v1/federations/{good}/start", headers=ADMIN)
    end = time.monotonic() + 30
    while coordinator.get(f"/v1/federations/{bad}", headers=ADMIN).json()["status"] != "failed":
        assert time.monotonic() < end, "the doomed federation was never marked failed"
        time.sleep(0.05)
    failed = coordinator.get(f"/v1/federations/{bad}", headers=ADMIN).json()
    assert "not finite" in failed["error"]
    assert failed["model_version"] == 0  # its global model untouched
    health = coordinator.get("/v1/health").json()
    assert health["status"] == "degraded"
    assert [f["federation_id"] for f in health["failed_federations"]] == [bad]

    # the other federation trains and completes
    weights_b = decode(coordinator.get(f"/v1/federations/{good}/models/0", headers=ADMIN).content).to_dense()
    end = time.monotonic() + 30
    while coordinator.get(f"/v1/federations/{good}", headers=ADMIN).json()["status"] != "completed":
        assert time.monotonic() < end, "the healthy federation was blocked"
        for auth in agents:
            task = coordinator.get("/v1/tasks", params={"wait": 0.2}, headers=auth)
            if task.status_code == 200 and task.json()["federation_id"] == good:
                _put(coordinator, auth, good, 1, _delta(weights_b, good))


@pytest.mark.parametrize("limit", [2, None])
def test_a_round_that_never_reaches_quorum_fails_its_federation_after_max_round_attempts(
    coordinator: TestClient, limit: int | None
) -> None:
    """An agent that is sampled but never uploads: each deadline re-opens the round. With
    max_round_attempts = 2 the federation fails after the 2nd, saying why, its model
    untouched; with None it keeps retrying (a fleet may be offline for hours).
    Kills: ignoring the limit, failing one attempt early or late, a default limit."""
    _enroll(coordinator, 1)
    cfg = small_federation(rounds=1, clients_per_round=1, min_clients=1, round_deadline_s=0.3,
                           **({"max_round_attempts": limit} if limit else {}))
    fid = coordinator.post("/v1/federations", json=cfg, headers=ADMIN).json()["id"]
    coordinator.post(f"/v1/federations/{fid}/start", headers=ADMIN)
    svc = coordinator.app.state.service  # type: ignore[attr-defined]

    def attempts() -> int:
        with svc.store.tx() as conn:
            row = svc.store.get_round(conn, fid, 1)
        return row.attempt if row is not None else 0

    end = time.monotonic() + 20
    if limit is None:
        while attempts() < 4:
            assert time.monotonic() < end, f"the round was not re-opened (attempt {attempts()})"
            time.sleep(0.05)
        assert coordinator.get(f"/v1/federations/{fid}", headers=ADMIN).json()["status"] == "running"
        return
    while (fed := coordinator.get(f"/v1/federations/{fid}", headers=ADMIN).json())["status"] != "failed":
        assert time.monotonic() < end, "the federation kept retrying"
        time.sleep(0.05)
    assert attempts() == limit
    assert f"after {limit} attempts" in fed["error"] and "0 of the 1 updates" in fed["error"]
    assert fed["model_version"] == 0 and fed["current_round"] == 0
