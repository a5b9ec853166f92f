"""Bring your own model: the example package in examples/ registered through the
`fedslim.models` entry point (a dist-info with entry_points.txt on sys.path, as pip would
install it), resolved by name on the coordinator and the agents, trained in a federation;
an agent with another plugin version declines the task and says why."""

from __future__ import annotations

import importlib
import logging
import shutil
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from edge_agent.agent import ModelMismatch
from models import MODEL_NAMES, build_model, count_macs
from models.plugins import ENTRY_POINT_GROUP, PluginError, structure_fingerprint
from models.state import build_from_state, to_numpy_state
from models.zoo import model_identity
from pruning.structured import prune_channels
from tests.helpers import ADMIN, wait_for

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fedslim-example-model"
PACKAGE = "fedslim_example_model"
NAME = "example_tiny_cnn"


def install(root: Path, version: str, *, entry: str = f"{PACKAGE}:TinyCNN", dist: str = "fedslim-example-model") -> Path:
    """What `pip install` leaves in site-packages: the package and a dist-info whose
    entry_points.txt registers the model; returns the directory to put on sys.path."""
    root.mkdir(parents=True)
    shutil.copytree(EXAMPLE / "src" / PACKAGE, root / PACKAGE)
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n{NAME} = {entry}\n")
    return root


@pytest.fixture
def on_path(monkeypatch: pytest.MonkeyPatch) -> Callable[[Path], None]:
    """Put an installed root on sys.path (undone after the test), dropping earlier ones."""
    added: list[str] = []

    def put(root: Path) -> None:
        for old in added:
            sys.path.remove(old)
        added[:] = [str(root)]
        monkeypatch.syspath_prepend(str(root))  # also invalidates importlib's caches
        monkeypatch.delitem(sys.modules, PACKAGE, raising=False)

    return put


@pytest.fixture
def plugin_v1(tmp_path: Path, on_path: Callable[[Path], None]) -> None:
    on_path(install(tmp_path / "v1", "0.1.0"))


def test_example_plugin_builds_by_name_prunes_and_rebuilds(plugin_v1):
    model = build_model(NAME, in_channels=3, num_classes=5, image_size=32).eval()
    assert type(model).__module__ == PACKAGE and NAME not in MODEL_NAMES
    x = torch.randn(2, 3, 32, 32)
    assert model(x).shape == (2, 5)

    dense_macs = count_macs(model, (3, 32, 32))
    prune_channels(model, x, ratio=0.5, round_to=8)
    assert count_macs(model, (3, 32, 32)) < dense_macs
    rebuilt = build_from_state(NAME, to_numpy_state(model), in_channels=3, num_classes=5, image_size=32).eval()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x))


def test_identity_names_the_distribution_and_changes_with_its_version(tmp_path, on_path):
    on_path(install(tmp_path / "v1", "0.1.0"))
    v1 = model_identity(NAME)
    on_path(install(tmp_path / "v2", "0.2.0"))  # the same code, another release
    v2 = model_identity(NAME)
    assert (v1.origin, v2.origin) == ("fedslim-example-model 0.1.0", "fedslim-example-model 0.2.0")
    assert v1.fingerprint != v2.fingerprint
    assert model_identity("lenet5").origin == "fedslim"


def test_fingerprint_covers_names_and_shapes():
    base = structure_fingerprint(nn.Sequential(nn.Linear(4, 8)))
    assert base == structure_fingerprint(nn.Sequential(nn.Linear(4, 8)))  # fresh weights, same structure
    assert base != structure_fingerprint(nn.Sequential(nn.Linear(4, 9)))  # a shape
    assert base != structure_fingerprint(nn.Sequential(nn.Identity(), nn.Linear(4, 8)))  # a name


def test_a_plugin_cannot_take_over_a_zoo_name(tmp_path, on_path):
    on_path(install(tmp_path / "evil", "6.6.6", dist="evil-models"))
    (tmp_path / "evil" / "evil_models-6.6.6.dist-info" / "entry_points.txt").write_text(
        f"[{ENTRY_POINT_GROUP}]\nresnet20 = {PACKAGE}:TinyCNN\n")
    importlib.invalidate_caches()
    assert type(build_model("resnet20", in_channels=3)).__name__ == "CifarResNet"
    assert model_identity("resnet20", in_channels=3).origin == "fedslim"


def test_broken_plugins_fail_with_their_name(tmp_path, on_path):
    on_path(install(tmp_path / "bad", "0.1.0", entry=f"{PACKAGE}:NoSuchThing"))
    with pytest.raises(PluginError, match=f"{NAME}.*fedslim-example-model 0.1.0.*failed to load"):
        build_model(NAME)
    with pytest.raises(ValueError, match="installed plugins: ") as info:
        build_model("not_installed_anywhere")
    assert NAME in str(info.value)


def test_federation_trains_the_plugin_model(plugin_v1, coordinator, make_agent, start_federation, run_federation,
                                            one_thread):
    fid = start_federation(model=NAME)
    agents = [make_agent(i) for i in range(2)]
    task = agents[0].client.poll_task(5)
    assert task is not None and task.model == NAME
    assert task.model_origin == "fedslim-example-model 0.1.0"
    assert task.model_fingerprint == model_identity(NAME).fingerprint

    rows = run_federation(fid, agents, max_tasks=2)
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["participants"] == 2 for r in rows)


def test_agent_with_another_plugin_version_declines_with_the_reason(
        tmp_path, on_path, coordinator, make_agent, start_federation, caplog, one_thread):
    on_path(install(tmp_path / "v1", "0.1.0"))
    # a short deadline: an agent refused after the stop waits out at most that round
    fid = start_federation(model=NAME, clients_per_round=1, min_clients=1, round_deadline_s=5)
    agent = make_agent(0)
    task = agent.client.poll_task(5)  # round 1 is open: its task was made with v0.1.0
    assert task is not None and task.model_origin == "fedslim-example-model 0.1.0"
    on_path(install(tmp_path / "v2", "0.2.0"))  # the device upgraded, the coordinator did not

    with pytest.raises(ModelMismatch, match=r"coordinator has fedslim-example-model 0\.1\.0, this agent .*0\.2\.0"):
        agent.handle(task)

    caplog.set_level(logging.INFO, logger="fedslim.coordinator")
    worker = threading.Thread(target=agent.run, kwargs={"idle_exit_s": 1.0, "poll_s": 0.5})
    worker.start()
    try:
        wait_for(lambda: any("declined" in r.getMessage() and "0.2.0" in r.getMessage() for r in caplog.records),
                 timeout=20)
        rounds = coordinator.get(f"/v1/federations/{fid}/rounds", headers=ADMIN).json()
        assert not any(r.get("participants") for r in rounds)  # nothing it trained was folded in
    finally:
        coordinator.post(f"/v1/federations/{fid}/stop", headers=ADMIN)
        worker.join(timeout=30)
    assert not worker.is_alive()
