"""ONNX export: parity with PyTorch under ONNX Runtime, and clear failures with no file left."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from models import MODEL_NAMES, build_model
from pruning.export import ExportError, export_onnx, make_session
from pruning.structured import prune_channels


def _check_exported(path, model, batch, result):
    graph = onnx.load(str(path))
    assert result.opset >= 17
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch axis
    assert result.parity_max_abs_diff <= 1e-4
    # independent oracle: a fresh session on a batch size never seen at export
    (got,) = make_session(path).run(None, {"input": batch[:5].numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(got, model(batch[:5]).numpy(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("pruned", [False, True], ids=["dense", "pruned"])
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_zoo_export_matches_torch(name, pruned, batch, randomize_bn, tmp_path):
    model = randomize_bn(build_model(name))
    if pruned:
        prune_channels(model, batch, ratio=0.5, round_to=8)
    path = tmp_path / f"{name}.onnx"
    result = export_onnx(model, path, batch[:1], parity_input=batch)
    _check_exported(path, model, batch, result)
    assert result.file_bytes == path.stat().st_size


@pytest.mark.parametrize("pruned", [False, True], ids=["dense", "pruned"])
def test_custom_depthwise_concat_residual_export(pruned, branchy, randomize_bn, batch, tmp_path):
    model = randomize_bn(branchy())
    if pruned:
        prune_channels(copy.deepcopy(model), batch, ratio=0.5)
        model = prune_channels(model, batch, ratio=0.5)
    path = tmp_path / "branchy.onnx"
    result = export_onnx(model, path, batch[:1], parity_input=batch)
    _check_exported(path, model, batch, result)


class DiffersUnderExport(nn.Module):
    """Behaves differently while being traced: the exported graph is silently wrong."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(28 * 28, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(torch.flatten(x, 1))
        return y + 1e-2 if torch.onnx.is_in_onnx_export() else y


class UsesHistc(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.histc(x, bins=10)  # no ONNX symbolic for aten::histc at opset 17


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (DiffersUnderExport(), "differs from PyTorch"),  # mismatch above tolerance
        (UsesHistc(), "histc"),  # unsupported operator
    ],
)
def test_unfaithful_export_raises_and_leaves_no_file(model, message, batch, tmp_path):
    path = tmp_path / "model.onnx"
    with pytest.raises(ExportError, match=message):
        export_onnx(model, path, batch[:1], parity_input=batch)
    assert list(tmp_path.iterdir()) == []


def test_tolerance_is_the_boundary(batch, tmp_path):
    model = DiffersUnderExport()
    result = export_onnx(model, tmp_path / "m.onnx", batch[:1], parity_input=batch, atol=2e-2)
    assert 0.9e-2 < result.parity_max_abs_diff <= 1.1e-2


def test_bad_opset_is_refused(batch, tmp_path):
    with pytest.raises(ValueError, match="opset"):
        export_onnx(build_model("lenet5"), tmp_path / "m.onnx", batch[:1], opset=13)
