"""npz checkpoints: round trip dense and pruned models, refuse malformed files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from models import build_model
from models.structure import structure_of
from pruning.export import CheckpointError, load_checkpoint, save_checkpoint
from pruning.structured import prune_channels

META = {"model": "resnet20", "in_channels": 1, "num_classes": 10, "image_size": 28, "dataset": "synthetic"}


@pytest.mark.parametrize("pruned", [False, True], ids=["dense", "pruned"])
def test_round_trip(pruned, batch, randomize_bn, tmp_path):
    model = randomize_bn(build_model("resnet20"))
    if pruned:
        prune_channels(model, batch, ratio=0.5)
    path = save_checkpoint(tmp_path / "ckpt.npz", model, META)

    loaded, meta = load_checkpoint(path)

    assert meta == META
    assert structure_of(loaded) == structure_of(model)
    for k, v in model.state_dict().items():
        assert loaded.state_dict()[k].dtype == v.dtype
    torch.testing.assert_close(loaded.eval()(batch), model(batch))
    with np.load(path, allow_pickle=False) as npz:  # plain arrays, no pickled objects
        assert all(npz[k].dtype in (np.float32, np.dtype("<U" + str(npz[k].dtype.itemsize // 4))) for k in npz.files)


def test_exact_path_is_written(tmp_path):
    path = save_checkpoint(tmp_path / "model.ckpt", build_model("lenet5"), {**META, "model": "lenet5"})
    assert path.exists() and not (tmp_path / "model.ckpt.npz").exists()


def test_missing_meta_is_refused(tmp_path):
    path = tmp_path / "x.npz"
    np.savez(path, w=np.zeros(3, np.float32))
    with pytest.raises(CheckpointError, match="__meta__"):
        load_checkpoint(path)


def test_wrong_model_is_refused(tmp_path):
    path = save_checkpoint(tmp_path / "c.npz", build_model("lenet5"), {**META, "model": "lenet5"})
    with pytest.raises(CheckpointError, match="does not fit"):
        load_checkpoint(path, model_name="resnet20")


@pytest.mark.parametrize("content", [b"not a zip", b""])
def test_garbage_is_refused(content, tmp_path):
    path = tmp_path / "c.npz"
    path.write_bytes(content)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_pickled_arrays_are_never_loaded(tmp_path):
    path = tmp_path / "c.npz"
    np.savez(path, __meta__=np.array([json.dumps(META)]), evil=np.array([object()], dtype=object))
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
