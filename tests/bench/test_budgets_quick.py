"""bench.budgets end to end at a toy size (3 real agents of the three memory classes,
synthetic data, one round, 2 local steps): the issue's JSON contract, the small class
left out of dense_fit and served by levels at a narrower width, never the accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import budgets


def test_budgets_bench_contract(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--agents", "3", "--dataset", "synthetic", "--rounds", "1", "--max-steps", "2", "--no-export",
            "--eval-samples", "200", "--variants", "dense_fit,levels", "--out", str(tmp_path / "runs"),
            "--results", str(tmp_path / "budgets.json"), "--json"]

    assert budgets.main(argv) == 0

    result = json.loads(capsys.readouterr().out)
    assert set(result["variants"]) == {"dense_fit", "levels"}
    small, mid, unlimited = result["agent_budgets"]
    assert small < result["budgets"]["dense_b16"] <= mid and unlimited is None
    for variant in result["variants"].values():
        for level in variant["levels"]:
            assert {"width", "accuracy", "macs", "ort_bs1_ms"} <= set(level)
        for peak in variant["peaks"]:
            assert {"round", "agent", "budget_bytes", "planned_bytes", "peak_bytes"} <= set(peak)
    assert result["variants"]["dense_fit"]["refused"] == ["agent-0"]  # the small class is not launched
    levels = result["variants"]["levels"]
    assert levels["refused"] == []
    by_agent = {p["agent"]: p for p in levels["peaks"]}
    assert by_agent["agent-0"]["level"] > 0 and by_agent["agent-2"]["level"] == 0
    assert by_agent["agent-0"]["planned_bytes"] <= small
    assert [lv["width"] for lv in levels["levels"]] == [1.0, 0.75, result["uniform_width"]]
    assert (tmp_path / "budgets.png").stat().st_size > 0
