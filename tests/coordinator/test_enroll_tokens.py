"""Per-device enrollment through the real API (the app and store in-process on a tmp SQLite
file, and once as the operator CLI + agent CLI against a real coordinator process).

Mutations these kill (each named at its test): a one-time token that enrolls twice, no
expiry check, a revoked token that still enrolls, the secret stored in clear, the shared
token on by default outside dev mode, a rotated-away token still accepted from the cache,
a revoked agent sampled into a round, a "not now" decline that does not stop the round
waiting or that leaves the decliner in the next sample.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from coordinator.app import create_app
from coordinator.errors import Unauthorized
from coordinator.protocol import EnrollRequest
from coordinator.settings import CoordinatorSettings
from sparse_kernels import decode
from tests.coordinator.test_hostile import REPORT, _delta, _put
from tests.federation_fixtures import small_federation
from tests.helpers import ADMIN, ENROLL, PROCESS_ADMIN_TOKEN, Cluster, wait_for

pytestmark = pytest.mark.both_databases  # the spend is one conditional UPDATE: SQLite and PostgreSQL


def _issue(c: TestClient, **body: Any) -> dict[str, Any]:
    r = c.post("/v1/enrollment-tokens", json=body, headers=ADMIN)
    assert r.status_code == 201, r.text
    return dict(r.json())


def _enroll(c: TestClient, token: str, name: str = "dev") -> Any:
    return c.post("/v1/agents/enroll", json={"enrollment_token": token, "name": name})


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _tokens(c: TestClient) -> dict[str, dict[str, Any]]:
    return {t["id"]: t for t in c.get("/v1/enrollment-tokens", headers=ADMIN).json()}


def test_a_token_enrolls_once(coordinator: TestClient) -> None:
    """Kills: spending without the used_at check (the second enrollment would get 201)."""
    issued = _issue(coordinator, expires_in_s=3600, name="pi-kitchen")

    first = _enroll(coordinator, issued["token"])
    second = _enroll(coordinator, issued["token"], name="again")

    assert first.status_code == 201, first.text
    assert second.status_code == 401 and "already used" in second.json()["detail"]
    listed = _tokens(coordinator)[issued["id"]]
    assert listed["status"] == "used" and listed["agent_id"] == first.json()["agent_id"]
    assert listed["name"] == "pi-kitchen" and "token" not in listed  # the secret is shown once only
    # the agent it created works
    assert coordinator.get("/v1/tasks", params={"wait": 0}, headers=_bearer(first.json()["agent_token"])).status_code == 204


def test_an_expired_token_is_refused(coordinator: TestClient) -> None:
    """Kills: no expires_at condition in the spend."""
    short = _issue(coordinator, expires_in_s=0.3)
    time.sleep(0.5)

    refused = _enroll(coordinator, short["token"])

    assert refused.status_code == 401
    assert _tokens(coordinator)[short["id"]]["status"] == "expired"


def test_a_revoked_token_is_refused_and_the_secret_is_stored_hashed(coordinator: TestClient) -> None:
    """Kills: no revoked_at condition; storing the token instead of its sha256."""
    issued = _issue(coordinator, expires_in_s=3600)

    revoked = coordinator.delete(f"/v1/enrollment-tokens/{issued['id']}", headers=ADMIN)
    refused = _enroll(coordinator, issued["token"])

    assert revoked.status_code == 200 and revoked.json()["status"] == "revoked"
    assert refused.status_code == 401
    assert coordinator.delete("/v1/enrollment-tokens/abc123", headers=ADMIN).status_code == 404
    store = coordinator.app.state.service.store  # type: ignore[attr-defined]
    with store.engine.connect() as db:  # what the database holds, on SQLite or PostgreSQL
        rows = db.execute(sa.text("SELECT * FROM enrollment_tokens")).fetchall()
    assert rows and issued["token"] not in repr(rows)


def test_devices_racing_with_one_token_enroll_once(coordinator: TestClient) -> None:
    """Eight enrollments with one token at once (threads, own connections): exactly one
    wins. Kills: a read-then-write spend (on PostgreSQL both reads see it unused)."""
    auth = coordinator.app.state.service.auth  # type: ignore[attr-defined]
    token = _issue(coordinator, expires_in_s=60)["token"]
    barrier = threading.Barrier(8)
    outcomes: list[str] = []

    def enroll(i: int) -> None:
        barrier.wait()
        try:
            auth.enroll(EnrollRequest(enrollment_token=token, name=f"race-{i}"), f"10.0.0.{i}")
            outcomes.append("enrolled")
        except Unauthorized:
            outcomes.append("refused")

    threads = [threading.Thread(target=enroll, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)

    assert sorted(outcomes) == ["enrolled"] + ["refused"] * 7
    assert len([a for a in coordinator.get("/v1/agents", headers=ADMIN).json() if a["name"].startswith("race")]) == 1


@pytest.mark.parametrize(("body", "status"), [
    ({"expires_in_s": 0}, 422),                    # never valid
    ({"expires_in_s": 400 * 86400}, 422),          # past the protocol's year
    ({"expires_in_s": 60, "name": "x" * 101}, 422),
    ({"expires_in_s": 60, "name": "<script>"}, 422),
    ({"expires_in_s": 60, "extra": 1}, 422),       # unknown fields are refused
])
def test_token_requests_are_bounded(coordinator: TestClient, body: dict[str, Any], status: int) -> None:
    assert coordinator.post("/v1/enrollment-tokens", json=body, headers=ADMIN).status_code == status


def test_only_the_admin_issues_tokens(coordinator: TestClient) -> None:
    agent = _enroll(coordinator, ENROLL).json()["agent_token"]

    assert coordinator.post("/v1/enrollment-tokens", json={}).status_code == 401
    assert coordinator.post("/v1/enrollment-tokens", json={}, headers=_bearer(agent)).status_code == 403
    assert coordinator.get("/v1/enrollment-tokens", headers=_bearer(agent)).status_code == 403
    assert coordinator.post(f"/v1/agents/{'0' * 16}/rotate", headers=_bearer(agent)).status_code == 403


@pytest.fixture
def production(tmp_path: Path) -> Iterator[TestClient]:
    """Outside dev mode, FEDSLIM_ENROLLMENT_TOKEN unset (the default a real operator gets)."""
    settings = CoordinatorSettings(data_dir=tmp_path / "prod", admin_token="a-real-admin-token-0123", tick_s=0.05)
    with TestClient(create_app(settings)) as client:
        yield client


def test_the_shared_token_is_off_unless_set(production: TestClient, tmp_path: Path) -> None:
    """Kills: a default shared token outside dev mode (the placeholder or an empty one)."""
    admin = _bearer("a-real-admin-token-0123")
    for guess in ("dev-enroll-token", "changeme", " "):
        assert _enroll(production, guess).status_code == 401
    token = production.post("/v1/enrollment-tokens", json={"expires_in_s": 60}, headers=admin).json()["token"]
    assert _enroll(production, token).status_code == 201  # the one-time path works without it
    # set explicitly, it works as before (tests/helpers.py Cluster and sim/demo.py rely on it)
    shared = CoordinatorSettings(data_dir=tmp_path / "shared", admin_token="a-real-admin-token-0123",
                                 enrollment_token="a-shared-enroll-token-0123")
    with TestClient(create_app(shared)) as c:
        assert _enroll(c, "a-shared-enroll-token-0123").status_code == 201
        assert _enroll(c, "a-shared-enroll-token-0123").status_code == 201  # shared: not one-time
        assert _enroll(c, "dev-enroll-token").status_code == 401


def test_rotation_replaces_the_token_at_once(coordinator: TestClient) -> None:
    """Kills: the old token surviving in the memory cache (it was used, so it is cached)."""
    enrolled = _enroll(coordinator, ENROLL).json()
    old = _bearer(enrolled["agent_token"])
    assert coordinator.get("/v1/tasks", params={"wait": 0}, headers=old).status_code == 204  # cached now

    rotated = coordinator.post(f"/v1/agents/{enrolled['agent_id']}/rotate", headers=ADMIN)

    assert rotated.status_code == 200 and rotated.json()["agent_id"] == enrolled["agent_id"]
    new = _bearer(rotated.json()["agent_token"])
    assert coordinator.get("/v1/tasks", params={"wait": 0}, headers=old).status_code == 401
    assert coordinator.get("/v1/tasks", params={"wait": 0}, headers=new).status_code == 204
    assert coordinator.post(f"/v1/agents/{'f' * 16}/rotate", headers=ADMIN).status_code == 404
    # a revoked agent is not brought back by a rotation
    coordinator.delete(f"/v1/agents/{enrolled['agent_id']}", headers=ADMIN)
    assert coordinator.post(f"/v1/agents/{enrolled['agent_id']}/rotate", headers=ADMIN).status_code == 403
    assert coordinator.get("/v1/tasks", params={"wait": 0}, headers=new).status_code == 401


def _live(c: TestClient, fid: str) -> dict[str, Any]:
    return dict(c.get(f"/v1/federations/{fid}/live", headers=ADMIN).json())


def test_a_revoked_agent_gets_401_and_is_never_sampled(coordinator: TestClient) -> None:
    """Kills: dropping `revoked_at is None` from the candidates (all three would be sampled)."""
    enrolled = [_enroll(coordinator, ENROLL, f"a{i}").json() for i in range(3)]
    revoked = enrolled[0]
    coordinator.delete(f"/v1/agents/{revoked['agent_id']}", headers=ADMIN)
    fid = coordinator.post("/v1/federations", json=small_federation(rounds=1, clients_per_round=3, min_clients=1),
                           headers=ADMIN).json()["id"]

    coordinator.post(f"/v1/federations/{fid}/start", headers=ADMIN)
    live = wait_for(lambda: (v := _live(coordinator, fid))["round"] and v, 10, what="round 1 to open")

    assert live["expected"] == 2 and revoked["agent_id"] not in live["waiting_for"]
    assert coordinator.get("/v1/tasks", params={"wait": 0}, headers=_bearer(revoked["agent_token"])).status_code == 401


def test_not_now_stops_the_wait_and_the_next_round_samples_someone_else(coordinator: TestClient) -> None:
    """Kills: a decline without needed_bytes that the round still waits out (the deadline is
    60 s), and forgetting the "not now" (round 2 would sample both agents again)."""
    a, b = (_enroll(coordinator, ENROLL, f"n{i}").json() for i in range(2))
    fid = coordinator.post("/v1/federations", json=small_federation(rounds=2, clients_per_round=2, min_clients=1),
                           headers=ADMIN).json()["id"]
    coordinator.post(f"/v1/federations/{fid}/start", headers=ADMIN)
    for agent in (a, b):  # both sampled into round 1
        assert coordinator.get("/v1/tasks", params={"wait": 5}, headers=_bearer(agent["agent_token"])).status_code == 200

    declined = coordinator.post(f"/v1/federations/{fid}/rounds/1/decline", headers=_bearer(a["agent_token"]),
                                json={"reason": "not now: on battery at 12 %, below 50 %", "retry_after_s": 600})
    weights = decode(coordinator.get(f"/v1/federations/{fid}/models/0", headers=ADMIN).content).to_dense()
    uploaded = _put(coordinator, _bearer(b["agent_token"]), fid, 1, _delta(weights, fid), REPORT)
    opened = time.monotonic()
    live = wait_for(lambda: (v := _live(coordinator, fid))["round"] == 2 and v, 20, what="round 2 to open")

    assert declined.status_code == 200 and declined.json()["recorded"] is True
    assert uploaded.status_code == 200, uploaded.text
    assert time.monotonic() - opened < 20  # closed on the answers, not at the 60 s deadline
    assert live["expected"] == 1 and live["waiting_for"] == [b["agent_id"]]
    metrics = coordinator.get(f"/v1/federations/{fid}/rounds", headers=ADMIN).json()
    assert metrics[0]["participants"] == 1 and metrics[0]["declined"] == [{"agent": a["agent_id"], "needed_bytes": None}]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    c.start_coordinator()
    yield c
    c.stop()


def test_operator_and_device_clis(cluster: Cluster, tmp_path: Path) -> None:
    """`fedslim-coordinator enroll-token create --expires 24h` then `fedslim-agent enroll`
    with it, as processes against a real coordinator: once, not twice; list, revoke, rotate.
    Kills: the CLI sending the wrong expiry or path, `-q` printing more than the secret."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("FEDSLIM_")},
           "FEDSLIM_URL": cluster.url, "FEDSLIM_ADMIN_TOKEN": PROCESS_ADMIN_TOKEN,
           "FEDSLIM_CONFIG": str(tmp_path / "cli.json")}

    def run(module: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", module, *args], env=env, capture_output=True, text=True,
                              timeout=60)

    created = run("coordinator.cli", "enroll-token", "create", "--expires", "24h", "--name", "pi-1", "-q")
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    assert "\n" not in token and len(token) >= 40

    device = ["--url", cluster.url, "--enrollment-token", token, "--name", "pi-1"]
    first = run("edge_agent.cli", "enroll", "--state-dir", str(tmp_path / "pi-1"), *device)
    second = run("edge_agent.cli", "enroll", "--state-dir", str(tmp_path / "pi-2"), *device)
    assert first.returncode == 0, first.stderr
    assert second.returncode != 0 and "already used" in second.stderr

    listed = json.loads(run("coordinator.cli", "enroll-token", "list").stdout)
    identity = json.loads((tmp_path / "pi-1" / "identity.json").read_text())
    assert [(t["name"], t["status"], t["agent_id"]) for t in listed] == [("pi-1", "used", identity["agent_id"])]
    assert 86000 < listed[0]["expires_at"] - listed[0]["created_at"] <= 86400

    spare = json.loads(run("coordinator.cli", "enroll-token", "create", "--expires", "30m").stdout)
    assert json.loads(run("coordinator.cli", "enroll-token", "revoke", spare["id"]).stdout)["status"] == "revoked"
    bad = run("coordinator.cli", "enroll-token", "create", "--expires", "soon")
    assert bad.returncode == 2 and "not a duration" in bad.stderr

    rotated = json.loads(run("coordinator.cli", "rotate", identity["agent_id"]).stdout)
    old = cluster.http.get("/v1/tasks", params={"wait": 0}, headers=_bearer(identity["agent_token"]))
    new = cluster.http.get("/v1/tasks", params={"wait": 0}, headers=_bearer(rotated["agent_token"]))
    assert (old.status_code, new.status_code) == (401, 204)
