"""bench.mutants' plumbing: the sample, the configuration mutmut reads, the outcome table
from mutmut's .meta records; and (slow) one real mutmut run over a toy selection. Never the
mutation score."""

from __future__ import annotations

import configparser
import json
from pathlib import Path

import pytest

from bench import mutants

NAMES = {"strategies/a.py": [f"strategies.a.x_f__mutmut_{i}" for i in range(1, 31)],
         "strategies/b.py": [f"strategies.b.x_g__mutmut_{i}" for i in range(1, 11)],
         "sparse_kernels/robust.py": ["sparse_kernels.robust.x_h__mutmut_1"]}


def test_sample_is_seeded_stratified_and_covers_every_file() -> None:
    picked = mutants.sample(NAMES, 8, seed=1)
    assert picked == mutants.sample(NAMES, 8, seed=1) != mutants.sample(NAMES, 8, seed=2)
    by_file = {p: sum(m in ms for m in picked) for p, ms in NAMES.items()}
    assert by_file == {"strategies/a.py": 6, "strategies/b.py": 2, "sparse_kernels/robust.py": 1}
    assert len(set(picked)) == len(picked)
    assert mutants.sample(NAMES, None, seed=0) == [m for ms in NAMES.values() for m in ms]


def test_setup_cfg_lists_one_item_per_line_and_deselects_process_tests() -> None:
    cfg = configparser.ConfigParser()
    cfg.read_string(mutants.setup_cfg())
    section = cfg["mutmut"]
    assert [v for v in section["only_mutate"].split("\n") if v] == list(mutants.MUTATE)
    args = [v for v in section["pytest_add_cli_args"].split("\n") if v]
    assert args[args.index("-k") + 1] == mutants.DESELECT and "not slow" in args
    assert section["process_isolation"] == "forkserver"


def test_outcomes_and_table_from_meta_records(tmp_path: Path) -> None:
    meta = tmp_path / "mutants" / "strategies" / "a.py.meta"
    meta.parent.mkdir(parents=True)
    codes = {"strategies.a.x_f__mutmut_1": 1, "strategies.a.x_f__mutmut_2": 0, "strategies.a.x_f__mutmut_3": 33,
             "strategies.a.x_f__mutmut_4": -24, "strategies.a.x_f__mutmut_5": None}
    meta.write_text(json.dumps({"exit_code_by_key": codes}))
    names = mutants.mutant_names(tmp_path)
    assert names == {"strategies/a.py": list(codes)}
    result = mutants.outcomes(tmp_path, list(codes))
    assert list(result.values()) == ["killed", "survived", "no tests", "timeout", "not run"]
    [row] = mutants.summarise(names, {k: v for k, v in result.items() if v != "not run"})
    assert row == {"file": "strategies/a.py", "mutants": 5, "tested": 4, "killed": 1, "survived": 1,
                   "no_tests": 1, "other": 1, "score": 0.5}
    assert mutants.table([row]).splitlines()[-1] == "total | 5 | 4 | 1 | 1 | 1 | 1 | 0.5"


@pytest.mark.slow
def test_a_real_mutmut_run_over_fedavg(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_path = tmp_path / "m.json"
    assert mutants.main(["--quick", "--sample", "3", "--jobs", "1", "--json", "--results", str(out_path),
                         "--tests", "tests/strategies/test_fedavg.py", "--mutate", "strategies/fedavg.py"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert json.loads(out_path.read_text()) == out
    [row] = out["rows"]
    assert row["file"] == "strategies/fedavg.py" and row["tested"] == 3 and row["mutants"] > 10
    assert set(out["outcomes"].values()) <= {"killed", "survived", "no tests", "timeout"}
