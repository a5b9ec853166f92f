"""JSON logs: one line per request carrying its request id (also in the response), the
service's lines during a request carrying the same id, round events one line each; in
process and from a real `fedslim-coordinator serve` process.

Mutations these kill: a formatter that lets a newline split a record, the request id not
echoed or not the one logged, a client's hostile X-Request-ID passed through, the context
variable not reaching thread-pool endpoints, a line logged twice (propagating to the
CLI's text handler as well), no access line for a refused request.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from coordinator import logs
from coordinator.app import create_app
from coordinator.settings import CoordinatorSettings
from tests.federation_fixtures import small_federation
from tests.helpers import ADMIN, ENROLL, Cluster, wait_for


def _lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


@pytest.fixture
def json_logs() -> Iterator[None]:
    yield
    logs.configure("text")  # the next test's apps log as before


def test_formatter_writes_one_parseable_line_with_extras_and_traceback() -> None:
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        record = logging.LogRecord("fedslim.x", logging.ERROR, __file__, 1, "two\nlines %s", ("\"quoted\"",),
                                   sys.exc_info())
    record.federation_id = "abc"
    line = logs.JsonFormatter().format(record)
    assert "\n" not in line
    out = json.loads(line)
    assert out["msg"] == 'two\nlines "quoted"' and out["level"] == "error" and out["logger"] == "fedslim.x"
    assert out["federation_id"] == "abc" and "ValueError: bad\nthing" in out["exc"]
    assert "request_id" not in out  # outside a request


def test_each_request_logs_one_json_line_with_its_request_id(tmp_path: Path, json_logs: None,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    settings = CoordinatorSettings(data_dir=tmp_path / "c", dev_mode=True, tick_s=0.05, long_poll_s=2, log_format="json")
    with TestClient(create_app(settings)) as c:  # the handler writes to the (captured) stderr
        chosen = c.get("/v1/health", headers={"X-Request-ID": "req-42.a:b"})
        hostile = c.get("/v1/health", headers={"X-Request-ID": "x" * 65})
        fresh = c.get("/v1/federations", headers={"Authorization": "Bearer wrong"})
        # a round's events, and a service line inside a request (the decline, in the thread pool)
        auth = {"Authorization": f"Bearer {c.post('/v1/agents/enroll', json={'enrollment_token': ENROLL}).json()['agent_token']}"}
        fid = c.post("/v1/federations", json=small_federation(rounds=1, clients_per_round=1, min_clients=1),
                     headers=ADMIN).json()["id"]
        c.post(f"/v1/federations/{fid}/start", headers=ADMIN)
        wait_for(lambda: c.get("/v1/tasks", params={"wait": 1}, headers=auth).status_code == 200, what="a task")
        declined = c.post(f"/v1/federations/{fid}/rounds/1/decline", json={"reason": "no memory"}, headers=auth)
        assert declined.status_code == 200, declined.text
    records = _lines(capsys.readouterr().err)

    ids = [chosen.headers["x-request-id"], hostile.headers["x-request-id"], fresh.headers["x-request-id"]]
    assert ids[0] == "req-42.a:b"
    assert len(ids[1]) == 32 and ids[1] != "x" * 65 and len(set(ids)) == 3  # replaced by fresh ids
    access = [r for r in records if r["logger"] == "fedslim.access"]
    for rid, route, status in zip(ids, ["/v1/health", "/v1/health", "/v1/federations"], [200, 200, 401], strict=True):
        [line] = [r for r in access if r["request_id"] == rid]  # exactly one line per request
        assert (line["route"], line["status"], line["method"]) == (route, status, "GET") and line["ms"] >= 0
    assert len({r["request_id"] for r in access}) == len(access)  # every request its own id
    opened = [r for r in records if r["logger"] == "fedslim.coordinator" and "round 1 opened (attempt 1)" in r["msg"]]
    assert len(opened) == 1 and "request_id" not in opened[0]  # the scheduler's, outside any request
    [decline_line] = [r for r in records if r["logger"] == "fedslim.coordinator" and "declined" in r["msg"]]
    assert decline_line["request_id"] == declined.headers["x-request-id"]


def test_a_served_coordinator_writes_json_lines_once_each(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path)
    cluster.env["FEDSLIM_LOG_FORMAT"] = "json"
    try:
        cluster.start_coordinator()
        ids = [cluster.http.get("/v1/federations", headers={"X-Request-ID": f"proc-{i}"}).headers["x-request-id"]
               for i in range(3)]
    finally:
        cluster.stop()
    text = (tmp_path / "coordinator.log").read_text()
    access = [r for r in _lines(text) if r["logger"] == "fedslim.access"]
    assert ids == ["proc-0", "proc-1", "proc-2"]
    for rid in ids:
        assert [r["status"] for r in access if r["request_id"] == rid] == [200]
    # once each: not also through the CLI's text handler on the root logger
    assert sum("GET /v1/federations 200" in line for line in text.splitlines()) == 3
