"""bench.load end to end at a toy size: a real coordinator process, 5 simulated agents,
one round. Checks the contract (one JSON object on stdout, the keys and their types, no
errors, the coordinator gone afterwards), never the timings."""

from __future__ import annotations

import json
from pathlib import Path

import psutil
import pytest

from bench import load


def test_load_bench_runs_five_agents_one_round_without_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Arrange: short long polls so that the run and the coordinator's shutdown are quick
    results = tmp_path / "load.json"
    argv = ["--agents", "5", "--rounds", "1", "--json", "--results", str(results), "--no-plot",
            "--poll-wait", "2", "--train-s", "0.1", "--timeout", "60"]

    # Act
    rc = load.main(argv)

    # Assert: exactly one JSON object on stdout, with the keys and types
    row = json.loads(capsys.readouterr().out)
    assert rc == 0, row
    assert row["agents"] == 5 and row["errors"] == 0, row["error_kinds"]
    assert row["complete"] and row["rounds_completed"] == 1, row["incomplete_reason"]
    for key in ("health_p99_s", "upload_p99_s", "poll_p99_s"):
        assert isinstance(row[key], float) and row[key] > 0, key
    assert len(row["rss_mb_per_round"]) == 1 and all(isinstance(x, float) and x > 0 for x in row["rss_mb_per_round"])
    assert row["uploads"] == 5 and row["samples"]["upload"] == 5 and row["bytes_up"] > 0
    # the results file holds the same run, and no coordinator process is left behind
    assert json.loads(results.read_text())["runs"] == [row]
    assert psutil.Process().children(recursive=True) == []
