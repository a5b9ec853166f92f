"""Service-level oracle: after a round, the global model equals an independently computed
sample-weighted mean of exactly the accepted updates — through the real HTTP API, the
real codec and store, in-process and across a SIGKILL of a real coordinator process.

The oracle here is plain numpy over the deltas this test built (float64), not the
service's accumulator. Mutations these kill: folding an update twice (the audit's bug:
first upload doubled), folding a rejected update, refolding after a restart twice or not
at all, using the claimed num_samples above the cap, not clipping, clipping aux
statistics, a copied update counted for a second agent. Each runs on SQLite and on a real
PostgreSQL server (tests/pg.py).
"""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from coordinator.protocol import REPORT_HEADER
from sparse_kernels import DeltaMeta, ModelDelta, SparseTensor, decode, encode
from sparse_kernels.codec import ValueMode
from sparse_kernels.fuzz import reframe
from tests.federation_fixtures import small_federation
from tests.helpers import ADMIN, Cluster

Weights = dict[str, np.ndarray]
pytestmark = pytest.mark.both_databases


def _enroll(http: Any, n: int, token: str = "dev-enroll-token") -> list[dict[str, str]]:
    out = []
    for i in range(n):
        r = http.post("/v1/agents/enroll", json={"enrollment_token": token, "name": f"oracle-{i}"})
        assert r.status_code == 201, r.text
        out.append({"Authorization": f"Bearer {r.json()['agent_token']}"})
    return out


def _wait_task(http: Any, auth: dict[str, str], timeout: float = 30) -> dict[str, Any]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        r = http.get("/v1/tasks", params={"wait": 1}, headers=auth)
        if r.status_code == 200:
            return dict(r.json())
    raise AssertionError("no task")


def _model(http: Any, fid: str, version: int, admin: dict[str, str]) -> Weights:
    r = http.get(f"/v1/federations/{fid}/models/{version}", headers=admin)
    assert r.status_code == 200, r.text
    return decode(r.content, max_bytes=1 << 30).to_dense()


def _random_delta(weights: Weights, seed: int, density: float = 0.3, scale: float = 0.01) -> Weights:
    """A dense-array delta with ~density nonzeros per tensor (exact float32 values)."""
    rng = np.random.default_rng(seed)
    return {k: np.where(rng.random(v.shape) < density, rng.normal(0, scale, v.shape), 0).astype(np.float32)
            for k, v in weights.items()}


def _encode(fid: str, rnd: int, base: int, delta: Weights, num_samples: int, values: ValueMode = "fp32") -> bytes:
    meta = DeltaMeta(federation_id=fid, round=rnd, base_version=base, num_samples=num_samples, kind="delta")
    tensors = tuple(SparseTensor.from_dense_nonzero(k, v) for k, v in delta.items())
    return encode(ModelDelta(meta, tensors), values=values)


SENTINEL = np.float32(1234.5)


def _encode_sentinel(fid: str, delta: Weights) -> bytes:
    poisoned = {k: v.copy() for k, v in delta.items()}
    next(iter(poisoned.values())).flat[0] = SENTINEL
    return _encode(fid, 1, 0, poisoned, 300)


def _with_nan(body: bytes) -> bytes:
    """The same update with the sentinel value replaced by NaN, CRC made consistent (the
    encoder refuses NaN, a hostile client does not ask it)."""
    assert body.count(SENTINEL.tobytes()) == 1
    return reframe(body.replace(SENTINEL.tobytes(), np.float32(np.nan).tobytes()))


def _put(http: Any, auth: dict[str, str], fid: str, rnd: int, body: bytes, num_samples: int) -> int:
    report = f'{{"num_samples": {num_samples}, "train_loss": 0.5, "train_accuracy": 0.5, "train_seconds": 1}}'
    r = http.put(f"/v1/federations/{fid}/rounds/{rnd}/update", content=body,
                 headers={**auth, REPORT_HEADER: report, "Content-Type": "application/octet-stream"})
    return int(r.status_code)


def _hang_up_mid_upload(port: int, auth: dict[str, str], fid: str, body: bytes, num_samples: int) -> None:
    """What a SIGKILLed agent looks like to the coordinator: a PUT whose body stops half
    way and a connection that closes."""
    report = f'{{"num_samples": {num_samples}, "train_loss": 0.5, "train_accuracy": 0.5, "train_seconds": 1}}'
    head = (f"PUT /v1/federations/{fid}/rounds/1/update HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: {auth['Authorization']}\r\n{REPORT_HEADER}: {report}\r\n"
            f"Content-Type: application/octet-stream\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(head + body[: len(body) // 2])
        time.sleep(0.3)


def _oracle(base: Weights, accepted: list[tuple[Weights, float]], clip: float | None = None) -> Weights:
    """w + Σ wᵢ·clip(Δᵢ) / Σ wᵢ, in float64, every tensor."""
    total = sum(w for _, w in accepted)
    out = {}
    for k, v in base.items():
        acc = np.zeros(v.shape, np.float64)
        for delta, w in accepted:
            d = delta[k].astype(np.float64)
            if clip is not None:
                norm = np.sqrt(sum(float((x.astype(np.float64) ** 2).sum()) for x in delta.values()))
                d = d * min(1.0, clip / norm)
            acc += w * d
        out[k] = v.astype(np.float64) + acc / total
    return out


def _assert_close(got: Weights, want: Weights) -> None:
    assert got.keys() == want.keys()
    for k in got:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)


def _wait_version(http: Any, fid: str, version: int, admin: dict[str, str], timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if http.get(f"/v1/federations/{fid}", headers=admin).json()["model_version"] >= version:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"federation {fid} did not reach version {version}")


def test_two_agents_plus_one_and_zero_give_one_half(coordinator: TestClient) -> None:
    """The audit's case: +1.0 and 0.0, one sample each, must average to 0.5 (was 0.667)."""
    agents = _enroll(coordinator, 2)
    fid = coordinator.post("/v1/federations", json=small_federation(rounds=1), headers=ADMIN).json()["id"]
    assert coordinator.post(f"/v1/federations/{fid}/start", headers=ADMIN).status_code == 200
    base = _model(coordinator, fid, 0, ADMIN)
    for auth in agents:
        _wait_task(coordinator, auth)
    name = next(k for k, v in base.items() if v.ndim == 1)
    ones = {k: np.zeros_like(v) for k, v in base.items()}
    ones[name] = np.full_like(base[name], 1e-3)  # small: within the default clip bound
    zero = {k: np.zeros_like(v) for k, v in base.items()}
    assert _put(coordinator, agents[0], fid, 1, _encode(fid, 1, 0, ones, 1), 1) == 200
    assert _put(coordinator, agents[1], fid, 1, _encode(fid, 1, 0, zero, 1), 1) == 200
    _wait_version(coordinator, fid, 1, ADMIN)
    new = _model(coordinator, fid, 1, ADMIN)
    np.testing.assert_allclose(new[name] - base[name], np.full_like(base[name], 0.5e-3), rtol=0, atol=1e-6)


@pytest.mark.parametrize("case", ["plain", "capped_samples", "clipped", "int8"])
def test_global_model_is_the_weighted_mean_of_exactly_the_accepted_updates(coordinator: TestClient, case: str) -> None:
    """int8: the default preset's upload values; the oracle folds what the decoder sees
    (the int8 steps), which re-encode exactly. Kills a service that folds anything else."""
    # Arrange: three agents selected for one round
    agents = _enroll(coordinator, 3)
    aggregation: dict[str, Any] = {"max_num_samples": 150} if case == "capped_samples" else {}
    if case == "clipped":
        aggregation = {"clip_norm": 0.05}
    cfg = small_federation(rounds=1, clients_per_round=3, min_clients=3, aggregation=aggregation)
    fid = coordinator.post("/v1/federations", json=cfg, headers=ADMIN).json()["id"]
    assert coordinator.post(f"/v1/federations/{fid}/start", headers=ADMIN).status_code == 200
    base = _model(coordinator, fid, 0, ADMIN)
    for auth in agents:
        assert _wait_task(coordinator, auth)["round"] == 1
    deltas = [_random_delta(base, seed) for seed in range(3)]
    samples = [100, 300, 50]
    values: ValueMode = "int8" if case == "int8" else "fp32"
    if case == "int8":
        deltas = [decode(_encode(fid, 1, 0, d, 1, values)).to_dense() for d in deltas]

    # Act: honest uploads, interleaved with ones that must change nothing
    assert _put(coordinator, agents[0], fid, 1, _encode(fid, 1, 0, deltas[0], samples[0], values), samples[0]) == 200
    assert _put(coordinator, agents[1], fid, 1, _with_nan(_encode_sentinel(fid, deltas[1])), 300) == 422
    copy = _encode(fid, 1, 0, deltas[0], samples[0], values)
    assert _put(coordinator, agents[2], fid, 1, copy, samples[0]) == 409  # agent 0's bytes replayed by agent 2
    assert _put(coordinator, agents[0], fid, 1, copy, samples[0]) == 200  # agent 0's own retry: idempotent
    assert _put(coordinator, agents[1], fid, 1, _encode(fid, 1, 0, deltas[1], samples[1], values), samples[1]) == 200
    assert _put(coordinator, agents[2], fid, 1, _encode(fid, 1, 0, deltas[2], samples[2], values), samples[2]) == 200
    _wait_version(coordinator, fid, 1, ADMIN)

    # Assert
    weights = [float(min(n, aggregation.get("max_num_samples", 10**9))) for n in samples]
    want = _oracle(base, list(zip(deltas, weights, strict=True)), clip=aggregation.get("clip_norm"))
    _assert_close(_model(coordinator, fid, 1, ADMIN), want)
    metrics = coordinator.get(f"/v1/federations/{fid}/rounds", headers=ADMIN).json()[0]
    assert metrics["participants"] == 3
    assert metrics["clipped_updates"] == (3 if case == "clipped" else 0)


def test_median_rule_ignores_one_hostile_agent(coordinator: TestClient) -> None:
    agents = _enroll(coordinator, 3)
    cfg = small_federation(rounds=1, clients_per_round=3, min_clients=3,
                           aggregation={"rule": "median", "clip_relative": None})
    fid = coordinator.post("/v1/federations", json=cfg, headers=ADMIN).json()["id"]
    coordinator.post(f"/v1/federations/{fid}/start", headers=ADMIN)
    base = _model(coordinator, fid, 0, ADMIN)
    for auth in agents:
        _wait_task(coordinator, auth)
    honest = [{k: np.full_like(v, s) for k, v in base.items()} for s in (1e-3, 2e-3)]
    hostile = {k: np.full_like(v, 1e30) for k, v in base.items()}
    for auth, d, n in zip(agents, [*honest, hostile], [10, 10, 10**9], strict=True):
        assert _put(coordinator, auth, fid, 1, _encode(fid, 1, 0, d, n), n) == 200
    _wait_version(coordinator, fid, 1, ADMIN)
    new = _model(coordinator, fid, 1, ADMIN)
    for k in base:  # median of (1e-3, 2e-3, 1e30) per coordinate
        np.testing.assert_allclose(new[k] - base[k], np.full_like(base[k], 2e-3), rtol=1e-3, atol=1e-6)


def test_oracle_holds_across_a_sigkill_mid_round(tmp_path: Path, database_url: str | None) -> None:
    """Two of three updates accepted, the coordinator SIGKILLed and restarted on the same
    files (and database), the third uploaded: the model is the mean of all three, each
    counted once."""
    cluster = Cluster(tmp_path)
    if database_url is not None:
        cluster.env["FEDSLIM_DATABASE_URL"] = database_url
    admin = {"Authorization": f"Bearer {cluster.env['FEDSLIM_ADMIN_TOKEN']}"}
    http = httpx.Client(base_url=cluster.url, timeout=30)
    try:
        cluster.start_coordinator()
        agents = _enroll(http, 3, token=cluster.env["FEDSLIM_ENROLLMENT_TOKEN"])
        cfg = small_federation(rounds=1, clients_per_round=3, min_clients=3, round_deadline_s=600)
        fid = http.post("/v1/federations", json=cfg, headers=admin).json()["id"]
        http.post(f"/v1/federations/{fid}/start", headers=admin)
        base = _model(http, fid, 0, admin)
        for auth in agents:
            _wait_task(http, auth)
        deltas = [_random_delta(base, 10 + s) for s in range(3)]
        samples = [120, 80, 200]
        for i in (0, 1):
            assert _put(http, agents[i], fid, 1, _encode(fid, 1, 0, deltas[i], samples[i]), samples[i]) == 200
        # agent 2 dies mid-upload: half its body sent, then the connection drops
        _hang_up_mid_upload(cluster.port, agents[2], fid, _encode(fid, 1, 0, deltas[2], samples[2]), samples[2])

        assert cluster.coordinator is not None
        os.kill(cluster.coordinator.pid, signal.SIGKILL)
        cluster.coordinator.wait()
        cluster.start_coordinator()

        # a retry of an accepted upload after the restart is still counted once
        assert _put(http, agents[1], fid, 1, _encode(fid, 1, 0, deltas[1], samples[1]), samples[1]) == 200
        _wait_task(http, agents[2])
        assert _put(http, agents[2], fid, 1, _encode(fid, 1, 0, deltas[2], samples[2]), samples[2]) == 200
        _wait_version(http, fid, 1, admin)
        _assert_close(_model(http, fid, 1, admin),
                      _oracle(base, list(zip(deltas, map(float, samples), strict=True))))
    finally:
        http.close()
        cluster.stop()


def test_restart_refold_counts_each_stored_update_once(tmp_path: Path, database_url: str | None) -> None:
    """In-process twin of the SIGKILL test: a fresh service on the same files refolds."""
    from coordinator.app import create_app
    from coordinator.settings import CoordinatorSettings

    settings = CoordinatorSettings(data_dir=tmp_path / "coord", database_url=database_url, dev_mode=True,
                                   tick_s=0.05, long_poll_s=2)
    with TestClient(create_app(settings)) as c:
        agents = _enroll(c, 3)
        fid = c.post("/v1/federations", json=small_federation(rounds=1, clients_per_round=3, min_clients=3),
                     headers=ADMIN).json()["id"]
        c.post(f"/v1/federations/{fid}/start", headers=ADMIN)
        base = _model(c, fid, 0, ADMIN)
        for auth in agents:
            _wait_task(c, auth)
        deltas = [_random_delta(base, 20 + s) for s in range(3)]
        for i in (0, 1):
            assert _put(c, agents[i], fid, 1, _encode(fid, 1, 0, deltas[i], 10 * (i + 1)), 10 * (i + 1)) == 200
    with TestClient(create_app(settings)) as c:
        _wait_task(c, agents[2])
        assert _put(c, agents[2], fid, 1, _encode(fid, 1, 0, deltas[2], 30), 30) == 200
        _wait_version(c, fid, 1, ADMIN)
        _assert_close(_model(c, fid, 1, ADMIN), _oracle(base, list(zip(deltas, [10.0, 20.0, 30.0], strict=True))))
