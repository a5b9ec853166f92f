"""schemathesis against the OpenAPI schema of a real coordinator process: whatever the
schema admits (and much it does not), no endpoint answers 5xx.

Admin routes get the admin token, agent routes an enrolled agent's token, so the fuzzing
reaches past authentication. Bounded: a few examples per operation, one process.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error

from tests.federation_fixtures import small_federation
from tests.helpers import PROCESS_ADMIN_TOKEN as ADMIN
from tests.helpers import PROCESS_ENROLL_TOKEN as ENROLL
from tests.helpers import Cluster

_AGENT_PATHS = ("/v1/tasks", "/update", "/model", "/patch", "/reshape")


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, str]]:
    cluster = Cluster(Path(tmp_path_factory.mktemp("schema")))
    cluster.start_coordinator()
    try:
        r = httpx.post(f"{cluster.url}/v1/agents/enroll", json={"enrollment_token": ENROLL, "name": "fuzz"})
        fid = cluster.http.post("/v1/federations", json=small_federation()).json()["id"]
        cluster.http.post(f"/v1/federations/{fid}/start")
        yield cluster, r.json()["agent_token"]
    finally:
        cluster.stop()


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def _fuzz(data: st.DataObject, cluster: Cluster, agent_token: str, operations: list) -> None:  # type: ignore[type-arg]
    for operation in operations:
        case = data.draw(operation.as_strategy())
        token = agent_token if any(p in case.path for p in _AGENT_PATHS) else ADMIN
        if case.path == "/v1/tasks":
            case.query = {**(case.query or {}), "wait": 0}  # a long poll would only make the run slow
        case.call_and_validate(base_url=cluster.url, headers={"Authorization": f"Bearer {token}"},
                               checks=[not_a_server_error], timeout=30)


def test_no_server_errors(live: tuple[Cluster, str]) -> None:
    """Every operation, 40 generated requests each (positive and negative data)."""
    cluster, agent_token = live
    schema = schemathesis.openapi.from_url(f"{cluster.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15
    _fuzz(cluster=cluster, agent_token=agent_token, operations=operations)
