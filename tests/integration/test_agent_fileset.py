"""The agent's own file set — exactly what deploy/Dockerfile.agent copies — trains a
round against a real coordinator, and the agent process loads nothing from anywhere else.

The COPY lines are read from the Dockerfile, so the image and this test cannot drift. The
agent runs as `python -I` from a temp dir with the checkout's editable-install finder
removed, so only the copied files are importable; the coordinator runs from the checkout.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import Cluster

REPO = Path(__file__).resolve().parents[2]
OURS = ("models", "sparse_kernels", "pruning", "strategies", "coordinator", "edge_agent", "sim", "bench")
SERVER_ONLY = ("fastapi", "starlette", "sqlalchemy", "uvicorn", "pydantic_settings")

# Runs in the agent process: only `root` may provide our packages.
BOOTSTRAP = """
import atexit, json, sys
root, report = sys.argv[1], sys.argv[2]
editable = lambda x: getattr(x, "__module__", "").startswith("__editable__")
sys.meta_path[:] = [f for f in sys.meta_path if not editable(f)]
sys.path_hooks[:] = [h for h in sys.path_hooks if not editable(h)]
sys.path_importer_cache.clear()
sys.path.insert(0, root)

def write_report():
    with open(report, "w") as f:
        json.dump({name: getattr(m, "__file__", None) for name, m in list(sys.modules.items())}, f)

atexit.register(write_report)
from edge_agent.cli import main
sys.exit(main(sys.argv[3:]))
"""


def agent_file_set(dockerfile: Path, dest: Path) -> list[str]:
    """Lay out the files the Dockerfile's COPY instructions take from the build context."""
    copied = []
    for line in dockerfile.read_text().splitlines():
        parts = line.split()
        if not parts or parts[0] != "COPY" or any(p.startswith("--") for p in parts[1:]):
            continue
        *sources, target = parts[1:]
        for src in sources:
            origin = REPO / src
            into = dest / target / Path(src).name if target.endswith("/") or len(sources) > 1 else dest / target
            into.parent.mkdir(parents=True, exist_ok=True)
            if origin.is_dir():
                shutil.copytree(origin, into, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(origin, into)
            copied.append(src)
    return copied


def test_the_file_set_is_the_agent_and_the_layers_below_it(tmp_path: Path) -> None:
    copied = agent_file_set(REPO / "deploy" / "Dockerfile.agent", tmp_path)
    assert {"edge_agent", "strategies", "pruning", "sparse_kernels", "models"} <= set(copied)
    assert sorted(p.name for p in (tmp_path / "coordinator").iterdir()) == ["__init__.py", "protocol.py"]
    assert not (tmp_path / "sim").exists() and not (tmp_path / "bench").exists()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    (tmp_path / "cluster").mkdir()
    c = Cluster(tmp_path / "cluster")
    c.start_coordinator()
    yield c
    c.stop()


def test_agent_file_set_trains_a_round(cluster: Cluster, tmp_path: Path) -> None:
    # Arrange: the file set in a temp dir; a one-round FedDIP federation (an agent half
    # with hooks and a local rebuild of the ERK initial model)
    root = tmp_path / "agent-image"
    agent_file_set(REPO / "deploy" / "Dockerfile.agent", root)
    report = tmp_path / "agent-modules.json"
    resp = cluster.http.post("/v1/federations", json={
        "model": "lenet5", "rounds": 1, "clients_per_round": 1, "min_clients": 1, "round_deadline_s": 120,
        "data": {"dataset": "synthetic", "eval_samples": 200}, "strategy": {"name": "feddip", "params": {}},
        "training": {"batch_size": 32, "lr": 0.05, "max_steps": 4},
    })
    assert resp.status_code == 201, resp.text
    fid = resp.json()["id"]

    # Act: one agent process from the file set only
    agent = cluster.start_agent(0, 1, command=[sys.executable, "-I", "-c", BOOTSTRAP, str(root), str(report)], cwd=root,
                                idle_exit_s=2)

    def enrolled() -> bool:
        assert agent.poll() is None, f"the agent exited early:\n{cluster.logs()}"  # e.g. a module it lacks
        return len(cluster.http.get("/v1/agents").json()) == 1

    cluster.wait(enrolled, "enrollment")
    assert cluster.http.post(f"/v1/federations/{fid}/start").status_code == 200
    cluster.wait(lambda: cluster.http.get(f"/v1/federations/{fid}").json()["status"] == "completed", "the round")
    [row] = cluster.http.get(f"/v1/federations/{fid}/rounds").json()
    cluster.wait(lambda: agent.poll() is not None, "the idle agent to exit")  # it reports its modules at exit

    # Assert: the round was trained by that agent, which rebuilt the initial model itself
    assert agent.returncode == 0, cluster.logs()
    assert row["participants"] == 1 and row["bytes_up"] > 0
    assert row["bytes_down"] == 0, "the agent half's initial model differs from the server's: it downloaded"
    modules = json.loads(report.read_text())
    ours = {n: f for n, f in modules.items() if n.split(".")[0] in OURS}
    assert "edge_agent.local" in ours and "strategies.feddip.agent" in ours
    assert all(f is None or Path(f).is_relative_to(root) for f in ours.values()), ours
    assert sorted(n for n in ours if n.split(".")[0] == "coordinator") == ["coordinator", "coordinator.protocol"]
    assert not [n for n in modules if n.split(".")[0] in SERVER_ONLY]

