"""Memory budgets decide the model: four ways to federate devices of three memory classes,
side by side in one invocation on the same partition, seeds and hyperparameters.

    python -m bench.budgets [--quick] [--json]

Ten agents (the yardstick: Fashion-MNIST, Dirichlet(0.5), fedavg_cnn, 1 epoch, batch 64,
SGD 0.05/0.9) whose training-memory budgets (working-set bytes, as agents state them)
fall in three classes, client i in class i mod 3, taken from `models.memory`'s estimate
of the dense model (D16/D64: dense at batch 16/64, nothing frozen):

    small      0.4 x D16          below what the dense model needs at batch 16
    mid        (D16 + D64) / 2    fits the dense model at a smaller batch
    unlimited  no budget

Variants (real coordinator and agent processes, `sim.demo`):
    dense_fit   dense FedAvg with only the agents that fit the dense model (what users of
                other frameworks do today): the small class is not launched
    planner     dense FedAvg, every agent planning within its budget (small batches,
                frozen leading layers, or a decline naming what it needs)
    uniform     everyone trains one width: the widest level the small class fits
    levels      budget-driven width levels 1, 0.75 and the uniform width (first-k slices,
                HeteroFL): each agent trains the widest its budget fits
    levels_importance, levels_rolling
                the same levels sliced by channel importance (FjORD-style) and by rolling
                windows (FedRolex)

Targets: every measured training peak <= 1.10 x its budget; levels' full width at least as
accurate as dense_fit; levels' smallest level in use (the small class's) at least as
accurate as uniform; no agent refused that uniform could serve. `--reuse` takes a
variant's finished run from its folder when it ran with the same arguments. Writes bench/results/budgets[-quick].json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
GRID = (1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125)
PEAK_TARGET = 1.10
VARIANTS = ("dense_fit", "planner", "uniform", "levels", "levels_importance", "levels_rolling")


def class_budgets(model: str, in_channels: int = 1) -> dict[str, int | None]:
    """The three classes' budgets in bytes, from the dense model's estimated working set."""
    from models.memory import estimate_training_memory
    from models.state import build_from_state, seeded_weights
    from models.zoo import default_image_size

    weights = seeded_weights(model, 0, in_channels=in_channels, num_classes=10)
    net = build_from_state(model, weights, in_channels=in_channels, num_classes=10)
    size = default_image_size(in_channels)
    d16, d64 = (estimate_training_memory(net, (in_channels, size, size), b).total for b in (16, 64))
    return {"small": int(0.4 * d16), "mid": int((d16 + d64) / 2), "unlimited": None, "dense_b16": d16, "dense_b64": d64}


def uniform_width(model: str, budget: int, in_channels: int = 1) -> float:
    """The widest width of the grid whose level fits `budget` at the levels' min batch."""
    from coordinator.levels import assign_level, plan_levels
    from coordinator.protocol import FederationCreate
    from models.state import seeded_weights

    cfg = FederationCreate.model_validate({"model": model, "in_channels": in_channels, "levels": {"widths": list(GRID)}})
    levels = plan_levels(cfg, seeded_weights(model, 0, in_channels=in_channels, num_classes=10), 1)
    index = assign_level(levels, budget)
    if index is None:
        raise RuntimeError(f"no width of {GRID} fits {budget} bytes")
    return levels[index].width


def demo_args(name: str, args: argparse.Namespace, budgets: list[int | None], width: float) -> list[str]:
    out = Path(args.out) / name
    argv = ["--out", str(out), "--strategy", "fedavg", "--rounds", str(args.rounds), "--agents", str(args.agents),
            "--model", args.model, "--dataset", args.dataset, "--seed", str(args.seed), "--alpha", str(args.alpha),
            "--quiet", "--agent-budgets", ",".join("none" if b is None else str(b) for b in budgets)]
    if args.eval_samples:
        argv += ["--eval-samples", str(args.eval_samples)]
    if args.max_steps:
        argv += ["--max-steps", str(args.max_steps)]
    if args.no_export:
        argv += ["--no-export"]
    if name == "dense_fit":
        argv += ["--skip-agents", ",".join(str(i) for i, b in enumerate(budgets) if b is not None and b < args.d16)]
    elif name == "uniform":
        argv += ["--levels", str(width)]
    elif name.startswith("levels"):
        argv += ["--levels", level_widths(width), "--level-rule", {"levels": "first"}.get(name, name.removeprefix("levels_"))]
    return argv


def level_widths(uniform: float) -> str:
    """The levels variants' widths: the whole model, 0.75, and what the small class fits."""
    return ",".join(str(w) for w in sorted({1.0, 0.75, uniform}, reverse=True))


def _reused(argv: list[str]) -> dict[str, Any] | None:
    """A variant's results.json when its run had exactly these demo arguments."""
    from sim.demo import build_parser

    path = Path(argv[argv.index("--out") + 1]) / "results.json"
    if not path.exists():
        return None
    results: dict[str, Any] = json.loads(path.read_text())
    want = {k: v for k, v in vars(build_parser().parse_args(argv)).items() if k != "func"}
    return results if results.get("config") == want and "agents" in results else None


def summarise(name: str, results: dict[str, Any], budgets: list[int | None], skipped: list[int]) -> dict[str, Any]:
    """The issue's shape: levels (width, accuracy, macs, ort_bs1_ms), per-agent peaks, refused."""
    names = {a["id"]: a["name"] for a in results["agents"]}
    rows = [r for r in results["rounds"] if not r.get("setup")]
    last, final = rows[-1], results["final"]
    if "levels" in last:
        exports = {e["level"]: e for e in results.get("level_exports", [])}
        levels = [{"width": lv["width"], "accuracy": lv["accuracy"], "macs": lv["macs"], "params": lv["params"],
                   "ort_bs1_ms": _latency(exports.get(lv["level"]), "bs1"),
                   "ort_bs64_ms": _latency(exports.get(lv["level"]), "bs64"), "agents": len(lv["agents"])}
                  for lv in last["levels"]]
    else:
        lat = final.get("ort_latency_ms") or {}
        levels = [{"width": 1.0, "accuracy": final["accuracy"], "macs": final["macs"], "params": final["params"],
                   "ort_bs1_ms": _latency({"ort_latency_ms": lat}, "bs1"),
                   "ort_bs64_ms": _latency({"ort_latency_ms": lat}, "bs64"), "agents": last["participants"]}]
    peaks = [{"round": r["round"], "agent": names.get(a["agent"], a["agent"]), "budget_bytes": a["budget_bytes"],
              "planned_bytes": a["planned_bytes"], "peak_bytes": a["peak_bytes"], "level": a.get("level"),
              "batch_size": a.get("batch_size")} for r in rows for a in r["agents"]]
    trained = {p["agent"] for p in peaks}
    refused = sorted({f"agent-{i}" for i in skipped} | {a["name"] for a in results["agents"] if a["name"] not in trained})
    over = [p["peak_bytes"] / p["budget_bytes"] for p in peaks if p["budget_bytes"]]
    return {"levels": levels, "peaks": peaks, "refused": refused,
            "worst_peak_over_budget": max(over, default=None),
            "mb_per_round": final["mean_mb_per_round"], "wall_seconds": final["wall_seconds"],
            "accuracy_by_round": [r["accuracy"] for r in rows],
            "level_accuracy_by_round": [[lv["accuracy"] for lv in r.get("levels", [])] for r in rows]}


def _latency(report: dict[str, Any] | None, batch: str) -> float | None:
    if not report:
        return None
    lat = report.get("ort_latency_ms") or {}
    entry = lat.get("pruned", lat).get(batch) if isinstance(lat.get("pruned", lat), dict) else None
    if isinstance(entry, dict):
        return entry.get("median") or entry.get("p50")
    return entry


def targets(variants: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    worst = max((v["worst_peak_over_budget"] or 0) for v in variants.values())
    out.append({"target": f"every measured peak <= {PEAK_TARGET} x budget", "value": round(worst, 3),
                "met": worst <= PEAK_TARGET})
    if {"levels", "dense_fit"} <= set(variants):
        a, d = variants["dense_fit"]["levels"][0]["accuracy"], variants["levels"]["levels"][0]["accuracy"]
        out.append({"target": "levels full width >= dense_fit", "value": f"{d:.4f} vs {a:.4f}", "met": d >= a})
    if {"levels", "uniform"} <= set(variants):
        in_use = [lv for lv in variants["levels"]["levels"] if lv["agents"]]
        c, d = variants["uniform"]["levels"][0]["accuracy"], in_use[-1]["accuracy"]
        out.append({"target": f"levels smallest in use (width {in_use[-1]['width']}) >= uniform",
                    "value": f"{d:.4f} vs {c:.4f}", "met": d >= c})
        extra = sorted(set(variants["levels"]["refused"]) - set(variants["uniform"]["refused"]))
        out.append({"target": "no agent refused that uniform serves", "value": extra or "none", "met": not extra})
    return out


def table(result: dict[str, Any]) -> str:
    lines = [f"budgets: small {result['budgets']['small'] / 2**20:.1f} MiB, mid {result['budgets']['mid'] / 2**20:.1f} MiB, "
             f"unlimited (dense needs {result['budgets']['dense_b16'] / 2**20:.1f} MiB at batch 16, "
             f"{result['budgets']['dense_b64'] / 2**20:.1f} MiB at 64); uniform width {result['uniform_width']}", "",
             "| variant | width | accuracy | MMACs | params | ORT bs1 ms | ORT bs64 ms | agents | refused | worst peak/budget "
             "| MB/round |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, v in result["variants"].items():
        for i, lv in enumerate(v["levels"]):
            head = (name, ", ".join(v["refused"]) or "-", f"{v['worst_peak_over_budget']:.2f}" if v["worst_peak_over_budget"]
                    else "-", f"{v['mb_per_round']:.2f}") if i == 0 else ("", "", "", "")
            lines.append(f"| {head[0]} | {lv['width']} | {lv['accuracy']:.4f} | {lv['macs'] / 1e6:.2f} | {lv['params']:,} | "
                         f"{_fmt(lv['ort_bs1_ms'])} | {_fmt(lv['ort_bs64_ms'])} | {lv['agents']} | {head[1]} | {head[2]} | "
                         f"{head[3]} |")
    lines += ["", "| target | value | met |", "|---|---|---|"]
    lines += [f"| {t['target']} | {t['value']} | {'yes' if t['met'] else '**MISSED**'} |" for t in result["targets"]]
    return "\n".join(lines)


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, v in result["variants"].items():
        ax1.plot(range(1, len(v["accuracy_by_round"]) + 1), [
            lv[0] if lv else acc for lv, acc in zip(v["level_accuracy_by_round"], v["accuracy_by_round"], strict=True)
        ], "o-", label=name)
        ax2.scatter([lv["macs"] / 1e6 for lv in v["levels"]], [lv["accuracy"] for lv in v["levels"]], label=name)
    ax1.set(xlabel="round", ylabel="test accuracy (widest level)", title="accuracy per round")
    ax2.set(xlabel="MMACs per sample", ylabel="final test accuracy", title="every level: accuracy vs compute")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from sim.demo import build_parser, run_demo

    classes = class_budgets(args.model)
    args.d16 = classes["dense_b16"]
    kinds = ["small", "mid", "unlimited"]
    budgets = [classes[kinds[i % 3]] for i in range(args.agents)]
    width = uniform_width(args.model, int(classes["small"] or 0))
    print(f"budgets per agent: {[None if b is None else round(b / 2**20, 1) for b in budgets]} MiB; "
          f"uniform width {width}", file=sys.stderr)
    variants: dict[str, dict[str, Any]] = {}
    load_start = list(os.getloadavg())
    for i, name in enumerate(args.variants, 1):
        argv = demo_args(name, args, budgets, width)
        started = time.time()
        print(f"[{i}/{len(args.variants)}] {name}: python -m sim.demo {' '.join(argv)}", file=sys.stderr)
        results = _reused(argv) if args.reuse else None
        if results is None:
            results = run_demo(build_parser().parse_args(argv))
        else:
            print("    reused the finished run in its folder", file=sys.stderr)
        skipped = [i for i, b in enumerate(budgets) if name == "dense_fit" and b is not None and b < args.d16]
        variants[name] = summarise(name, results, budgets, skipped)
        print(f"    done in {time.time() - started:.0f} s: widest accuracy {variants[name]['levels'][0]['accuracy']:.4f}",
              file=sys.stderr)
    return {"command": " ".join(["python -m bench.budgets", *sys.argv[1:]]), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "cpu_count": os.cpu_count(), "load_average": {"start": load_start, "end": list(os.getloadavg())},
            "budgets": classes, "agent_budgets": budgets, "uniform_width": width, "levels": level_widths(width),
            "variants": variants, "targets": targets(variants)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.budgets", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="3 rounds, 2000 test images")
    p.add_argument("--json", action="store_true", help="print the result JSON on stdout")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--agents", type=int, default=10)
    p.add_argument("--model", default="fedavg_cnn")
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-samples", type=int, default=None)
    p.add_argument("--max-steps", type=int, default=None, help="cap local steps (smoke tests)")
    p.add_argument("--no-export", action="store_true", help="skip ONNX exports (no latency columns)")
    p.add_argument("--out", default=None, help="run folders (default runs/budgets)")
    p.add_argument("--results", type=Path, default=None, help="result JSON path")
    p.add_argument("--reuse", action="store_true", help="reuse finished variant runs with the same arguments")
    args = p.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; valid: {', '.join(VARIANTS)}")
    args.rounds = args.rounds or (3 if args.quick else 10)
    if args.quick and args.eval_samples is None:
        args.eval_samples = 2000
    args.out = args.out or str(ROOT / "runs" / ("budgets-quick" if args.quick else "budgets"))
    result = run(args)
    path = args.results or RESULTS / ("budgets-quick.json" if args.quick else "budgets.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, path.with_suffix(".png"))
    print(json.dumps(result, indent=2) if args.json else table(result))
    print(f"wrote {path} and {path.with_suffix('.png')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
