"""Downloads while a round is open are answered from memory on the event loop: the same
bytes and headers as from the store, counted the same, and refused to outsiders the same.

Mutations killed: the in-memory path serving another artifact of the version (bytes
differ); not counting what it serves (the round's download bytes fall short); skipping
the membership check (an outsider gets 200). The test asserts that the second download
could be served from memory (the path is not visible from outside).
"""

from __future__ import annotations

from fastapi.testclient import TestClient

from tests.coordinator.test_aggregation_oracle import _enroll, _wait_task
from tests.federation_fixtures import small_federation
from tests.helpers import ADMIN, wait_for


def test_the_second_download_comes_from_memory_with_the_same_bytes_and_is_counted(coordinator: TestClient) -> None:
    # Arrange: one agent selected for round 1, one outsider
    svc = coordinator.app.state.service  # type: ignore[attr-defined]
    (member,) = _enroll(coordinator, 1)
    cfg = small_federation(rounds=1, clients_per_round=1, min_clients=1)
    fid = coordinator.post("/v1/federations", json=cfg, headers=ADMIN).json()["id"]
    assert coordinator.post(f"/v1/federations/{fid}/start", headers=ADMIN).status_code == 200
    task = _wait_task(coordinator, member)
    (outsider,) = _enroll(coordinator, 1)  # after the round opened: never selected for it
    url = f"/v1/federations/{fid}/models/{task['model_version']}"
    assert svc.model_bytes_in_memory(fid, 0) is None  # nothing read yet: the store path first

    # Act
    first = coordinator.get(url, headers=member)
    in_memory = svc.model_bytes_in_memory(fid, 0)
    second = coordinator.get(url, headers=member)
    refused = coordinator.get(url, headers=outsider)

    # Assert
    assert first.status_code == second.status_code == 200
    assert in_memory is not None and in_memory.data == first.content == second.content
    assert {k: v for k, v in first.headers.items() if k.startswith("x-fedslim")} == \
        {k: v for k, v in second.headers.items() if k.startswith("x-fedslim")}
    assert refused.status_code == 403
    # the direct call above counted once more, as a download would; the scheduler's tick
    # writes the counts (it may be writing them right now: wait for the total)
    want = 3 * len(first.content)
    wait_for(lambda: _round_bytes(svc, fid, 1) >= want, 10, what="the round's download bytes")
    assert _round_bytes(svc, fid, 1) == want


def _round_bytes(svc, fid: str, rnd: int) -> int:  # type: ignore[no-untyped-def]
    with svc.store.tx() as conn:
        return int(svc.store.download_bytes(conn, fid, rnd))
