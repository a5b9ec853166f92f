"""The device flow of README's "On a device" section, with real processes over real HTTP:
a coordinator without any dataset, two agent processes each pointed at a folder of its
own PNGs (written here from Fashion-MNIST, one sub-folder per class), a federation that
evaluates on the agents' held-out splits only, the exported ONNX downloaded by the admin,
and `fedslim-agent infer` classifying PNG files with it.

Enrollment is per device: the coordinator runs without a shared enrollment token, the
operator issues one one-time token per device (`POST /v1/enrollment-tokens`, what
`fedslim-coordinator enroll-token create` calls), and each agent enrolls with its own."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models import DatasetError, load_fashion_mnist
from tests.helpers import Cluster

ROOT = Path(__file__).resolve().parents[2]
CLASSES = ["T-shirt_top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle_boot"]
PER_CLASS = 30  # per agent: 300 PNGs, 30 of them held out for evaluation


def _write_folder(root: Path, images: np.ndarray, labels: np.ndarray) -> list[Path]:
    paths = []
    for k, (img, y) in enumerate(zip(images, labels, strict=True)):
        path = root / CLASSES[int(y)] / f"{k:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[:, :, 0]).save(path)
        paths.append(path)
    return paths


def _by_class(labels: np.ndarray, start: int, count: int) -> np.ndarray:
    """Indices of samples start..start+count of every class (disjoint ranges per agent)."""
    return np.concatenate([np.flatnonzero(labels == c)[start:start + count] for c in range(10)])


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    c.env = {k: v for k, v in c.env.items() if k != "FEDSLIM_ENROLLMENT_TOKEN"}  # no shared token
    c.start_coordinator()
    yield c
    c.stop()


def test_device_with_its_own_pngs_trains_evaluates_and_infers(cluster: Cluster, tmp_path: Path) -> None:
    try:
        train, test = load_fashion_mnist(split="train"), load_fashion_mnist(split="test")
    except DatasetError as exc:  # scripts/setup.sh installs it (Debian dataset-fashion-mnist)
        pytest.skip(f"Fashion-MNIST is not installed: {exc}")
    # Arrange: each device's photos, split by class into folders
    folders = []
    for i in range(2):
        idx = _by_class(train.labels, i * PER_CLASS, PER_CLASS)
        folders.append(tmp_path / f"device-{i}" / "photos")
        _write_folder(folders[-1], train.images[idx], train.labels[idx])
    probe_idx = _by_class(test.labels, 0, 5)
    probes = _write_folder(tmp_path / "probe", test.images[probe_idx], test.labels[probe_idx])

    resp = cluster.http.post("/v1/federations", json={
        "model": "lenet5", "rounds": 2, "clients_per_round": 2, "min_clients": 2, "round_deadline_s": 120,
        "data": {"dataset": "none",  # the coordinator has no data: federated evaluation only
                 "input": {"shape": [1, 28, 28], "classes": CLASSES, "mean": [0.2860], "std": [0.3530]}},
        "training": {"batch_size": 16, "lr": 0.05, "local_epochs": 5},
    })
    assert resp.status_code == 201, resp.text
    fid = resp.json()["id"]
    for i in range(2):
        issued = cluster.http.post("/v1/enrollment-tokens", json={"expires_in_s": 600, "name": f"device-{i}"})
        assert issued.status_code == 201, issued.text
        cluster.start_agent(i, 2, extra=["--data", str(folders[i]), "--enrollment-token", issued.json()["token"]])
    cluster.wait(lambda: len(cluster.http.get("/v1/agents").json()) == 2, "enrollment")

    # Act: train two rounds
    assert cluster.http.post(f"/v1/federations/{fid}/start").status_code == 200
    cluster.wait(lambda: cluster.http.get(f"/v1/federations/{fid}").json()["status"] == "completed", "completion", 240)

    # Assert: the rounds' accuracy is the agents' held-out evaluation, and it learned
    rows = cluster.http.get(f"/v1/federations/{fid}/rounds").json()
    assert [r["evaluation"] for r in rows] == ["federated", "federated"]
    assert all(r["federated"]["samples"] == 60 and r["participants"] == 2 for r in rows), rows
    assert all(a["num_samples"] == 5 * 270 for r in rows for a in r["agents"]), rows  # 5 epochs of 270
    # round 1 evaluated the seeded initial model, round 2 the model trained in round 1
    assert rows[0]["accuracy"] < 0.3 < rows[1]["accuracy"], rows

    # Act: the admin downloads the exported ONNX; the device classifies PNGs with it
    onnx = cluster.http.get(f"/v1/federations/{fid}/export/model.onnx", timeout=120)
    assert onnx.status_code == 200, onnx.text
    model = tmp_path / "model.onnx"
    model.write_bytes(onnx.content)
    done = subprocess.run([sys.executable, "-m", "edge_agent.cli", "infer", "--model", str(model),
                           "--mean", "0.2860", "--std", "0.3530", "--labels", ",".join(CLASSES), "--json",
                           *map(str, probes)], cwd=ROOT, capture_output=True, text=True, timeout=120)

    # Assert: one answer per PNG, named, mostly right (chance is 0.1)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    assert [r["input"] for r in results] == [str(p) for p in probes]
    assert all(r["label"] == CLASSES[r["class"]] for r in results)
    truth = [p.parent.name for p in probes]
    accuracy = np.mean([r["label"] == t for r, t in zip(results, truth, strict=True)])
    assert accuracy > 0.5, (accuracy, rows[-1]["accuracy"], results[:5])
