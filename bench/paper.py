"""The four methods at their papers' scale, on the simulation engine, each beside dense
FedAvg run under the very same settings (same partition, seeds, model and local loop).

    python -m bench.paper [--quick] [--json] [--only feddip,autoflip] [--reuse]

Each setting is its paper's client count, sampling, local epochs and partition (see
SETTINGS), reduced only in rounds (and, for the ResNets, local steps) as far as two cores
force; the reduction is written next to the result. Each row gives the paper's claim, our
figures for the method and for FedAvg (final, best, and the mean of the last 5 rounds,
which the checks use), and whether the claim's *direction* is reproduced
by the check stated in the row (a number in a paper on other hardware and hundreds of
rounds is not reproduced by ten rounds here; the direction can be).

Writes bench/results/paper.json (paper-quick.json with --quick) and paper.png (accuracy
per round, method vs FedAvg, one panel per setting). Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.compare import _run, summarize_run

__all__ = ["SETTINGS", "Setting", "main"]

RESULTS = Path(__file__).parent / "results"
Row = dict[str, Any]


@dataclass(frozen=True)
class Setting:
    id: str
    paper: str
    claim: str
    method: str  # strategy preset
    args: list[str]  # sim.cli flags shared by the method and its FedAvg baseline
    method_args: list[str] = field(default_factory=list)
    reduced: str = ""  # how this differs from the paper's setting, and why
    check: str = ""  # the direction tested, in words
    holds: Callable[[Row, Row], bool] = lambda method, fedavg: False
    quick_args: list[str] = field(default_factory=list)  # replaces flags for --quick


def _acc(row: Row) -> float:
    """What the checks compare: the mean test accuracy of the last rounds (LAST_ROUNDS).
    With a few clients sampled per round from a non-IID split the last round alone swings
    by several points (FedDIP's setting: ±5), in either run."""
    return float(row["mean_last"])


LAST_ROUNDS = 5


# both FedTiny settings: ResNet-20 (BN, so adaptive BN selection runs), short rounds
_FEDTINY_ARGS = ["--model", "resnet20", "--clients", "10", "--per-round", "5", "--epochs", "1", "--max-steps", "40",
                 "--rounds", "10", "--alpha", "0.5", "--eval-samples", "2000"]

SETTINGS = [
    Setting(
        id="feddip", paper="FedDIP (Long et al., ICDM 2023)",
        claim="extreme sparsity (e.g. 95 %) at accuracy similar to dense, with controlled communication",
        method="feddip",
        args=["--model", "lenet5", "--clients", "50", "--per-round", "5", "--epochs", "5", "--batch-size", "128",
              "--lr", "0.1", "--alpha", "0.5", "--rounds", "30"],
        method_args=["--strategy-params", json.dumps({"sT": 0.95, "reconfigure_every": 5})],
        reduced="30 rounds (the paper runs to convergence, ~1000); constant lr 0.1 (the paper decays "
                "0.998^t: < 6 % over 30 rounds); LeNet-5 on Fashion-MNIST, Dirichlet 0.5",
        check="FedDIP at 95 % sparsity within 2 points of FedAvg, with fewer bytes per round",
        holds=lambda m, f: _acc(m) >= _acc(f) - 0.02 and m["mb_per_round"] < f["mb_per_round"],
        quick_args=["--rounds", "6", "--epochs", "1"],
    ),
    Setting(
        id="autoflip", paper="AutoFLIP (Internò et al., 2024)",
        claim="−48.8 % compute and −35.5 % communication, better accuracy under strong non-IID splits",
        method="autoflip",
        args=["--model", "fedavg_cnn", "--clients", "20", "--per-round", "5", "--epochs", "5", "--rounds", "8",
              "--config", json.dumps({"data": {"partition": "shards:2"}})],
        reduced="8 rounds (paper: 200); 2 classes per client (shards), 20 clients, 25 % per round, 5 local "
                "epochs as the paper; exploration: its scouts in round 1",
        check="AutoFLIP sends fewer bytes per round than FedAvg at no lower accuracy (≤ 1 point)",
        holds=lambda m, f: m["mb_per_round"] < f["mb_per_round"] and _acc(m) >= _acc(f) - 0.01,
        quick_args=["--rounds", "3", "--epochs", "1"],
    ),
    Setting(
        id="fedtiny-10", paper="FedTiny (Huang et al., ICDCS 2023)",
        claim="+2.61 % accuracy vs the state of the art, −95.91 % compute, strongest at ≈ 1 % density",
        method="fedtiny",
        args=_FEDTINY_ARGS,
        method_args=["--strategy-params", json.dumps({"density": 0.1})],
        reduced="ResNet-20 (BN: adaptive BN selection runs) on Fashion-MNIST; 10 rounds of ≤ 40 local steps "
                "(paper: 5 local epochs, T_end 100–300)",
        check="FedTiny at 10 % density within 5 points of dense FedAvg",
        holds=lambda m, f: _acc(m) >= _acc(f) - 0.05,
        quick_args=["--rounds", "3", "--max-steps", "10"],
    ),
    Setting(
        id="fedtiny-1", paper="FedTiny (Huang et al., ICDCS 2023)",
        claim="strongest at extreme sparsity (≈ 1 % density)",
        method="fedtiny",
        args=_FEDTINY_ARGS,
        method_args=["--strategy-params", json.dumps({"density": 0.01})],
        reduced="as fedtiny-10, at 1 % density",
        check="FedTiny at 1 % density learns (accuracy ≥ 2× chance) and loses less than 15 points to dense",
        holds=lambda m, f: _acc(m) >= 0.2 and _acc(m) >= _acc(f) - 0.15,
        quick_args=["--rounds", "3", "--max-steps", "10"],
    ),
    Setting(
        id="dynamic", paper="Adaptive dynamic pruning (Yu et al., 2021)",
        claim="ResNet-32: inference FLOPs −50 % at the same accuracy, communication −57 %, less over-fitting "
              "on non-IID data",
        method="dynamic",
        # Exported at the last round, the static model collapses (0.3585 gated → 0.0985): its
        # BNs only saw the gated network. `finetune_rounds: 2` is the fix to measure, but that
        # run aborted natively in round 9 (heap corruption in backward while agents trained
        # the export; docs/BENCHMARKS.md), so the setting stays as measured.
        args=["--model", "resnet32", "--clients", "10", "--per-round", "5", "--epochs", "1", "--max-steps", "40",
              "--rounds", "10", "--alpha", "0.1", "--lr", "0.01", "--eval-samples", "2000"],
        reduced="ResNet-32 on Fashion-MNIST (CIFAR-10 cannot be downloaded here; `--dataset cifar10 --data-dir` "
                "runs it where the batches are), Dirichlet 0.1, lr 0.01, batch 64 as the paper; 10 rounds of "
                "≤ 40 local steps; each residual branch's last BN starts at γ = 0 (the strategy's "
                "`zero_residual`: the specified gates diverge ResNet-32 at init without it)",
        check="the static export at ≤ 50 % of the MACs within 2 points of FedAvg, with ≤ 43 % of its bytes",
        holds=lambda m, f: ((m.get("macs") or 1) <= 0.5 * (f.get("macs") or 1) + 1
                            and _acc(m) >= _acc(f) - 0.02
                            and m["mb_per_round"] <= 0.43 * f["mb_per_round"]),
        quick_args=["--rounds", "3", "--max-steps", "10"],
    ),
]


def _flags(setting: Setting, quick: bool) -> list[str]:
    """The setting's flags, with --quick's replacements put in place."""
    flags = list(setting.args)
    if quick:
        for i in range(0, len(setting.quick_args), 2):
            flag, value = setting.quick_args[i], setting.quick_args[i + 1]
            if flag in flags:
                flags[flags.index(flag) + 1] = value
            else:
                flags += [flag, value]
    return flags


def run_one(setting: Setting, strategy: str, extra: list[str], out: Path, args: argparse.Namespace) -> Row:
    cmd = [sys.executable, "-m", "sim.cli", "--out", str(out), "--strategy", strategy, "--seed", str(args.seed),
           "--quiet", *_flags(setting, args.quick), *extra]
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    peak = _run(cmd, out / "run.log", reuse=out / "results.json" if args.reuse else None)
    results = json.loads((out / "results.json").read_text())
    row = summarize_run("fedslim", strategy, 0.0, args.seed, results["rounds"], peak, results["final"])
    last = row["accuracy_per_round"][-LAST_ROUNDS:]
    row.update(density=results["final"].get("density"), wall_s=round(time.monotonic() - started, 1),
               mean_last=sum(last) / len(last))
    return row


def run_setting(setting: Setting, args: argparse.Namespace, root: Path) -> Row:
    say = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    say(f"[{setting.id}] {setting.method} …")
    method = run_one(setting, setting.method, setting.method_args, root / setting.id / setting.method, args)
    say(f"[{setting.id}] {setting.method}: acc {method['final_accuracy']:.4f}, {method['mb_per_round']:.2f} MB/round; "
        "fedavg …")
    fedavg = run_one(setting, "fedavg", [], root / setting.id / "fedavg", args)
    say(f"[{setting.id}] fedavg: acc {fedavg['final_accuracy']:.4f}, {fedavg['mb_per_round']:.2f} MB/round")
    keep = ("final_accuracy", "best_accuracy", "mean_last", "mb_per_round", "macs", "density", "seconds_per_round",
            "peak_rss_mb", "accuracy_per_round", "wall_s")
    return {
        "id": setting.id, "paper": setting.paper, "claim": setting.claim, "check": setting.check,
        "reduced": setting.reduced, "flags": _flags(setting, args.quick) + setting.method_args,
        "method": {k: method.get(k) for k in keep}, "fedavg": {k: fedavg.get(k) for k in keep},
        "direction_reproduced": bool(setting.holds(method, fedavg)),
    }


def print_table(rows: list[Row]) -> None:
    head = (f"{'setting':<11} {'method acc':>10} {'FedAvg acc':>10} {'last-5 m/F':>13} {'MB/rd':>13} {'MACs':>13} "
            f"{'density':>7}  reproduced")
    print(head)
    print("-" * len(head))
    for r in rows:
        m, f = r["method"], r["fedavg"]
        macs = f"{(m['macs'] or 0) / 1e6:.1f}/{(f['macs'] or 0) / 1e6:.1f}M"
        last = f"{m['mean_last']:.4f}/{f['mean_last']:.4f}"
        print(f"{r['id']:<11} {m['final_accuracy']:>10.4f} {f['final_accuracy']:>10.4f} {last:>13} "
              f"{m['mb_per_round']:>6.2f}/{f['mb_per_round']:<6.2f} {macs:>13} {m['density'] or 1.0:>7.3f}  "
              f"{'yes' if r['direction_reproduced'] else 'NO'}: {r['check']}")


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rows), figsize=(4 * len(rows), 3.5), squeeze=False)
    for ax, r in zip(axes[0], rows, strict=True):
        for key, style in (("method", "-o"), ("fedavg", "--s")):
            acc = r[key]["accuracy_per_round"]
            ax.plot(range(1, len(acc) + 1), acc, style, ms=3, label=r["id"].split("-")[0] if key == "method" else "FedAvg")
        ax.set(title=r["id"], xlabel="round", ylabel="test accuracy")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _merged(path: Path, rows: list[Row]) -> list[Row]:
    """This invocation's rows, plus the rows of settings it did not run kept from an
    earlier `path` (so `--only` adds to the record instead of erasing it), in SETTINGS order."""
    by_id = {r["id"]: r for r in (json.loads(path.read_text()) if path.exists() else [])}
    by_id.update({r["id"]: r for r in rows})
    order = [s.id for s in SETTINGS]
    return sorted(by_id.values(), key=lambda r: order.index(r["id"]) if r["id"] in order else len(order))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.paper", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a few rounds of each, to check the harness")
    p.add_argument("--json", action="store_true", help="print the rows as JSON on stdout")
    p.add_argument("--only", default=None, help="comma-separated setting ids")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reuse", action="store_true", help="keep runs that completed before")
    p.add_argument("--out", default=None, help="run folders (default bench/results/paper[-quick]/)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    wanted = set(args.only.split(",")) if args.only else None
    settings = [s for s in SETTINGS if wanted is None or s.id in wanted]
    if wanted and len(settings) != len(wanted):
        p.error(f"unknown setting in --only; valid: {', '.join(s.id for s in SETTINGS)}")
    name = "paper-quick" if args.quick else "paper"
    root = Path(args.out) if args.out else RESULTS / name
    rows = [run_setting(s, args, root) for s in settings]
    RESULTS.mkdir(exist_ok=True)
    rows = _merged(RESULTS / f"{name}.json", rows)
    (RESULTS / f"{name}.json").write_text(json.dumps(rows, indent=2))
    plot(rows, RESULTS / f"{name}.png")
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
