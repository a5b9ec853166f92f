"""fedslim beside Flower, in one invocation, on the identical federation.

    python -m bench.compare [--quick] [--json]

For each α and seed: Flower FedAvg (its simulation runtime on Ray, in .venv-flower: see
bench.flower_peer) and `fedslim-sim` with every strategy preset, all on the same Dirichlet
partition (asserted: Flower's index arrays, written by its own process, hash equal to the
ones fedslim's engine trained on), the same model, seeded initial weights, local epochs,
batch, SGD lr/momentum and clients per round. Every run is a fresh process whose process
tree's RSS is sampled for the peak. Prints a table of mean ± std over seeds (or, with
--json, one JSON row per run), writes bench/results/compare.json and three plots.

Full mode: 10 clients, all sampled, 10 rounds, 1 local epoch, 3 seeds, α = 0.5 and 0.1,
both sections (main, scale).
--quick: the main section only; 2 rounds capped at 20 local steps; 3 seeds of Flower and
fedslim FedAvg (the rows the targets compare), 1 seed of every other strategy
(--strategy-seeds); evaluation on the first 2,000 test images; both α.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.flower_peer import REPO, flower_python, setup_venv

__all__ = ["main", "run_compare", "summarize", "summarize_run"]

RESULTS = Path(__file__).parent / "results"
STRATEGIES = "fedavg,sparse,structured,fedtiny,feddip,autoflip,dynamic"
TARGET_ACC = 0.85  # "rounds to 85 %"


class PeakRSS:
    """Peak summed RSS of a process and all its descendants (Ray workers included),
    sampled every 0.2 s."""

    def __init__(self, pid: int) -> None:
        import psutil

        self._proc, self.peak, self._stop = psutil.Process(pid), 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.wait(0.2):
            try:
                procs = [self._proc, *self._proc.children(recursive=True)]
                total = 0
                for p in procs:
                    with contextlib.suppress(psutil.Error):  # exited between listing and reading
                        total += p.memory_info().rss
                self.peak = max(self.peak, total)
            except psutil.Error:
                return

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak / 2**20


def _run(cmd: list[str], log: Path, env: dict[str, str] | None = None, *, reuse: Path | None = None) -> float:
    """Run `cmd` to completion, its output to `log`; returns its peak RSS in MB, also kept
    in peak.json beside the log. With `reuse` (the run's result file): a run that completed
    before (its result and peak.json exist) is not run again."""
    peak_file = log.with_name("peak.json")
    if reuse is not None and reuse.exists() and peak_file.exists():
        return float(json.loads(peak_file.read_text())["peak_rss_mb"])
    peak_file.unlink(missing_ok=True)
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        meter = PeakRSS(proc.pid)
        rc = proc.wait()
        peak = meter.stop()
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} … exited with {rc}; see {log}:\n{log.read_text()[-1500:]}")
    peak_file.write_text(json.dumps({"peak_rss_mb": peak}))
    return peak


def summarize_run(system: str, strategy: str, alpha: float, seed: int, rounds: list[dict[str, Any]], peak_mb: float,
                  final: dict[str, Any]) -> dict[str, Any]:
    """One run's row: accuracy, bytes and time per training round (setup rounds left
    out of the means, kept in the total), from its results.json rounds and final."""
    training = [r for r in rounds if not r.get("setup")]  # FedTiny's selection rounds train nothing
    acc = [r["accuracy"] for r in training]
    up = [r["bytes_up"] / 1e6 for r in training]
    down = [r["bytes_down"] / 1e6 for r in training]
    total_mb = sum((r["bytes_up"] + r["bytes_down"]) / 1e6 for r in rounds)
    reached = next((i + 1 for i, a in enumerate(acc) if a >= TARGET_ACC), None)
    latency = final.get("ort_latency_ms")
    return {
        "system": system, "strategy": strategy, "alpha": alpha, "seed": seed,
        "final_accuracy": acc[-1], "best_accuracy": max(acc), "rounds_to_85": reached,
        "mb_up_per_round": statistics.fmean(up), "mb_down_per_round": statistics.fmean(down),
        "mb_per_round": statistics.fmean(u + d for u, d in zip(up, down, strict=True)), "mb_total": total_mb,
        "seconds_per_round": statistics.fmean(r["seconds"] for r in training), "peak_rss_mb": peak_mb,
        # without round 1, which carries one-off costs (Flower: starting its Ray actors)
        "seconds_per_round_steady": statistics.fmean(r["seconds"] for r in training[1:]) if len(training) > 1 else None,
        "macs": final.get("pruned_macs") or final.get("macs"), "dense_macs": final.get("dense_macs"),
        "ort_latency_ms": latency["pruned"]["bs1"] if latency else None,  # ORT, batch 1, the exported model
        "accuracy_per_round": acc, "cumulative_mb": list(np.cumsum([(r["bytes_up"] + r["bytes_down"]) / 1e6
                                                                    for r in training]).round(3)),
    }


def run_fedslim(args: argparse.Namespace, strategy: str, alpha: float, seed: int, out: Path) -> tuple[dict, dict]:
    cmd = [sys.executable, "-m", "sim.cli", "--out", str(out), "--strategy", strategy, "--clients", str(args.clients),
           "--per-round", str(args.per_round), "--rounds", str(args.rounds), "--alpha", str(alpha), "--seed", str(seed),
           "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
           "--dataset", args.dataset, "--backend", args.backend, "--quiet"]
    for flag, value in (("--max-steps", args.max_steps), ("--eval-samples", args.eval_samples),
                        ("--data-dir", args.data_dir)):
        if value:
            cmd += [flag, str(value)]
    if args.no_export:
        cmd.append("--no-export")
    out.mkdir(parents=True, exist_ok=True)
    peak = _run(cmd, out / "run.log", reuse=out / "results.json" if args.reuse else None)
    results = json.loads((out / "results.json").read_text())
    row = summarize_run("fedslim", strategy, alpha, seed, results["rounds"], peak, results["final"])
    return {**row, "clients": args.clients, "per_round": args.per_round, "backend": args.backend}, results


def run_flower(args: argparse.Namespace, alpha: float, seed: int, out: Path) -> tuple[dict, Path]:
    out.mkdir(parents=True, exist_ok=True)
    cfg = {"dataset": args.dataset, "data_dir": args.data_dir, "in_channels": 3 if args.dataset == "cifar10" else 1,
           "model": "fedavg_cnn", "clients": args.clients, "per_round": args.per_round, "rounds": args.rounds,
           "partition": f"dirichlet:{alpha}", "seed": seed, "epochs": args.epochs, "batch_size": args.batch_size,
           "lr": args.lr, "momentum": 0.9, "max_steps": args.max_steps, "eval_samples": args.eval_samples,
           "cores": os.cpu_count()}
    (out / "config.json").write_text(json.dumps(cfg))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    python = flower_python() if args.flower_python is None else Path(args.flower_python)
    peak = _run([str(python), "-m", "bench.flower_peer", "--config", str(out / "config.json"),
                 "--out", str(out / "flower.json")], out / "run.log", env=env,
                reuse=out / "flower.json" if args.reuse else None)
    result = json.loads((out / "flower.json").read_text())
    row = summarize_run("flower", "fedavg", alpha, seed, result["rounds"], peak, {})
    return {**row, "clients": args.clients, "per_round": args.per_round, "backend": "ray"}, out / "flower.npz"


def check_same_partition(flower_npz: Path, fedslim_results: dict[str, Any]) -> None:
    """Flower's index arrays (from its own process) against the digest of the arrays
    fedslim's engine trained on; raises AssertionError on any difference."""
    from sim.engine import partition_digest

    with np.load(flower_npz, allow_pickle=False) as z:
        parts = [z[f"client_{i}"] for i in range(len(z.files))]
    theirs, ours = partition_digest(parts), fedslim_results["simulation"]["partition_sha256"]
    assert theirs == ours, f"Flower trained on another partition ({theirs[:12]} != {ours[:12]})"


def run_compare(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    out = Path(args.out)
    for alpha in args.alphas:
        for seed in range(args.seeds):
            base = out / f"a{alpha}-s{seed}"
            flower_row, npz = run_flower(args, alpha, seed, base / "flower")
            rows.append(flower_row)
            for strategy in args.strategies:
                if strategy != "fedavg" and seed >= args.strategy_seeds:
                    continue
                row, results = run_fedslim(args, strategy, alpha, seed, base / strategy)
                if strategy == "fedavg":
                    check_same_partition(npz, results)
                    # Flower exports nothing; its model is the dense CNN, whose export is fedavg's
                    latency = results["final"].get("ort_latency_ms")
                    flower_row["macs"] = results["final"].get("dense_macs")
                    flower_row["ort_latency_ms"] = latency["dense"]["bs1"] if latency else None
                rows.append(row)
                _say(args, f"{strategy} α={alpha} seed={seed}: acc {row['final_accuracy']:.4f}, "
                           f"{row['seconds_per_round']:.1f} s/round (Flower {flower_row['seconds_per_round']:.1f})")
    return rows


# (clients, per round, fedslim backends): 100 clients against Flower's simulation at
# 100; 1,000 at the same 10 per round (memory must stay flat in the client count); 1,000
# at 10 % sampled (the scale target)
SCALE = ((100, 10, ("local", "ray")), (1000, 10, ("local",)), (1000, 100, ("local",)))


def run_scale(args: argparse.Namespace) -> list[dict[str, Any]]:
    """FedAvg only, first α, seed 0, no export: wall time and peak memory against the
    number of virtual clients, beside Flower's simulation of 100 clients."""
    def sub(**kw: Any) -> argparse.Namespace:
        return argparse.Namespace(**{**vars(args), **kw})

    out, alpha = Path(args.out) / "scale", args.alphas[0]
    flower, npz = run_flower(sub(clients=100, per_round=10), alpha, 0, out / "flower-100")
    rows = [flower]
    for clients, per_round, backends in SCALE:
        for backend in backends:
            row, results = run_fedslim(sub(clients=clients, per_round=per_round, backend=backend, no_export=True),
                                       "fedavg", alpha, 0, out / f"fedslim-{clients}-{per_round}-{backend}")
            if clients == 100:
                check_same_partition(npz, results)
            rows.append(row)
            _say(args, f"scale: fedslim {clients} clients, {per_round}/round, {backend}: {row['seconds_per_round']:.1f} "
                       f"s/round (Flower {flower['seconds_per_round']:.1f}), peak {row['peak_rss_mb']:.0f} MB")
    return rows


def scale_verdicts(rows: list[dict[str, Any]]) -> list[str]:
    """The scale targets, each met or missed with the figure that decides it."""
    def find(system: str, clients: int, per_round: int, backend: str = "local") -> dict[str, Any]:
        return next(r for r in rows if r["system"] == system and r["clients"] == clients and r["per_round"] == per_round
                    and (system == "flower" or r["backend"] == backend))

    flower, small, large = find("flower", 100, 10), find("fedslim", 100, 10), find("fedslim", 1000, 10)
    out = []
    for backend in ("local", "ray"):
        ratio = find("fedslim", 100, 10, backend)["seconds_per_round"] / flower["seconds_per_round"]
        out.append(f"100 clients, {backend}: {ratio:.2f}x Flower's s/round (target <= 1.5x): "
                   + ("met" if ratio <= 1.5 else "MISSED"))
    growth = large["peak_rss_mb"] / small["peak_rss_mb"]
    out.append(f"peak memory 1000 vs 100 clients at 10/round: {growth:.2f}x (target: flat, <= 1.10x): "
               + ("met" if growth <= 1.10 else "MISSED"))
    tenth = find("fedslim", 1000, 100)
    out.append(f"1000 clients, 10 % sampled: {tenth['seconds_per_round']:.1f} s/round, peak {tenth['peak_rss_mb']:.0f} MB "
               f"(final accuracy {tenth['final_accuracy']:.4f})")
    return out


def format_scale(rows: list[dict[str, Any]]) -> str:
    head = (f"{'system':<8} {'clients':>7} {'/round':>6} {'backend':<7} {'final acc':>9} {'s/round':>8} {'peak MB':>8} "
            f"{'MB/round':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['system']:<8} {r['clients']:>7} {r['per_round']:>6} {r['backend']:<7} {r['final_accuracy']:>9.4f} "
                     f"{r['seconds_per_round']:>8.2f} {r['peak_rss_mb']:>8.0f} {r['mb_per_round']:>9.2f}")
    return "\n".join(lines + scale_verdicts(rows))


def _say(args: argparse.Namespace, text: str) -> None:
    print(text, file=sys.stderr if args.json else sys.stdout, flush=True)


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean ± std over seeds per (system, strategy, α), with the Flower ratios of the same
    invocation and the targets marked."""
    groups: dict[tuple[str, str, float], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["system"], r["strategy"], r["alpha"]), []).append(r)
    out = []
    for (system, strategy, alpha), rs in groups.items():
        s: dict[str, Any] = {"system": system, "strategy": strategy, "alpha": alpha, "seeds": len(rs)}
        for key in ("final_accuracy", "best_accuracy", "mb_up_per_round", "mb_down_per_round", "mb_per_round",
                    "mb_total", "seconds_per_round", "peak_rss_mb"):
            s[key], s[key + "_std"] = _mean_std([float(r[key]) for r in rs])
        steady = [r["seconds_per_round_steady"] for r in rs if r.get("seconds_per_round_steady") is not None]
        s["seconds_per_round_steady"] = statistics.fmean(steady) if steady else None
        reached = [r["rounds_to_85"] for r in rs if r["rounds_to_85"] is not None]
        s["rounds_to_85"] = statistics.fmean(reached) if len(reached) == len(rs) else None
        s["macs"], s["ort_latency_ms"] = rs[0]["macs"], rs[0]["ort_latency_ms"]
        out.append(s)
    for s in out:
        flower = next((f for f in out if f["system"] == "flower" and f["alpha"] == s["alpha"]), None)
        if flower:
            s["time_ratio_vs_flower"] = s["seconds_per_round"] / flower["seconds_per_round"]
            if s["seconds_per_round_steady"] and flower["seconds_per_round_steady"]:
                s["steady_time_ratio_vs_flower"] = s["seconds_per_round_steady"] / flower["seconds_per_round_steady"]
            s["accuracy_gap_vs_flower"] = s["final_accuracy"] - flower["final_accuracy"]
        if s["system"] == "fedslim" and s["strategy"] == "fedavg" and flower:
            missed = []
            if s["accuracy_gap_vs_flower"] < -0.01:
                missed.append(f"accuracy {100 * s['accuracy_gap_vs_flower']:+.2f} pt vs Flower (target ≥ -1 pt)")
            if s["time_ratio_vs_flower"] > 1.0:
                missed.append(f"{s['time_ratio_vs_flower']:.2f}x Flower's s/round (target ≤ 1x)")
            if s.get("steady_time_ratio_vs_flower", 0) > 1.0:
                missed.append(f"{s['steady_time_ratio_vs_flower']:.2f}x Flower's s/round after round 1 (target ≤ 1x)")
            s["targets"] = "met" if not missed else "MISSED: " + "; ".join(missed)
    return out


def format_table(summary: list[dict[str, Any]]) -> str:
    head = (f"{'system':<8} {'strategy':<10} {'α':>4} {'final acc':>15} {'best acc':>15} {'r→85%':>5} "
            f"{'MB up/r':>8} {'MB dn/r':>8} {'MB tot':>8} {'s/round':>12} {'x Flower':>8} {'steady x':>8} {'peak MB':>8} "
            f"{'MMACs':>7} {'ORT ms':>7}")
    lines = [head, "-" * len(head)]
    for s in summary:
        lat = s["ort_latency_ms"]
        lines.append(
            f"{s['system']:<8} {s['strategy']:<10} {s['alpha']:>4} "
            f"{s['final_accuracy']:>8.4f}±{s['final_accuracy_std']:.4f} {s['best_accuracy']:>8.4f}±{s['best_accuracy_std']:.4f} "
            f"{s['rounds_to_85'] if s['rounds_to_85'] is not None else '-':>5} {s['mb_up_per_round']:>8.2f} "
            f"{s['mb_down_per_round']:>8.2f} {s['mb_total']:>8.1f} "
            f"{s['seconds_per_round']:>6.2f}±{s['seconds_per_round_std']:<5.2f} "
            f"{s.get('time_ratio_vs_flower', float('nan')):>8.2f} {s.get('steady_time_ratio_vs_flower', float('nan')):>8.2f} "
            f"{s['peak_rss_mb']:>8.0f} "
            f"{(s['macs'] or 0) / 1e6:>7.2f} {f'{lat:.3f}' if lat is not None else '-':>7}")
    for s in summary:
        if "targets" in s:
            lines.append(f"targets α={s['alpha']} (fedslim FedAvg vs Flower FedAvg): {s['targets']}")
    return "\n".join(lines)


def _plot(rows: list[dict[str, Any]], results: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alphas = sorted({r["alpha"] for r in rows}, reverse=True)
    label = lambda r: "Flower FedAvg" if r["system"] == "flower" else f"fedslim {r['strategy']}"  # noqa: E731
    paths = []
    for name, x_of, xlabel in (("round", lambda r: range(1, len(r["accuracy_per_round"]) + 1), "round"),
                               ("bytes", lambda r: r["cumulative_mb"], "cumulative MB (up + down)")):
        fig, axes = plt.subplots(1, len(alphas), figsize=(6 * len(alphas), 4), squeeze=False)
        for ax, alpha in zip(axes[0], alphas, strict=True):
            for r in (r for r in rows if r["alpha"] == alpha and r["seed"] == 0):
                ax.plot(list(x_of(r)), r["accuracy_per_round"], "o-", ms=3, label=label(r))
            ax.set(xlabel=xlabel, ylabel="test accuracy", title=f"α = {alpha} (seed 0)")
            if name == "bytes":
                ax.set_xscale("log")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(results / f"compare_accuracy_vs_{name}.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    points = [(r["macs"] / 1e6, r["final_accuracy"], label(r)) for r in rows if r["macs"]]
    for lab in sorted({p[2] for p in points}):
        xs = [p for p in points if p[2] == lab]
        ax.scatter([p[0] for p in xs], [p[1] for p in xs], label=lab, s=18)
    front, best = [], -1.0  # Pareto front: fewer MACs and higher accuracy
    for x, y, _ in sorted(points):
        if y > best:
            front.append((x, y))
            best = y
    if front:
        ax.step([p[0] for p in front], [p[1] for p in front], "k--", where="post", lw=1, label="Pareto front")
    ax.set(xlabel="exported MMACs per image", ylabel="final test accuracy", title="accuracy vs MACs (every run)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(results / "compare_accuracy_vs_macs.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="main section, 2 rounds × 20 local steps, 3 seeds of Flower/FedAvg, 1 of the rest")
    p.add_argument("--sections", default=None,
                   help="main: Flower beside every strategy; scale: wall time and memory against the client count")
    p.add_argument("--json", action="store_true", help="print the per-run rows as one JSON list")
    p.add_argument("--strategies", default=STRATEGIES)
    p.add_argument("--alphas", default="0.5,0.1")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..n-1 of Flower and fedslim FedAvg")
    p.add_argument("--strategy-seeds", type=int, default=None,
                   help="seeds of every other strategy (default: --seeds; --quick 1)")
    p.add_argument("--rounds", type=int, default=None, help="default 10; --quick 2")
    p.add_argument("--max-steps", type=int, default=None, help="cap local steps (default none; --quick 20)")
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--per-round", type=int, default=None, help="default: every client")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--dataset", default="fashion_mnist", choices=["fashion_mnist", "cifar10", "synthetic"])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--eval-samples", type=int, default=None)
    p.add_argument("--backend", default="local", choices=["local", "ray"], help="fedslim-sim's backend")
    p.add_argument("--no-export", action="store_true", help="skip the ONNX export (no MACs/latency columns)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--reuse", action="store_true", help="keep runs under --out that completed before (resume)")
    p.add_argument("--out", default="runs/bench-compare")
    p.add_argument("--results", type=Path, default=RESULTS, help="where compare.json and the PNGs go")
    p.add_argument("--flower-python", default=None, help="python of a Flower venv (default: .venv-flower, made if absent)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.strategy_seeds = min(args.seeds, args.strategy_seeds or (1 if args.quick else args.seeds))
    args.sections = args.sections or ("main" if args.quick else "main,scale")
    args.eval_samples = args.eval_samples or (2000 if args.quick else None)
    args.rounds = args.rounds or (2 if args.quick else 10)
    args.max_steps = args.max_steps or (20 if args.quick else None)
    args.per_round = args.per_round or args.clients
    args.strategies = [s for s in args.strategies.split(",") if s]
    args.alphas = [float(a) for a in args.alphas.split(",") if a]
    if "fedavg" not in args.strategies:
        args.strategies.insert(0, "fedavg")  # the partition check and the targets need it
    if args.flower_python is None:
        setup_venv()  # idempotent; the first time it installs flwr into .venv-flower
    sections = set(args.sections.split(","))
    started = time.time()
    scale = run_scale(args) if "scale" in sections else []
    rows = run_compare(args) if "main" in sections else []
    summary = summarize(rows)
    args.results.mkdir(parents=True, exist_ok=True)
    plots = [] if args.no_plot or not rows else [str(p) for p in _plot(rows, args.results)]
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    meta = {"config": config, "wall_seconds": time.time() - started}
    if rows:  # each section its own file, so one can be re-run without losing the other
        (args.results / "compare.json").write_text(json.dumps(
            {**meta, "rows": rows, "summary": summary, "plots": plots}, indent=2))
    if scale:
        (args.results / "compare_scale.json").write_text(json.dumps(
            {**meta, "rows": scale, "targets": scale_verdicts(scale)}, indent=2))
    if args.json:
        print(json.dumps(rows + [{**r, "section": "scale"} for r in scale]))
    else:
        print(format_table(summary) if rows else "")
        print(format_scale(scale) if scale else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
