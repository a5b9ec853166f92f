"""`fedslim-agent export` end to end on a small checkpoint, and the torch-free infer CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edge_agent.export import export_main
from models import build_model
from models.datasets import load_dataset
from models.transforms import to_tensor
from pruning.export import load_checkpoint, save_checkpoint
from pruning.export.report import _warnings

REPO = Path(__file__).resolve().parents[2]
META = {"model": "lenet5", "in_channels": 1, "num_classes": 10, "image_size": 28, "dataset": "synthetic"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A lenet5 checkpoint exported pruned with int8; returns (dir, report dict, stdout)."""
    tmp = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    save_checkpoint(tmp / "ckpt.npz", build_model("lenet5"), META)
    argv = [
        "--checkpoint", str(tmp / "ckpt.npz"), "--out", str(tmp / "model.onnx"), "--report", str(tmp / "report.json"),
        "--prune-ratio", "0.5", "--round-to", "8", "--repeats", "2", "--warmup", "1", "--threads", "1",
        "--eval-limit", "200", "--int8", "--save-pruned", str(tmp / "pruned.npz"),
    ]
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = export_main(argv)
    assert rc == 0
    return tmp, json.loads((tmp / "report.json").read_text()), out.getvalue()


def test_report_has_the_promised_keys_and_sane_values(exported):
    tmp, report, stdout = exported
    assert report["pruned_macs"] < report["dense_macs"]
    assert report["parity_max_abs_diff"] <= 1e-4
    for kind in ("dense", "pruned"):
        assert set(report["ort_latency_ms"][kind]) == {"bs1", "bs64"}
        assert all(v > 0 for v in report["ort_latency_ms"][kind].values())
        assert all(v > 0 for v in report["torch_latency_ms"][kind].values())
        assert 0.0 <= report["accuracy"][kind] <= 1.0
        for bs, (p10, p90) in report["ort_latency_spread_ms"][kind].items():  # the median inside its spread
            assert p10 <= report["ort_latency_ms"][kind][bs] <= p90
    for p10, mid, p90 in report["latency_speedup_spread"].values():
        assert 0 < p10 <= mid <= p90
    assert len(report["load_average"]["before"]) == 3 and len(report["load_average"]["after"]) == 3
    assert report["eval_samples"] == 200
    assert report["opset"] >= 17
    assert (tmp / "model.onnx").stat().st_size == report["file_bytes"]["pruned"]
    assert report["int8"]["file_bytes"] == (tmp / "model.int8.onnx").stat().st_size
    assert set(report["int8"]["ort_latency_ms"]) == {"bs1", "bs64"}
    assert "MACs" in stdout and "ORT ms bs64" in stdout


def test_pruned_checkpoint_loads_with_its_smaller_structure(exported):
    tmp, report, _ = exported
    model, meta = load_checkpoint(tmp / "pruned.npz")
    assert meta["model"] == "lenet5"
    assert report["pruned_widths"]["features.3"] == model.features[3].out_channels < 16


def _infer(args: list[str]) -> subprocess.CompletedProcess[str]:
    """Run the infer CLI in a fresh interpreter and fail if torch got imported."""
    code = (
        "import sys\n"
        "from edge_agent.infer import main\n"
        f"rc = main({args!r})\n"
        "assert 'torch' not in sys.modules, 'infer imported torch'\n"
        "sys.exit(rc)\n"
    )
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_infer_cli_agrees_with_torch_and_never_imports_torch(exported):
    tmp, _, _ = exported
    test = load_dataset("synthetic", split="test")
    np.save(tmp / "batch.npy", test.images[:12, :, :, 0])  # uint8 (N, H, W)
    model, _ = load_checkpoint(tmp / "pruned.npz")
    with torch.no_grad():
        logits = model.eval()(to_tensor(test.images[:12], test.name))
    expected = logits.argmax(1).tolist()
    probs = torch.softmax(logits, 1).max(1).values.tolist()

    done = _infer(["--model", str(tmp / "model.onnx"), "--json", "--mean", "0.5", "--std", "0.3",
                   str(tmp / "batch.npy")])

    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert [r["class"] for r in rows] == expected
    np.testing.assert_allclose([r["probability"] for r in rows], probs, atol=1e-4)


def test_infer_reads_float_npy_and_pgm(exported):
    tmp, _, _ = exported
    test = load_dataset("synthetic", split="test")
    np.save(tmp / "x.npy", to_tensor(test.images[:1], test.name).numpy())  # float32 (1, 1, 28, 28)
    (tmp / "one.pgm").write_bytes(b"P5\n# a comment\n28 28\n255\n" + test.images[0, :, :, 0].tobytes())

    done = _infer(["--model", str(tmp / "model.onnx"), "--json", "--mean", "0.5", "--std", "0.3",
                   str(tmp / "x.npy"), str(tmp / "one.pgm")])

    assert done.returncode == 0, done.stderr
    a, b = json.loads(done.stdout)
    assert a["class"] == b["class"]
    assert a["probability"] == pytest.approx(b["probability"], abs=1e-4)


def test_infer_rejects_wrong_image_size(exported):
    tmp, _, _ = exported
    np.save(tmp / "small.npy", np.zeros((2, 20, 20), np.uint8))
    done = _infer(["--model", str(tmp / "model.onnx"), str(tmp / "small.npy")])
    assert done.returncode == 1
    assert "expects (1, 28, 28)" in done.stderr


def test_export_cli_reports_missing_checkpoint(tmp_path, capsys):
    rc = export_main(["--checkpoint", str(tmp_path / "nope.npz"), "--out", str(tmp_path / "m.onnx"),
                      "--report", str(tmp_path / "r.json")])
    assert rc == 1
    assert "no such checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()


class _FakeReport:
    def __init__(self, speedup: float, macs_reduction: float) -> None:
        self.dense_macs, self.pruned_macs = 100, int(100 / macs_reduction)
        self.macs_reduction = macs_reduction
        self.latency_speedup = {"bs1": speedup, "bs64": speedup}
        self.int8 = None


@pytest.mark.parametrize(
    ("speedup", "macs_reduction", "warned"),
    [
        (1.0, 2.0, True),  # half the MACs, no latency gain: warn
        (1.8, 2.0, False),  # the gain showed up
        (1.0, 1.0, True),  # nothing pruned at all: say so
    ],
)
def test_warning_when_macs_cut_brings_no_latency_gain(speedup, macs_reduction, warned):
    assert bool(_warnings(_FakeReport(speedup, macs_reduction))) is warned  # type: ignore[arg-type]


def test_infer_picks_the_first_model_whose_measured_peak_fits_the_limit(exported):
    """Width levels on a device: widest first, the first that fits the memory limit runs;
    none fitting is one clear error naming each model's measured need."""
    tmp, _, _ = exported
    np.save(tmp / "b.npy", np.zeros((2, 1, 28, 28), np.float32))
    models = ["--model", str(tmp / "model.onnx"), "--model", str(tmp / "model.onnx")]

    roomy = _infer([*models, "--memory-limit", "1GB", "--json", str(tmp / "b.npy")])
    tiny = _infer([*models, "--memory-limit", "1", str(tmp / "b.npy")])
    ambiguous = _infer([*models, str(tmp / "b.npy")])

    assert roomy.returncode == 0, roomy.stderr
    assert "within the limit" in roomy.stderr and len(json.loads(roomy.stdout)) == 2
    assert tiny.returncode == 1 and "no model fits the memory limit" in tiny.stderr and "MiB" in tiny.stderr
    assert ambiguous.returncode == 1 and "--memory-limit" in ambiguous.stderr
