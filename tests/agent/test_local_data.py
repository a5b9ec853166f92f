"""A device's own data (`edge_agent.local_data`): read image folders, .npz and CSV, map them
to a federation's input spec, refuse bad data naming the file (and line); the agent declines
a task its data cannot serve and sends no update.

Oracles: pixel values written with numpy and read back independently with Pillow; the
normalisation recomputed by hand from the spec; CSV errors' file:line as written."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from coordinator.protocol import InputSpec
from edge_agent.agent import AgentState, EdgeAgent
from edge_agent.cli import config_args, main
from edge_agent.client import CoordinatorClient
from edge_agent.local_data import LocalDataError, holdout_split, read_local, to_dataset
from models.training import iterate_batches
from tests.federation_fixtures import create_started
from tests.helpers import ADMIN, ENROLL, wait_for

ROOT = Path(__file__).resolve().parents[2]


def _spec(**kw: Any) -> InputSpec:
    return InputSpec.model_validate({"shape": [1, 8, 8], "classes": ["cat", "dog", "owl"], **kw})


def _png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


# ---------------------------------------------------------------- image folders

def test_image_folder_matches_an_independent_pillow_read(tmp_path: Path) -> None:
    # Arrange: gray 8×8 PNGs in folders whose sorted order (dog, owl) differs from the
    # federation's class order (cat, dog, owl): labels must follow the names
    rng = np.random.default_rng(0)
    written = {}
    for cls in ("owl", "dog"):
        for k in range(3):
            pixels = rng.integers(0, 256, size=(8, 8), dtype=np.uint8)
            written[tmp_path / cls / f"{k}.png"] = (cls, pixels)
            _png(tmp_path / cls / f"{k}.png", pixels)
    (tmp_path / "dog" / "notes.txt").write_text("not a sample")

    # Act
    data = to_dataset(read_local(tmp_path), _spec())

    # Assert: every sample's pixels equal Pillow's own read of its file, label by name
    assert len(data) == 6 and data.images.shape == (6, 8, 8, 1) and data.images.dtype == np.uint8
    by_pixels = {np.asarray(Image.open(p)).tobytes(): cls for p, (cls, _) in written.items()}
    classes = ["cat", "dog", "owl"]
    for img, label in zip(data.images, data.labels, strict=True):
        assert by_pixels[img[:, :, 0].tobytes()] == classes[int(label)]
    assert sorted(data.labels.tolist()) == [1, 1, 1, 2, 2, 2]


def test_images_are_resized_and_converted_to_the_spec(tmp_path: Path) -> None:
    # an RGB 16×12 photo into a 1×8×8 federation: Pillow's luma then bilinear resize
    rgb = np.random.default_rng(1).integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
    _png(tmp_path / "cat" / "a.png", rgb)
    data = to_dataset(read_local(tmp_path), _spec())
    expected = np.asarray(Image.fromarray(rgb).convert("L").resize((8, 8), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(data.images[0, :, :, 0], expected)


def test_batches_are_normalised_by_the_spec(tmp_path: Path) -> None:
    pixels = np.arange(64, dtype=np.uint8).reshape(8, 8) * 3
    _png(tmp_path / "cat" / "a.png", pixels)
    data = to_dataset(read_local(tmp_path), _spec(mean=[0.2], std=[0.4]))
    x, y = next(iterate_batches(data, 8))
    expected = (pixels.astype(np.float32) / 255 - 0.2) / 0.4
    torch.testing.assert_close(x[0, 0], torch.from_numpy(expected))
    assert y.tolist() == [0]


def test_unreadable_image_names_the_file(tmp_path: Path) -> None:
    _png(tmp_path / "cat" / "good.png", np.zeros((8, 8), np.uint8))
    bad = tmp_path / "cat" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(LocalDataError, match=rf"{bad}: unreadable image"):
        read_local(tmp_path)


def test_unknown_class_names_the_file(tmp_path: Path) -> None:
    _png(tmp_path / "cat" / "a.png", np.zeros((8, 8), np.uint8))
    _png(tmp_path / "wolf" / "b.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(LocalDataError, match=rf"{tmp_path / 'wolf' / 'b.png'}: unknown class 'wolf'"):
        to_dataset(read_local(tmp_path), _spec())


# ---------------------------------------------------------------- CSV

def _csv(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sensor.csv"
    path.write_text(text)
    return path


def test_csv_features_fill_the_spec_shape_unscaled(tmp_path: Path) -> None:
    # features are not 8-bit pixels: (x - mean)/std, no /255; C, H, W order per row
    path = _csv(tmp_path, "a,b,label,c,d\n1,2,dog,3,4\n5,6,cat,7,8\n")
    data = to_dataset(read_local(path), InputSpec(shape=[2, 1, 2], classes=["cat", "dog"], mean=[1.0, 2.0],
                                                  std=[2.0, 4.0]))
    x, y = next(iterate_batches(data, 2))
    expected = (np.array([[1, 2, 3, 4], [5, 6, 7, 8]], np.float32).reshape(2, 2, 1, 2)
                - np.array([1, 2], np.float32).reshape(1, 2, 1, 1)) / np.array([2, 4], np.float32).reshape(1, 2, 1, 1)
    torch.testing.assert_close(x, torch.from_numpy(expected))
    assert y.tolist() == [1, 0]


@pytest.mark.parametrize(("text", "where", "what"), [
    ("f1,f2,label\n1,2,cat\n1,nan,dog\n", ":3:", "NaN/Inf"),  # NaN on line 3
    ("f1,f2,label\n1,2,cat\n\n1,inf,dog\n", ":4:", "NaN/Inf"),  # a blank line still counts
    ("f1,f2,label\n1,2,cat\n1,2,3,dog\n", ":3:", "4 columns, the header has 3"),  # wrong width
    ("f1,f2,label\n1,x2,cat\n", ":2:", "not a number"),
    ("f1,f2,class\n1,2,cat\n", ":1:", "no label column 'label'"),
])
def test_csv_errors_name_file_and_line(tmp_path: Path, text: str, where: str, what: str) -> None:
    path = _csv(tmp_path, text)
    with pytest.raises(LocalDataError) as err:
        read_local(path)
    assert str(err.value).startswith(f"{path}{where}") and what in str(err.value), err.value


def test_csv_unknown_class_and_wrong_feature_count_name_the_line_or_file(tmp_path: Path) -> None:
    path = _csv(tmp_path, "f1,f2,label\n1,2,cat\n3,4,emu\n")
    spec = InputSpec(shape=[1, 1, 2], classes=["cat", "dog"])
    with pytest.raises(LocalDataError, match=rf"^{path}:3: unknown class 'emu'"):
        to_dataset(read_local(path), spec)
    good = _csv(tmp_path, "f1,f2,label\n1,2,cat\n")
    with pytest.raises(LocalDataError, match=rf"^{good}: 2 feature columns, .* needs 3"):
        to_dataset(read_local(good), InputSpec(shape=[1, 1, 3], classes=["cat", "dog"]))


def test_csv_label_column_option(tmp_path: Path) -> None:
    path = _csv(tmp_path, "kind,f1\ndog,0.5\n")
    data = to_dataset(read_local(path, label_column="kind"), InputSpec(shape=[1, 1, 1], classes=["cat", "dog"]))
    assert data.labels.tolist() == [1] and data.images.dtype == np.float32


# ---------------------------------------------------------------- npz

def test_npz_images_with_named_and_indexed_labels(tmp_path: Path) -> None:
    x = np.random.default_rng(2).integers(0, 256, size=(4, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "named.npz", x=x, y=np.array(["owl", "cat", "owl", "dog"]))
    np.savez(tmp_path / "indexed.npz", x=x, y=np.array([2, 0, 2, 1]))
    named = to_dataset(read_local(tmp_path / "named.npz"), _spec())
    indexed = to_dataset(read_local(tmp_path / "indexed.npz"), _spec())
    np.testing.assert_array_equal(named.images[..., 0], x)
    assert named.labels.tolist() == indexed.labels.tolist() == [2, 0, 2, 1]


@pytest.mark.parametrize(("arrays", "what"), [
    ({"x": np.zeros((2, 3), np.float32)}, "needs arrays 'x' and 'y'"),
    ({"x": np.array([[0.0, np.nan]]), "y": np.array([0])}, "sample 0 has NaN or Inf"),
    ({"x": np.zeros((2, 3)), "y": np.array([0, 1, 2])}, "y must be (N,)"),
    ({"x": np.zeros((1, 3)), "y": np.array([object()], dtype=object)}, "unreadable .npz"),  # pickle refused
])
def test_npz_errors_name_the_file(tmp_path: Path, arrays: dict[str, np.ndarray], what: str) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)  # type: ignore[arg-type]
    with pytest.raises(LocalDataError) as err:
        read_local(path)
    assert str(err.value).startswith(str(path)) and what in str(err.value), err.value


# ---------------------------------------------------------------- held-out split

def test_holdout_split_is_seeded_disjoint_and_complete(tmp_path: Path) -> None:
    x = np.arange(200, dtype=np.uint8).reshape(200, 1, 1)
    np.savez(tmp_path / "d.npz", x=x, y=np.zeros(200, np.int64))
    data = to_dataset(read_local(tmp_path / "d.npz"), InputSpec(shape=[1, 1, 1], classes=["a", "b"]))
    train, held = holdout_split(data, 0.1, seed=7)
    again = holdout_split(data, 0.1, seed=7)[1]
    other = holdout_split(data, 0.1, seed=8)[1]
    assert held is not None and again is not None and other is not None
    ids, held_ids = set(train.images.ravel().tolist()), set(held.images.ravel().tolist())
    assert len(held) == 20 and not ids & held_ids and ids | held_ids == set(range(200))
    assert held.images.tolist() == again.images.tolist() and held.images.tolist() != other.images.tolist()
    assert holdout_split(data, 0.0, seed=7) == (data, None)


# ---------------------------------------------------------------- the CLI and the agent

def test_config_file_becomes_flags_and_the_command_line_wins(tmp_path: Path) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--data")
    parser.add_argument("--memory-budget")
    parser.add_argument("--progress", action="store_true")
    cfg = tmp_path / "agent.toml"
    cfg.write_text('data = "/srv/photos"\nmemory_budget = "64MB"\nprogress = true\n')
    flags = config_args(str(cfg), parser)
    assert flags == ["--data", "/srv/photos", "--memory-budget", "64MB", "--progress"]
    assert parser.parse_args([*flags, "--data", "/mnt/usb"]).data == "/mnt/usb"
    cfg.write_text('datta = "/srv"\n')
    with pytest.raises(SystemExit, match="unknown key 'datta'"):
        config_args(str(cfg), parser)


def test_agent_refuses_to_start_on_bad_data(tmp_path: Path) -> None:
    # a real process: bad data is reported before the agent enrolls or contacts anything
    path = _csv(tmp_path, "f1,label\n1,cat\nnan,dog\n")
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'data = "{path}"\nurl = "http://127.0.0.1:9"\n')
    done = subprocess.run([sys.executable, "-m", "edge_agent.cli", "run", "--config", str(cfg),
                           "--state-dir", str(tmp_path / "state")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert f"{path}:3: column 'f1' is nan (NaN/Inf)" in done.stderr
    assert not (tmp_path / "state" / "identity.json").exists()


def test_holdout_flag_is_a_fraction() -> None:
    with pytest.raises(SystemExit):
        main(["run", "--holdout", "1.5", "--data", "x"])


def test_agent_declines_a_task_its_data_cannot_serve(coordinator: TestClient, tmp_path: Path) -> None:
    # Arrange: a federation of classes cat/dog/owl; the device has a folder named 'wolf'
    _png(tmp_path / "data" / "cat" / "a.png", np.zeros((28, 28), np.uint8))
    _png(tmp_path / "data" / "wolf" / "b.png", np.zeros((28, 28), np.uint8))
    client = CoordinatorClient(coordinator, max_tries=2, backoff_s=0.01)
    client.enroll(ENROLL, name="device")
    agent = EdgeAgent(client, read_local(tmp_path / "data"), AgentState(tmp_path / "agent"))
    fid = create_started(coordinator, clients_per_round=1, min_clients=1, num_classes=3, data={
        "dataset": "none", "input": {"shape": [1, 28, 28], "classes": ["cat", "dog", "owl"]}})
    task = wait_for(lambda: client.poll_task(1.0), 10, what="a task")
    assert task is not None and task.input is not None and task.evaluate

    # Act: the agent's loop meets the task (and, as the round reopens, again)
    agent._skip = lambda task: None  # type: ignore[method-assign]  # no wait for the deadline
    worker = threading.Thread(target=agent.run, kwargs={"idle_exit_s": 0.5, "poll_s": 0.2}, daemon=True)
    worker.start()
    svc = coordinator.app.state.service  # type: ignore[attr-defined]

    def declines() -> list[dict[str, Any]]:
        with svc.store.tx() as conn:
            return svc.store.list_declines(conn, fid)

    first = wait_for(declines, 20, what="a decline")[0]
    assert coordinator.post(f"/v1/federations/{fid}/stop", headers=ADMIN).status_code == 200
    worker.join(20)

    # Assert: declined with the file named, nothing uploaded, no round closed
    assert not worker.is_alive()
    assert first["reason"].startswith(f"{tmp_path / 'data' / 'wolf' / 'b.png'}: unknown class 'wolf'"), first
    assert client.bytes_up == 0
    assert coordinator.get(f"/v1/federations/{fid}", headers=ADMIN).json()["current_round"] == 0


# ---------------------------------------------------------------- infer on CSV rows

def _linear_onnx(path: Path, weight: np.ndarray, shape: tuple[int, int, int]) -> None:
    """A hand-built ONNX model: flatten (N, C, H, W) → logits = x · weight (F, K)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Flatten", ["x"], ["flat"], axis=1), helper.make_node("MatMul", ["flat", "w"], ["logits"])],
        "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", *shape])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", weight.shape[1]])],
        [numpy_helper.from_array(weight.astype(np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what every onnxruntime still reads
    onnx.save(model, path)


def test_infer_classifies_csv_rows_as_the_hand_computed_logits(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    from edge_agent.infer import main as infer_main

    rng = np.random.default_rng(3)
    weight = rng.normal(size=(4, 3))
    _linear_onnx(tmp_path / "m.onnx", weight, (2, 1, 2))
    rows = rng.normal(size=(5, 4)).round(3)
    lines = ["a,b,label,c,d"] + [f"{r[0]},{r[1]},x,{r[2]},{r[3]}" for r in rows]
    (tmp_path / "rows.csv").write_text("\n".join(lines) + "\n")
    # the oracle: per-channel (x - mean)/std on C, H, W order, then the linear map
    x = (rows.reshape(5, 2, 1, 2) - np.array([1.0, -1.0]).reshape(1, 2, 1, 1)) / np.array([2.0, 0.5]).reshape(1, 2, 1, 1)
    expected = (x.reshape(5, 4) @ weight).argmax(axis=1)
    assert infer_main(["--model", str(tmp_path / "m.onnx"), "--mean", "1,-1", "--std", "2,0.5", "--json",
                       str(tmp_path / "rows.csv")]) == 0
    assert [r["class"] for r in json.loads(capsys.readouterr().out)] == expected.tolist()


def test_infer_csv_errors_name_file_and_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from edge_agent.infer import main as infer_main

    _linear_onnx(tmp_path / "m.onnx", np.eye(4, 3), (1, 1, 4))
    bad = tmp_path / "bad.csv"
    bad.write_text("1,2,3,4\n1,nan,3,4\n")
    assert infer_main(["--model", str(tmp_path / "m.onnx"), str(bad)]) == 1
    assert f"{bad}:2: column 2 is not a finite number" in capsys.readouterr().err
    short = tmp_path / "short.csv"
    short.write_text("1,2,3\n")
    assert infer_main(["--model", str(tmp_path / "m.onnx"), str(short)]) == 1
    assert "3 feature columns, the model's input 1×1×4 needs 4" in capsys.readouterr().err
