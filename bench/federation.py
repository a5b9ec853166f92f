"""Strategies side by side on the same federation: same data split, seeds and rounds.

    python -m bench.federation [--strategies fedavg,structured,...] [--agents 10 --rounds 10]

Runs `fedslim-demo` once per strategy (each a real coordinator + agent processes), then
prints one table, writes bench/results/federation.json and bench/results/federation.png.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"


def summarize(name: str, results: dict[str, Any], dense_macs: int | None) -> dict[str, Any]:
    final = results["final"]
    rounds = [r for r in results["rounds"] if not r.get("setup")]  # FedTiny's selection rounds train nothing
    setup_mb = sum(r["bytes_up"] + r["bytes_down"] for r in results["rounds"] if r.get("setup")) / 1e6
    up = sum(r["bytes_up"] for r in rounds) / len(rounds)
    down = sum(r["bytes_down"] for r in rounds) / len(rounds)
    macs = final.get("pruned_macs") or final.get("macs")
    return {
        "strategy": name, "accuracy": final["accuracy"], "best_accuracy": max(r["accuracy"] for r in rounds),
        "mb_up_per_round": up / 1e6, "mb_down_per_round": down / 1e6, "mb_per_round": (up + down) / 1e6,
        "final_macs": macs, "macs_fraction": macs / dense_macs if dense_macs and macs else None,
        "final_params": final.get("params"), "density": rounds[-1].get("density"),
        "agent_peak_mb": max(r.get("agent_peak_mb") or 0 for r in rounds),
        "wall_seconds": final["wall_seconds"], "setup_rounds": len(results["rounds"]) - len(rounds),
        "setup_mb": setup_mb,
        "ort_latency_ms": final.get("ort_latency_ms"),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--strategies", default="fedavg,sparse,structured,fedtiny,feddip,autoflip,dynamic")
    p.add_argument("--agents", type=int, default=10)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/bench-federation")
    p.add_argument("--extra", default="", help="extra fedslim-demo flags, space-separated")
    args = p.parse_args(argv)
    rows: list[dict[str, Any]] = []
    runs: dict[str, Any] = {}
    for name in args.strategies.split(","):
        out = Path(args.out) / name
        cmd = [sys.executable, "-m", "sim.demo", "--out", str(out), "--strategy", name, "--agents", str(args.agents),
               "--rounds", str(args.rounds), "--alpha", str(args.alpha), "--seed", str(args.seed), "--quiet", *args.extra.split()]
        print(f"==> {name}: {' '.join(cmd[3:])}", flush=True)
        subprocess.run(cmd, check=True)
        runs[name] = json.loads((out / "results.json").read_text())
    dense_macs = next((r["final"].get("dense_macs") for r in runs.values() if r["final"].get("dense_macs")), None)
    rows = [summarize(n, r, dense_macs) for n, r in runs.items()]
    header = (f"{'strategy':<11} {'acc':>6} {'best':>6} {'MB/round':>9} {'up':>7} {'down':>7} {'MACs %':>7} "
              f"{'params':>8} {'density':>7} {'peak MB':>8} {'s':>6}")
    print(header + "\n" + "-" * len(header))
    for r in rows:
        frac = f"{100 * r['macs_fraction']:.1f}" if r["macs_fraction"] else "-"
        print(f"{r['strategy']:<11} {r['accuracy']:>6.4f} {r['best_accuracy']:>6.4f} {r['mb_per_round']:>9.2f} "
              f"{r['mb_up_per_round']:>7.2f} {r['mb_down_per_round']:>7.2f} {frac:>7} {r['final_params'] or 0:>8} "
              f"{r['density'] or 1.0:>7.2f} {r['agent_peak_mb']:>8.1f} {r['wall_seconds']:>6.0f}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "federation.json").write_text(json.dumps({"args": vars(args), "rows": rows,
                                                          "rounds": {n: r["rounds"] for n, r in runs.items()}}, indent=2))
    _plot(runs, RESULTS / "federation.png")
    return 0


def _plot(runs: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in runs.items():
        setup = sum(1 for x in r["rounds"] if x.get("setup"))  # FedTiny's selection: round 0 and below
        rounds = [x["round"] - setup for x in r["rounds"]]
        ax1.plot(rounds, [x["accuracy"] for x in r["rounds"]], "o-", label=name)
        ax2.semilogy(rounds, [(x["bytes_up"] + x["bytes_down"]) / 1e6 for x in r["rounds"]], "o-", label=name)
    ax1.set(xlabel="round", ylabel="test accuracy", title="accuracy")
    ax2.set(xlabel="round", ylabel="MB per round (up + down)", title="bytes on the wire")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
