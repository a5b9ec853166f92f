"""A full disk under the blob store: the upload gets 503 with a reason, no temporary blob
is left, nothing is accepted, and the same upload succeeds once space is back.

The disk is a real 1 MiB tmpfs mounted over the blob directory (needs root and mount;
skipped elsewhere). Mutations killed: a 500 instead of 503, a leftover .tmp file, an
update row written before its blob, a failed upload counted in the round.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from coordinator.app import create_app
from coordinator.settings import CoordinatorSettings
from sparse_kernels import decode
from tests.coordinator.test_aggregation_oracle import _encode as encode_delta
from tests.coordinator.test_aggregation_oracle import (
    _enroll,
    _random_delta,
    _wait_task,
    _wait_version,
)
from tests.federation_fixtures import small_federation
from tests.helpers import ADMIN


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    blobs = tmp_path / "coord" / "blobs"
    blobs.mkdir(parents=True)
    if shutil.which("mount") is None or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(blobs)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield blobs
    finally:
        subprocess.run(["umount", "-l", str(blobs)], check=False)


def test_disk_full_is_503_and_loses_nothing(tmp_path: Path, small_disk: Path) -> None:
    settings = CoordinatorSettings(data_dir=tmp_path / "coord", dev_mode=True, tick_s=0.05, long_poll_s=2)
    with TestClient(create_app(settings)) as c:
        (agent,) = _enroll(c, 1)
        fid = c.post("/v1/federations", json=small_federation(rounds=1, clients_per_round=1, min_clients=1),
                     headers=ADMIN).json()["id"]
        c.post(f"/v1/federations/{fid}/start", headers=ADMIN)
        _wait_task(c, agent)
        base = decode(c.get(f"/v1/federations/{fid}/models/0", headers=ADMIN).content).to_dense()
        body = encode_delta(fid, 1, 0, _random_delta(base, 0, density=1.0), 10)
        filler = small_disk / "filler"
        free = shutil.disk_usage(small_disk).free
        filler.write_bytes(b"\0" * max(0, free - len(body) // 2))  # too little room left for the update

        r = _put_raw(c, agent, fid, body)
        assert r.status_code == 503, r.text
        assert "storage unavailable" in r.json()["detail"] and r.headers["Retry-After"]
        assert not [p for p in small_disk.iterdir() if ".tmp" in p.name]
        assert c.get(f"/v1/federations/{fid}", headers=ADMIN).json()["model_version"] == 0
        svc = c.app.state.service  # type: ignore[attr-defined]
        with svc.store.tx() as conn:
            assert svc.store.list_updates(conn, fid, 1, 1) == []

        filler.unlink()  # space is back: the agent's retry goes through, counted once
        assert _put_raw(c, agent, fid, body).status_code == 200
        _wait_version(c, fid, 1, ADMIN)


def _put_raw(c: TestClient, auth: dict[str, str], fid: str, body: bytes):  # type: ignore[no-untyped-def]
    from coordinator.protocol import REPORT_HEADER

    report = '{"num_samples": 10, "train_loss": 0.5, "train_accuracy": 0.5, "train_seconds": 1}'
    return c.put(f"/v1/federations/{fid}/rounds/1/update", content=body,
                 headers={**auth, REPORT_HEADER: report, "Content-Type": "application/octet-stream"})


