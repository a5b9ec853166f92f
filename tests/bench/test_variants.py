"""bench.variants: the seed-for-seed comparison (pure) and one real toy run per variant.

Mutations these kill: the difference taken against another variant than the reference, or
between different seeds; a variant's overrides not reaching the run (the toy run's adaptive
upload sends the same bytes as the preset)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import variants


def _row(name: str, seed: int, acc: float, mb: float = 1.0) -> dict:
    return {"variant": name, "seed": seed, "final_accuracy": acc, "last3_accuracy": acc, "mb_up_per_round": mb / 2,
            "mb_down_per_round": mb / 2, "mb_per_round": mb, "macs": 1e6, "density": None}


def test_differences_are_seed_for_seed_against_the_first_variant() -> None:
    rows = [_row("ref", 0, 0.80), _row("ref", 1, 0.90), _row("b", 0, 0.81), _row("b", 1, 0.93), _row("c", 1, 0.85)]
    by = {s["variant"]: s for s in variants.compare_to_reference(rows, ["ref", "b", "c"])}
    assert by["ref"]["diff_vs_reference"] == 0
    assert by["b"]["diff_vs_reference"] == pytest.approx(0.02)  # (+0.01, +0.03)
    assert by["b"]["diff_std"] == pytest.approx(0.0141421, rel=1e-4)
    assert by["c"]["diff_vs_reference"] == pytest.approx(-0.05) and by["c"]["diff_std"] is None  # seed 1 only
    assert by["b"]["mean_accuracy"] == pytest.approx(0.87)
    assert "+2.00 pt" in variants.format_table(list(by.values()), "ref")


def test_every_group_names_known_variants() -> None:
    assert all(v in variants.VARIANTS for group in variants.GROUPS.values() for v in group)


def test_toy_run_applies_each_variants_overrides(tmp_path: Path) -> None:
    rc = variants.main(["--variants", "structured,structured-e08", "--seeds", "1", "--clients", "3", "--rounds", "1",
                        "--max-steps", "2", "--eval-samples", "200", "--dataset", "synthetic",
                        "--out", str(tmp_path / "runs"), "--results", str(tmp_path / "results")])
    saved = json.loads((tmp_path / "results" / "variants-structured+structured-e08.json").read_text())
    assert rc == 0 and (tmp_path / "results" / "variants-structured+structured-e08.png").exists()
    ref, energy = saved["summary"]
    assert (ref["variant"], energy["variant"]) == ("structured", "structured-e08")
    assert energy["mb_up_per_round"] < ref["mb_up_per_round"]  # 80 % of the energy takes fewer than 10 % here
    args = json.loads((tmp_path / "runs" / "structured-e08-s0" / "results.json").read_text())["config"]
    assert (args["strategy"], json.loads(args["config"])) == ("structured", {"training": {"upload_energy": 0.8}})
