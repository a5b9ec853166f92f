"""GET /metrics: the counters move with what the API did, by reason, and the exposition
parses (prometheus_client's own parser). Real app, real store, real codec, in-process.

Mutations these kill: a refusal counted under the wrong reason (or not at all, when the
body cap or authentication refuses before the route), a retry counted as a second
acceptance, bytes of a duplicate counted up, the global registry shared by two apps, an
unauthenticated scrape, a long poll not counted while it waits.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from coordinator.app import create_app
from coordinator.protocol import REPORT_HEADER
from coordinator.settings import CoordinatorSettings
from sparse_kernels import DeltaMeta, ModelDelta, SparseTensor, decode, encode
from tests.federation_fixtures import small_federation
from tests.helpers import ADMIN, ENROLL, wait_for

SCRAPE = "scrape-token-0123456789"


def scrape(client: TestClient, headers: dict[str, str] = ADMIN) -> dict[str, float]:
    """sample name{labels} -> value, parsed by prometheus_client's parser."""
    resp = client.get("/metrics", headers=headers)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/plain; version=")
    out = {}
    for family in text_string_to_metric_families(resp.text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


@pytest.fixture
def app_client(tmp_path: Path) -> Iterator[TestClient]:
    settings = CoordinatorSettings(data_dir=tmp_path / "coord", dev_mode=True, tick_s=0.05, long_poll_s=2,
                                   metrics_token=SCRAPE, max_upload_bytes=1 << 20)
    with TestClient(create_app(settings)) as client:
        yield client


def _enroll(client: TestClient, n: int) -> list[dict[str, str]]:
    tokens = [client.post("/v1/agents/enroll", json={"enrollment_token": ENROLL, "name": f"m{i}"}).json()["agent_token"]
              for i in range(n)]
    return [{"Authorization": f"Bearer {t}"} for t in tokens]


def _delta(fid: str, base: dict[str, np.ndarray], seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    meta = DeltaMeta(federation_id=fid, round=1, base_version=0, num_samples=10, kind="delta")
    tensors = tuple(SparseTensor.from_dense_nonzero(k, (rng.normal(0, 1e-3, v.shape) * (rng.random(v.shape) < 0.2))
                                                    .astype(np.float32)) for k, v in base.items())
    return encode(ModelDelta(meta, tensors), values="fp32")


def _put(client: TestClient, auth: dict[str, str], fid: str, body: bytes, **headers: str) -> int:
    report = '{"num_samples": 10, "train_loss": 0.5, "train_accuracy": 0.5, "train_seconds": 1}'
    return client.put(f"/v1/federations/{fid}/rounds/1/update", content=body,
                      headers={**auth, REPORT_HEADER: report, **headers}).status_code


def test_upload_counters_move_by_reason_and_rounds_are_timed(app_client: TestClient) -> None:
    # Arrange: two agents selected for a one-round federation
    c = app_client
    agents = _enroll(c, 2)
    fid = c.post("/v1/federations", json=small_federation(rounds=1), headers=ADMIN).json()["id"]
    assert c.post(f"/v1/federations/{fid}/start", headers=ADMIN).status_code == 200
    for auth in agents:
        wait_for(lambda a=auth: c.get("/v1/tasks", params={"wait": 1}, headers=a).status_code == 200, what="a task")
    model = c.get(f"/v1/federations/{fid}/models/0", headers=agents[0]).content
    base = decode(model, max_bytes=1 << 30).to_dense()
    before = scrape(c)
    first, second = _delta(fid, base, 0), _delta(fid, base, 1)

    # Act: one of each outcome
    assert _put(c, agents[0], fid, first) == 200
    assert _put(c, agents[0], fid, first) == 200  # its retry: a duplicate
    assert _put(c, agents[1], fid, first) == 409  # agent 0's bytes replayed: stale
    assert _put(c, agents[1], fid, b"\x00" * 64) == 422  # not the codec: invalid
    assert _put(c, {}, fid, second) == 401  # no token: refused before the route runs
    assert _put(c, agents[1], fid, b"", **{"Content-Length": str(2 << 20)}) == 413  # the body cap, before the route
    assert _put(c, agents[1], fid, second) == 200
    wait_for(lambda: c.get(f"/v1/federations/{fid}", headers=ADMIN).json()["status"] == "completed", what="round 1")
    after = scrape(c, {"Authorization": f"Bearer {SCRAPE}"})

    # Assert
    moved = {k: after[k] - before.get(k, 0.0) for k in after if k.startswith("fedslim_updates")}
    want_rejected = {"stale": 1, "invalid": 1, "unauthorized": 1, "too_large": 1}
    for reason in ("forbidden", "not_found", "timeout", "rate_limited", "unavailable", "other", *want_rejected):
        assert moved[f"fedslim_updates_rejected_total{{reason={reason}}}"] == want_rejected.get(reason, 0), reason
    assert moved["fedslim_updates_accepted_total"] == 2
    assert moved["fedslim_updates_duplicate_total"] == 1
    assert after["fedslim_bytes_up_total"] == len(first) + len(second)  # the duplicate's bytes are not counted
    assert after["fedslim_bytes_down_total"] == len(model)
    assert after["fedslim_rounds_opened_total"] == 1 and after["fedslim_rounds_closed_total"] == 1
    assert after["fedslim_aggregation_seconds_count"] == 1 and after["fedslim_round_close_seconds_count"] == 1
    assert 0 < after["fedslim_aggregation_seconds_sum"] <= after["fedslim_round_close_seconds_sum"]
    assert after["fedslim_agents_online"] == 2


def test_each_app_counts_in_its_own_registry_and_online_means_seen_lately(tmp_path: Path) -> None:
    def app(name: str) -> TestClient:
        return TestClient(create_app(CoordinatorSettings(data_dir=tmp_path / name, dev_mode=True, tick_s=0.05,
                                                         agent_timeout_s=1.0)))

    with app("a") as a, app("b") as b:
        _enroll(a, 3)
        assert a.put("/v1/federations/abc/rounds/1/update", content=b"x").status_code == 401
        assert scrape(a)["fedslim_updates_rejected_total{reason=unauthorized}"] == 1
        assert scrape(b)["fedslim_updates_rejected_total{reason=unauthorized}"] == 0
        assert scrape(b)["fedslim_agents_online"] == 0
        # online: enrolled within agent_timeout_s and not revoked
        agent = a.get("/v1/agents", headers=ADMIN).json()[0]["id"]
        assert a.delete(f"/v1/agents/{agent}", headers=ADMIN).status_code == 200
        assert scrape(a)["fedslim_agents_online"] == 2
        wait_for(lambda: scrape(a)["fedslim_agents_online"] == 0, 5, what="nobody seen for agent_timeout_s")


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),  # no token
        ({"Authorization": "Bearer wrong"}, 401),  # neither token
        ({"Authorization": f"Bearer {SCRAPE}x"}, 401),  # a longer near-miss
        ({"Authorization": "Bearer \u00e9".encode("latin-1")}, 401),  # non-ASCII: refused, not a 500
        ({"Authorization": f"Bearer {SCRAPE}"}, 200),  # the scrape token
        (ADMIN, 200),  # the admin token
    ],
)
def test_metrics_needs_the_admin_or_the_metrics_token(app_client: TestClient, headers: dict, status: int) -> None:
    assert app_client.get("/metrics", headers=headers).status_code == status


def test_agent_tokens_cannot_scrape(app_client: TestClient) -> None:
    [agent] = _enroll(app_client, 1)
    assert app_client.get("/metrics", headers=agent).status_code == 401


def test_a_placeholder_metrics_token_is_refused_outside_dev_mode() -> None:
    with pytest.raises(ValueError, match="metrics_token"):
        CoordinatorSettings(admin_token="a-real-admin-token-0123", enrollment_token="a-real-enroll-token-0123",
                            metrics_token="changeme")


def test_waiting_long_polls_are_a_gauge(app_client: TestClient) -> None:
    [agent] = _enroll(app_client, 1)
    results: list[Any] = []
    poll = threading.Thread(target=lambda: results.append(
        app_client.get("/v1/tasks", params={"wait": 1.5}, headers=agent).status_code))
    poll.start()
    wait_for(lambda: scrape(app_client)["fedslim_long_polls_waiting"] == 1, what="one waiting poll")
    poll.join()
    assert results == [204]
    time.sleep(0.05)
    assert scrape(app_client)["fedslim_long_polls_waiting"] == 0
