"""bench.compare end to end at a toy size: real Flower (its simulation runtime, in
.venv-flower) and real fedslim-sim processes, 4 clients, 1 round of 2 local steps on the
synthetic set. Checks the contract (one JSON list on stdout, the issue's keys, both
systems, the partition check), never the numbers. The real `--quick` run is slow.

Mutations these kill: Flower trained on another split (the partition check raises),
rows missing a system or a key, the summary's target marking inverted."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bench import compare
from bench.flower_peer import flower_python

needs_flower = pytest.mark.skipif(not flower_python().exists(),
                                  reason="no .venv-flower: scripts/setup.sh makes it (python -m bench.flower_peer --setup)")


@needs_flower
def test_compare_runs_flower_and_fedslim_on_a_toy_federation(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Arrange
    argv = ["--json", "--clients", "4", "--per-round", "2", "--rounds", "1", "--seeds", "2", "--strategy-seeds", "1",
            "--alphas", "0.5",
            "--strategies", "fedavg,sparse", "--sections", "main", "--max-steps", "2", "--eval-samples", "200",
            "--dataset", "synthetic",
            "--no-export", "--out", str(tmp_path / "runs"), "--results", str(tmp_path / "results"),
            "--flower-python", str(flower_python())]

    # Act
    rc = compare.main(argv)

    # Assert: one JSON list, a row per run with the keys; the second seed runs
    # only the rows the targets compare (Flower and fedslim FedAvg)
    rows = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert [(r["system"], r["strategy"], r["seed"]) for r in rows] == [
        ("flower", "fedavg", 0), ("fedslim", "fedavg", 0), ("fedslim", "sparse", 0),
        ("flower", "fedavg", 1), ("fedslim", "fedavg", 1)]
    for r in rows:
        assert r["alpha"] == 0.5
        assert 0 <= r["final_accuracy"] <= 1 and r["mb_per_round"] > 0 and r["seconds_per_round"] > 0
        assert r["peak_rss_mb"] > 0
    # Flower ships the dense fp32 FedAvg CNN both ways: 2 clients x 876,938 params x 4 B
    assert rows[0]["mb_up_per_round"] == pytest.approx(2 * 876_938 * 4 / 1e6, rel=0.01)
    assert rows[0]["final_accuracy"] != rows[3]["final_accuracy"] or rows[1]["final_accuracy"] != rows[4]["final_accuracy"]
    saved = json.loads((tmp_path / "results" / "compare.json").read_text())
    assert saved["rows"] == rows and len(saved["plots"]) == 3
    assert all((tmp_path / "results" / Path(p).name).exists() for p in saved["plots"])


def test_partition_check_refuses_another_split(tmp_path: Path) -> None:
    # Arrange: the digest fedslim recorded, and a Flower split with one index moved
    from sim.engine import partition_digest

    parts = [np.array([0, 1, 2]), np.array([3, 4])]
    recorded = {"simulation": {"partition_sha256": partition_digest(parts)}}
    np.savez(tmp_path / "same.npz", client_0=parts[0], client_1=parts[1])
    np.savez(tmp_path / "moved.npz", client_0=np.array([0, 1]), client_1=np.array([2, 3, 4]))

    # Act / assert
    compare.check_same_partition(tmp_path / "same.npz", recorded)
    with pytest.raises(AssertionError, match="another partition"):
        compare.check_same_partition(tmp_path / "moved.npz", recorded)


def test_targets_are_marked_missed_with_the_reason() -> None:
    def row(system: str, acc: float, secs: float) -> dict:
        return {"system": system, "strategy": "fedavg", "alpha": 0.5, "seed": 0, "final_accuracy": acc,
                "best_accuracy": acc, "rounds_to_85": None, "mb_up_per_round": 1.0, "mb_down_per_round": 1.0,
                "mb_per_round": 2.0, "mb_total": 2.0, "seconds_per_round": secs, "peak_rss_mb": 1.0, "macs": 1,
                "ort_latency_ms": None}

    met = compare.summarize([row("flower", 0.89, 10.0), row("fedslim", 0.885, 9.0)])
    missed = compare.summarize([row("flower", 0.89, 10.0), row("fedslim", 0.87, 12.0)])

    assert met[1]["targets"] == "met"
    assert missed[1]["targets"].startswith("MISSED") and "-2.00 pt" in missed[1]["targets"] and "1.20x" in missed[1]["targets"]


@pytest.mark.slow
def test_real_quick_compare(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = compare.main(["--quick", "--json", "--out", str(tmp_path / "runs"), "--results", str(tmp_path / "results")])
    rows = json.loads(capsys.readouterr().out)
    assert rc == 0 and {r["system"] for r in rows} == {"flower", "fedslim"}
