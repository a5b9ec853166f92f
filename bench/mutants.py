"""Mutation testing of the strategy and aggregation code with mutmut: how many mutants
of the server/agent halves and the aggregation maths the fast tests kill.

    python -m bench.mutants [--quick] [--sample N] [--jobs J] [--json]

mutmut (pinned in constraints.txt, `dev` extra) runs in a throw-away copy of the working
tree (its `mutants/` folder and a generated setup.cfg never touch the checkout). It mutates
strategies/, coordinator/aggregation.py, sparse_kernels/aggregate.py and
sparse_kernels/robust.py, and runs, per mutant, only the selected tests that call the
mutated function (its own coverage map). The tests: tests/strategies (the mechanism tests
included), the sparse aggregation / robust / slice tests, the coordinator's policy and
in-process aggregation-oracle tests; not the ones that start coordinator processes (a
mutant lives in the forked test process only) or need PostgreSQL.

--quick tests a seeded sample of the mutants (stratified by file; about 10 minutes on a
loaded 2-core machine); without it, every mutant (hours). Rows per mutated file: mutants
generated, tested, killed, survived, no covering test, timeout/other. The JSON keeps
every survivor with its diff, for triage (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"

MUTATE = ("strategies/*", "coordinator/aggregation.py", "sparse_kernels/aggregate.py", "sparse_kernels/robust.py")
SOURCE_PATHS = ("strategies/", "coordinator/", "sparse_kernels/")
ALSO_COPY = ("models/", "pruning/", "edge_agent/", "sim/")  # imported by the code under test
TESTS = (
    "tests/strategies",
    "tests/sparse_kernels/test_sk_aggregate.py",
    "tests/sparse_kernels/test_sk_robust.py",
    "tests/sparse_kernels/test_sk_slices.py",
    "tests/coordinator/test_policies.py",
    "tests/coordinator/test_structured.py",  # StructuredPruning's server half, in-process
    "tests/coordinator/test_aggregation_oracle.py",
)
# process-level tests (a coordinator subprocess runs unmutated code) and PostgreSQL ones
DESELECT = "not sigkill and not restart_refold and not postgresql"
NO_MATCH = "fedslim_no_such_mutant*"
# mutmut's exit codes → the outcome we report (mutmut.stats.status_by_exit_code, grouped)
OUTCOME = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests",
           36: "timeout", 24: "timeout", -24: "timeout", 152: "timeout", 255: "timeout"}


def setup_cfg(tests: tuple[str, ...] = TESTS, mutate: tuple[str, ...] = MUTATE, deselect: str = DESELECT) -> str:
    """mutmut's configuration for the copy (one list item per line, as setup.cfg wants)."""
    def items(values: tuple[str, ...] | list[str]) -> str:
        return "".join(f"\n    {v}" for v in values)

    args = ["-p", "no:cacheprovider", "-m", "not slow", "-k", deselect, "-x"]
    return ("[mutmut]\n"
            f"source_paths={items(SOURCE_PATHS)}\n"
            f"only_mutate={items(mutate)}\n"
            f"also_copy={items(ALSO_COPY)}\n"
            f"pytest_add_cli_args={items(args)}\n"
            f"pytest_add_cli_args_test_selection={items(tests)}\n"
            # torch and the in-process TestClient are not fork-safe once used: fork from a
            # server that has only imported them
            "process_isolation=forkserver\n")


def copy_tree(src: Path, dst: Path) -> None:
    """Tracked and untracked-but-not-ignored files of `src` (no venv, no build output)."""
    files = subprocess.run(["git", "-C", str(src), "ls-files", "-co", "--exclude-standard", "-z"],
                           check=True, capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        if (src / rel).is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / rel, dst / rel)


def mutant_names(work: Path) -> dict[str, list[str]]:
    """Mutated source file → its mutants' names, from mutmut's per-file .meta records."""
    out = {}
    for meta in sorted((work / "mutants").rglob("*.py.meta")):
        rel = meta.relative_to(work / "mutants").as_posix().removesuffix(".meta")
        out[rel] = list(json.loads(meta.read_text())["exit_code_by_key"])
    return out


def sample(names: dict[str, list[str]], n: int | None, seed: int) -> list[str]:
    """A seeded sample of `n` mutants, spread over the files in proportion to their counts
    (every file with mutants gets at least one); None: all of them."""
    everything = [m for ms in names.values() for m in ms]
    if n is None or n >= len(everything):
        return everything
    rng = random.Random(seed)
    total = len(everything)
    picked: list[str] = []
    for ms in names.values():
        if ms:
            picked += rng.sample(ms, min(len(ms), max(1, round(n * len(ms) / total))))
    return sorted(picked)


def outcomes(work: Path, tested: list[str]) -> dict[str, str]:
    """Mutant name → killed | survived | no tests | timeout | other:<exit code>."""
    codes: dict[str, int | None] = {}
    for meta in (work / "mutants").rglob("*.py.meta"):
        codes.update(json.loads(meta.read_text())["exit_code_by_key"])
    out = {}
    for m in tested:
        code = codes.get(m)
        out[m] = "not run" if code is None else OUTCOME.get(code, f"other:{code}")
    return out


def summarise(names: dict[str, list[str]], result: dict[str, str]) -> list[dict[str, Any]]:
    rows = []
    for path, ms in names.items():
        got = Counter(result[m] for m in ms if m in result)
        tested = sum(got.values())
        rows.append({"file": path, "mutants": len(ms), "tested": tested, "killed": got["killed"],
                     "survived": got["survived"], "no_tests": got["no tests"],
                     "other": tested - got["killed"] - got["survived"] - got["no tests"],
                     "score": round(got["killed"] / max(got["killed"] + got["survived"], 1), 3)})
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    cols = ("file", "mutants", "tested", "killed", "survived", "no_tests", "other", "score")
    total = {c: sum(r[c] for r in rows) for c in cols[1:-1]}
    total.update(file="total", score=round(total["killed"] / max(total["killed"] + total["survived"], 1), 3))
    lines = [" | ".join(cols), " | ".join("---" for _ in cols)]
    lines += [" | ".join(str(r[c]) for c in cols) for r in [*rows, total]]
    return "\n".join(lines)


def _mutmut(work: Path, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mutmut", *args], cwd=work, capture_output=True, text=True,
                          timeout=timeout, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})


def run(*, n: int | None, seed: int, jobs: int, work: Path, tests: tuple[str, ...] = TESTS,
        mutate: tuple[str, ...] = MUTATE, timeout: float = 3600.0) -> dict[str, Any]:
    copy_tree(ROOT, work)
    (work / "setup.cfg").write_text(setup_cfg(tests, mutate))
    t0 = time.monotonic()
    # A filter that matches nothing: mutmut generates every mutant and maps the tests that
    # call each function, then stops before testing any; the sample is drawn from that list.
    gen = _mutmut(work, "run", "--max-children", str(jobs), NO_MATCH, timeout=timeout)
    names = mutant_names(work)
    if not names:
        raise RuntimeError(f"mutmut generated no mutants:\n{gen.stdout[-3000:]}\n{gen.stderr[-3000:]}")
    picked = sample(names, n, seed)
    proc = _mutmut(work, "run", "--max-children", str(jobs), *picked, timeout=timeout)
    result = outcomes(work, picked)
    if all(v == "not run" for v in result.values()):
        raise RuntimeError(f"mutmut ran no mutant:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    survivors = {}
    for m in sorted(k for k, v in result.items() if v == "survived"):
        shown = _mutmut(work, "show", m, timeout=120).stdout
        survivors[m] = shown[shown.find("---"):].strip() if "---" in shown else shown.strip()
    return {"tool": "mutmut", "sample": n, "seed": seed, "jobs": jobs, "seconds": round(time.monotonic() - t0, 1),
            "tests": list(tests), "deselect": DESELECT, "rows": summarise(names, result),
            "outcomes": result, "survivors": survivors}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.mutants", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a seeded sample of --sample mutants (~10 min)")
    ap.add_argument("--sample", type=int, default=40, help="mutants tested with --quick (default 40)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=2, help="mutants tested at once")
    ap.add_argument("--json", action="store_true", help="print the JSON instead of a table")
    ap.add_argument("--results", type=Path, help="where the JSON goes (default bench/results/mutants[-quick].json)")
    ap.add_argument("--keep", type=Path, help="run in this (empty) folder and keep it, instead of a temporary one")
    ap.add_argument("--tests", nargs="+", default=list(TESTS), help=argparse.SUPPRESS)  # the plumbing test's
    ap.add_argument("--mutate", nargs="+", default=list(MUTATE), help=argparse.SUPPRESS)  # toy selection
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fedslim-mutants-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        out = run(n=args.sample if args.quick else None, seed=args.seed, jobs=args.jobs, work=work,
                  tests=tuple(args.tests), mutate=tuple(args.mutate))
    path = args.results or RESULTS / ("mutants-quick.json" if args.quick else "mutants.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    if args.json:
        print(json.dumps(out, ensure_ascii=False))
    else:
        print(table(out["rows"]))
        print(f"\n{sum(r['tested'] for r in out['rows'])} mutants tested in {out['seconds']} s; "
              f"survivors with diffs in {os.path.relpath(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
