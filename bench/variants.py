"""Variants of a strategy on the yardstick, seed for seed, side by side (issue 13).

    python -m bench.variants [--group G] [--variants a,b,...]
                             [--seeds 3] [--quick] [--reuse] [--out DIR]

Each variant is a strategy preset plus overrides (strategy params, federation config); each
runs through `fedslim-sim` on the yardstick (Fashion-MNIST, Dirichlet 0.5 over 10 clients,
all sampled, 10 rounds of 1 local epoch), one fresh process per run. The engine is
deterministic for a seed, so every variant of a seed trains from the same partition and
initial weights and the per-seed difference against the group's reference (its first
variant) is the comparison; the table gives its mean and the spread of the seeds. Writes
bench/results/variants-<group>.json and a PNG of accuracy against bytes per round. Groups:
feddip-exchange and fedtiny-exchange (the preset against every exchange exact: dense fp32
both ways), energy (adaptive upload/broadcast density), feddip-masks (regrowth against the
authors' re-applied mask).
--quick: 2 rounds of at most 20 local steps, seed 0, 2,000 test images (a smoke run).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.compare import summarize_run
from bench.flower_peer import REPO

__all__ = ["GROUPS", "VARIANTS", "compare_to_reference", "format_table", "main"]

RESULTS = Path(__file__).parent / "results"

# every exchange exact: dense fp32 both ways, the method as its paper runs it
_EXACT = {"download_density": 1.0, "download_values": "fp32",
          "training": {"upload_density": 1.0, "upload_values": "fp32"}}

# FedDIP's uploads ranked per tensor (the preset ranks them over the whole model)
_PER_TENSOR = {"training": {"upload_scope": "per_tensor"}}
# ... and broadcasts of the top 3 % in fp16: the preset before 2026-12-02
_D3FP16 = {**_PER_TENSOR, "download_density": 0.03, "download_values": "fp16"}

# the paper's FedDIP: the preset's server momentum off
_NO_MOMENTUM = {"server_momentum": 0.0}

# name -> (preset, strategy params over the preset's, config merged last)
VARIANTS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "fedavg": ("fedavg", {}, {}),
    # FedDIP without server momentum (the preset before the stop of 2026-12-02 04:30)
    "feddip": ("feddip", _NO_MOMENTUM, {}),
    "feddip-exact": ("feddip", _NO_MOMENTUM, _EXACT),
    "feddip-pertensor": ("feddip", _NO_MOMENTUM, _PER_TENSOR),
    "feddip-d3fp16": ("feddip", _NO_MOMENTUM, _D3FP16),
    # ... with the authors' code path: the previous mask re-applied before the global prune
    "feddip-d3fp16-reapply": ("feddip", {**_NO_MOMENTUM, "reapply_mask": True}, _D3FP16),
    # ... with server momentum 0.6 (FedAvgM): the preset, and the exact exchange with it
    "feddip-m06": ("feddip", {}, {}),
    "feddip-exact-m06": ("feddip", {}, _EXACT),
    "fedtiny": ("fedtiny", {}, {}),
    "fedtiny-exact": ("fedtiny", {}, _EXACT),
    "structured": ("structured", {}, {}),
    # adaptive upload density: the fewest coordinates carrying 80 % of the change's energy,
    # at most the preset's 10 %
    "structured-e08": ("structured", {}, {"training": {"upload_energy": 0.8}}),
    # ... 90 % of it both ways, uploads at most 20 %, broadcasts at most 30 %
    "structured-e09both": ("structured", {}, {"training": {"upload_energy": 0.9, "upload_density": 0.2},
                                              "download_energy": 0.9, "download_density": 0.3}),
}
# the first variant of a group is its reference
GROUPS: dict[str, list[str]] = {
    "feddip-exchange": ["feddip-exact", "feddip-d3fp16", "feddip-pertensor", "feddip"],
    "fedtiny-exchange": ["fedtiny-exact", "fedtiny"],
    "energy": ["structured", "structured-e08", "structured-e09both"],
    "feddip-masks": ["feddip-d3fp16", "feddip-d3fp16-reapply"],
    "feddip-momentum": ["feddip-exact", "feddip", "feddip-m06", "feddip-exact-m06"],
    "structured-vs-fedavg": ["fedavg", "structured"],
}


def run_variant(name: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    preset, params, config = VARIANTS[name]
    out = Path(args.out) / f"{name}-s{seed}"
    result = out / "results.json"
    if not (args.reuse and result.exists()):
        cmd = [sys.executable, "-m", "sim.cli", "--out", str(out), "--strategy", preset, "--clients", str(args.clients),
               "--per-round", str(args.clients), "--rounds", str(args.rounds), "--alpha", "0.5", "--seed", str(seed),
               "--dataset", args.dataset, "--no-export", "--quiet", "--strategy-params", json.dumps(params),
               "--config", json.dumps(config), "--threads", str(args.threads)]
        for flag, value in (("--max-steps", args.max_steps), ("--eval-samples", args.eval_samples)):
            if value:
                cmd += [flag, str(value)]
        out.mkdir(parents=True, exist_ok=True)
        start = time.monotonic()
        with open(out.with_suffix(".log"), "w") as log:
            rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        if rc != 0:
            raise RuntimeError(f"{name} seed {seed} exited with {rc}; see {out.with_suffix('.log')}")
        print(f"  {name} seed {seed}: {time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)
    results = json.loads(result.read_text())
    row = summarize_run("fedslim", preset, 0.5, seed, results["rounds"], 0.0, results["final"])
    acc = row["accuracy_per_round"]
    return {**row, "variant": name, "last3_accuracy": statistics.fmean(acc[-3:]),
            "density": results["final"].get("density")}


def compare_to_reference(rows: list[dict[str, Any]], order: list[str]) -> list[dict[str, Any]]:
    """Per variant: mean over seeds, and the seed-by-seed difference against the first
    variant in `order` (only the seeds both ran)."""
    by = {(r["variant"], r["seed"]): r for r in rows}
    ref = order[0]
    out = []
    for name in order:
        rs = sorted((r for r in rows if r["variant"] == name), key=lambda r: r["seed"])
        if not rs:
            continue
        diffs = [r["final_accuracy"] - by[(ref, r["seed"])]["final_accuracy"] for r in rs if (ref, r["seed"]) in by]
        out.append({
            "variant": name, "seeds": [r["seed"] for r in rs], "final_accuracy": [r["final_accuracy"] for r in rs],
            "mean_accuracy": statistics.fmean(r["final_accuracy"] for r in rs),
            "mean_last3_accuracy": statistics.fmean(r["last3_accuracy"] for r in rs),
            "diff_vs_reference": statistics.fmean(diffs) if diffs else None,
            "diff_std": statistics.stdev(diffs) if len(diffs) > 1 else None,
            "mb_up_per_round": statistics.fmean(r["mb_up_per_round"] for r in rs),
            "mb_down_per_round": statistics.fmean(r["mb_down_per_round"] for r in rs),
            "mb_per_round": statistics.fmean(r["mb_per_round"] for r in rs),
            "macs": rs[0]["macs"], "density": rs[0]["density"],
        })
    return out


def format_table(summary: list[dict[str, Any]], reference: str) -> str:
    head = (f"{'variant':<22} {'final acc per seed':<26} {'mean':>7} {'last 3':>7} {'vs ' + reference:>22} "
            f"{'MB up/r':>8} {'MB dn/r':>8} {'MB/r':>6} {'MMACs':>6} {'density':>7}")
    lines = [head, "-" * len(head)]
    for s in summary:
        diff = s["diff_vs_reference"]
        d = "-" if diff is None else f"{100 * diff:+.2f} pt" + (f" ± {100 * s['diff_std']:.2f}" if s["diff_std"] else "")
        lines.append(f"{s['variant']:<22} {' / '.join(f'{a:.4f}' for a in s['final_accuracy']):<26} "
                     f"{s['mean_accuracy']:>7.4f} {s['mean_last3_accuracy']:>7.4f} {d:>22} "
                     f"{s['mb_up_per_round']:>8.2f} {s['mb_down_per_round']:>8.2f} {s['mb_per_round']:>6.2f} "
                     f"{(s['macs'] or 0) / 1e6:>6.2f} {s['density'] if s['density'] is None else round(s['density'], 3)!s:>7}")
    return "\n".join(lines)


def _plot(summary: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for s in summary:
        ax.scatter([s["mb_per_round"]] * len(s["final_accuracy"]), s["final_accuracy"], alpha=0.4)
        ax.errorbar(s["mb_per_round"], s["mean_accuracy"], fmt="o", color="black", ms=3)
        ax.annotate(s["variant"], (s["mb_per_round"], s["mean_accuracy"]), textcoords="offset points",
                    xytext=(5, 5), fontsize=8)
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels overlap on a log axis
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.set_xlabel("MB per round (up + down, all agents)")
    ax.set_ylabel("final test accuracy (each seed; black: mean)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.variants", description=__doc__.split("\n\n")[0])
    p.add_argument("--group", default="fedtiny-exchange", choices=sorted(GROUPS))
    p.add_argument("--variants", default=None, help="comma-separated names instead of the group's (first: reference)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--reuse", action="store_true", help="keep runs under --out that completed before (resume)")
    p.add_argument("--out", default="runs/bench-variants")
    # one torch thread per run: two invocations side by side then use two cores without
    # oversubscribing them (two 2-thread runs on 2 cores spin-wait, several times slower)
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    # below: the yardstick's size, changed only for smoke tests
    p.add_argument("--clients", type=int, default=10, help="clients, all sampled every round")
    p.add_argument("--rounds", type=int, default=None, help="default 10; --quick 2")
    p.add_argument("--max-steps", type=int, default=None, help="cap local steps (default none; --quick 20)")
    p.add_argument("--eval-samples", type=int, default=None, help="test images (default all; --quick 2000)")
    p.add_argument("--dataset", default="fashion_mnist", choices=["fashion_mnist", "synthetic"])
    p.add_argument("--results", type=Path, default=RESULTS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    order = args.variants.split(",") if args.variants else GROUPS[args.group]
    unknown = [v for v in order if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    if args.quick:
        args.rounds, args.max_steps, args.eval_samples = args.rounds or 2, args.max_steps or 20, args.eval_samples or 2000
    args.rounds = args.rounds or 10
    seeds = [0] if args.quick else list(range(args.seeds))
    rows = []
    for seed in seeds:
        for name in order:
            rows.append(run_variant(name, seed, args))
    summary = compare_to_reference(rows, order)
    print(format_table(summary, order[0]))
    label = args.variants.replace(",", "+") if args.variants else args.group
    stem = f"variants-{label}" + ("-quick" if args.quick else "")
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"{stem}.json").write_text(json.dumps(
        {"order": order, "seeds": seeds, "quick": args.quick, "summary": summary, "runs": rows}, indent=1))
    _plot(summary, args.results / f"{stem}.png", f"{label}: {len(seeds)} seed(s), yardstick")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
