"""Real processes over real HTTP: a uvicorn coordinator and agent processes on loopback.

One federation runs three rounds; the coordinator is SIGKILLed after round 1 and
restarted on the same SQLite file, and the agents reconnect by themselves.
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

ADMIN = "test-admin-token-0123456789"
ENROLL = "test-enroll-token-0123456789"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Cluster:
    def __init__(self, root: Path) -> None:
        self.root, self.port = root, _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "FEDSLIM_ADMIN_TOKEN": ADMIN, "FEDSLIM_ENROLLMENT_TOKEN": ENROLL, "PYTHONUNBUFFERED": "1"}
        self.coordinator: subprocess.Popen | None = None
        self.agents: list[subprocess.Popen] = []
        self.http = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30)

    def start_coordinator(self) -> None:
        log = open(self.root / "coordinator.log", "a")  # noqa: SIM115 (the process owns it)
        self.coordinator = subprocess.Popen(
            [sys.executable, "-m", "coordinator.cli", "serve", "--port", str(self.port),
             "--data-dir", str(self.root / "coord"), "--torch-threads", "1"],
            env={**self.env, "FEDSLIM_TICK_S": "0.05"}, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        end = time.monotonic() + 60
        while time.monotonic() < end:
            assert self.coordinator.poll() is None, (self.root / "coordinator.log").read_text()[-3000:]
            try:
                if self.http.get("/v1/health").status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)
        raise AssertionError("coordinator did not start")

    def start_agent(self, i: int, n: int) -> None:
        log = open(self.root / f"agent-{i}.log", "a")  # noqa: SIM115
        self.agents.append(subprocess.Popen(
            [sys.executable, "-m", "edge_agent.cli", "run", "--url", self.url, "--state-dir", str(self.root / f"agent-{i}"),
             "--name", f"agent-{i}", "--dataset", "synthetic", "--partition", "iid", "--client-index", str(i),
             "--num-clients", str(n), "--threads", "1", "--poll", "2", "--idle-exit", "60"],
            env=self.env, stdout=log, stderr=subprocess.STDOUT))
        log.close()

    def wait(self, cond, what: str, timeout: float = 120):  # type: ignore[no-untyped-def]
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                value = cond()
                if value:
                    return value
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        logs = "\n".join(p.name + ":\n" + p.read_text()[-1500:] for p in self.root.glob("*.log"))
        raise AssertionError(f"timed out waiting for {what}\n{logs}")

    def stop(self) -> None:
        for p in [*self.agents, self.coordinator]:
            if p is not None and p.poll() is None:
                p.terminate()
        for p in [*self.agents, self.coordinator]:
            if p is not None:
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
        self.http.close()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    c.start_coordinator()
    yield c
    c.stop()


def test_federation_over_http_survives_a_coordinator_kill(cluster: Cluster) -> None:
    # Arrange: a 3-round federation and two agent processes
    resp = cluster.http.post("/v1/federations", json={
        "model": "fedavg_cnn", "rounds": 3, "clients_per_round": 2, "min_clients": 2, "round_deadline_s": 120,
        "data": {"dataset": "synthetic"}, "training": {"batch_size": 32, "lr": 0.02, "local_epochs": 1},
    })
    assert resp.status_code == 201, resp.text
    fid = resp.json()["id"]
    for i in range(2):
        cluster.start_agent(i, 2)
    cluster.wait(lambda: len(cluster.http.get("/v1/agents").json()) == 2, "enrollment")
    assert cluster.http.post(f"/v1/federations/{fid}/start").status_code == 200

    # Act: kill -9 the coordinator once round 1 is closed, restart it on the same files
    cluster.wait(lambda: cluster.http.get(f"/v1/federations/{fid}").json()["current_round"] >= 1, "round 1")
    round1_before = cluster.http.get(f"/v1/federations/{fid}/rounds").json()[0]
    assert cluster.coordinator is not None
    cluster.coordinator.send_signal(signal.SIGKILL)
    cluster.coordinator.wait(10)
    cluster.start_coordinator()
    cluster.wait(lambda: cluster.http.get(f"/v1/federations/{fid}").json()["status"] == "completed", "completion", 240)

    # Assert: every round persisted, round 1 unchanged, learning happened, bytes counted
    rows = cluster.http.get(f"/v1/federations/{fid}/rounds").json()
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert rows[0] == round1_before
    assert rows[-1]["loss"] < rows[0]["loss"] and rows[-1]["accuracy"] >= max(rows[0]["accuracy"], 0.5), rows
    assert all(r["participants"] == 2 and r["bytes_up"] > 0 for r in rows)
    # round 1: agents rebuilt the seeded initial model (sha256-checked); later: patches
    assert rows[0]["bytes_down"] == 0 and all(r["bytes_down"] > 0 for r in rows[1:]), rows
    with sqlite3.connect(cluster.root / "coord" / "coordinator.db") as db:
        closed = db.execute("SELECT round FROM rounds WHERE federation_id=? AND status='closed' ORDER BY round",
                            (fid,)).fetchall()
        versions = db.execute("SELECT COUNT(*) FROM models WHERE federation_id=?", (fid,)).fetchone()[0]
    assert [r[0] for r in closed] == [1, 2, 3] and versions == 4
    # the agents did the work as separate OS processes, each seen by the coordinator
    agents = cluster.http.get("/v1/agents").json()
    assert {a["name"] for a in agents} == {"agent-0", "agent-1"}
