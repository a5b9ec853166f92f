"""Training memory: the estimate against the measured peak, and training within a budget.

    python -m bench.memory [--quick] [--json]

Every configuration runs in a fresh interpreter (`python -m bench.memory --one CONFIG`), so
no peak or freed heap carries over from the one before. The worker fixes the allocator with
`configure_allocator()` as the agent does at start-up (allocator "fixed"; "default" leaves
glibc's dynamic mmap threshold as it comes), warms up on the same model (one batch-2 step
and a batch-2 estimate: oneDNN, thread pools, torch's decompositions), then estimates
(`estimate_training_memory`) or plans (`plan_training` within a budget), and finally
measures with `PeakMemoryMeter` the peak rise of RSS over the idle baseline while it
builds the model, makes the optimizer and trains a few steps on random data.

Tables:
  estimate   estimate vs measured peak rise per (model, batch, optimizer, allocator)
  structured the structured-pruned fedavg_cnn (conv 16/24, fc 248) vs dense, batch 64
  planner    per budget: the plan (batch, frozen layers, estimate) or BudgetExceeded, and
             the measured peak of training with that plan, as a fraction of the budget
  strategies per (strategy, budget): `edge_agent.local.run_task` on fedavg_cnn with the
             strategy's own hooks (masks, gates, error feedback, gradient top-k): planned
             bytes, measured peak, final batch and re-plans, as the agent reports them.
             `--strategies feddip,fedtiny --budgets 12MB,16MB` picks the rows.
Writes bench/results/memory.json (memory-quick.json with --quick). MB = 10^6 bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edge_agent.budget import (
    BudgetExceeded,
    PeakMemoryMeter,
    configure_allocator,
    estimate_training_memory,
    parse_size,
    plan_training,
)
from models.state import Weights, build_from_state, to_numpy_state
from models.structure import reshape_to, structure_of
from models.zoo import build_model

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
MB = 1_000_000
STEPS = 3
STRUCTURED = "fedavg_cnn/structured"
# The structure the federation benchmark's structured strategy ends at (target_macs 0.22,
# round_to 8): conv 16 and 24 channels, fc 248 units; 161,578 parameters.
STRUCTURED_SHAPES = {
    "features.0.weight": (16, 1, 5, 5), "features.0.bias": (16,),
    "features.3.weight": (24, 16, 5, 5), "features.3.bias": (24,),
    "classifier.1.weight": (248, 24 * 5 * 5), "classifier.1.bias": (248,),
    "classifier.3.weight": (10, 248), "classifier.3.bias": (10,),
}
# (model, batch, optimizer): the estimate table.
ESTIMATES = (
    ("resnet20", 64, "sgd_momentum"),
    ("resnet32", 64, "adam"),
    ("vgg11_bn", 32, "sgd_momentum"),
    ("fedavg_cnn", 128, "adam"),
    ("fedavg_cnn", 64, "sgd_momentum"),
    (STRUCTURED, 64, "sgd_momentum"),
)
BUDGETS = ("2MB", "4MB", "8MB", "16MB", "32MB")
TARGET_STRUCTURED_RATIO = 0.60  # structured peak >= 40 % below dense at the same batch
TARGET_BUDGET_RATIO = 1.10  # measured peak <= 1.10 x budget
STRATEGIES = ("feddip", "fedtiny", "dynamic", "autoflip")
STRATEGY_BUDGETS = ("12MB", "16MB", "24MB")
STRATEGY_STEPS = 8  # run_task's max_steps: past the re-check after the first steps


# --------------------------------------------------------------------------- worker


def input_shape(model: str) -> tuple[int, int, int]:
    return (1, 28, 28) if model.startswith("fedavg_cnn") else (3, 32, 32)


def structured_weights() -> Weights:
    dense = build_model("fedavg_cnn")
    return to_numpy_state(reshape_to(dense, {**structure_of(dense), **STRUCTURED_SHAPES}))


def model_builder(model: str) -> Callable[[], nn.Module]:
    """A function that builds `model` afresh; the structured one from its weights, as agents do."""
    if model == STRUCTURED:
        weights = structured_weights()
        return lambda: build_from_state("fedavg_cnn", weights, in_channels=1, num_classes=10)
    channels = input_shape(model)[0]
    return lambda: build_model(model, in_channels=channels)


def make_optimizer(name: str, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params)
    return torch.optim.SGD(params, lr=0.01, momentum=0.9 if name == "sgd_momentum" else 0.0)


def train_steps(model: nn.Module, opt: torch.optim.Optimizer, batch: int, shape: tuple[int, ...],
                steps: int) -> None:
    """`steps` steps on random data, in the order of models.training.train_epochs (the
    forward runs while the previous step's gradients are still alive)."""
    model.train()
    for _ in range(steps):
        x, y = torch.randn(batch, *shape), torch.randint(0, 10, (batch,))
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def strategy_task(strategy: str, budget: str, steps: int) -> tuple[Any, Weights]:
    """A mid-federation task of `strategy` on fedavg_cnn and its base weights: FedDIP's ERK
    mask at round 2, FedTiny's train phase at density 0.1 growing 10 % of the kept count,
    dynamic's gated model, AutoFLIP's pruned phase (half the weights zeroed)."""
    import numpy as np

    from coordinator.protocol import StrategySpec, Task, TrainingConfig
    from strategies import build_strategy
    from strategies.base import RoundContext

    seeded = to_numpy_state(build_model("fedavg_cnn"))
    ctx = RoundContext(0, 10, "fedavg_cnn", 1, 10, 28, 1)
    rng = np.random.default_rng(0)
    if strategy in ("feddip", "dynamic"):
        server = build_strategy(strategy, {})
        weights = server.initial_weights(seeded, ctx)
        params = server.task_params(2, weights, {"total_rounds": np.array([10])})
    else:
        from strategies.fedtiny.ops import fedtiny_weight_names, grow_counts

        names = fedtiny_weight_names(build_model("fedavg_cnn"))
        density = 0.1 if strategy == "fedtiny" else 0.5
        weights = {k: (v * (rng.random(v.shape) < density)).astype(np.float32) if k in names else v
                   for k, v in seeded.items()}
        if strategy == "fedtiny":
            masks = {n: torch.from_numpy(weights[n] != 0) for n in names}
            params = {"phase": "train", "grow": grow_counts(masks, 0.1)}
        else:
            params = {"pruned": True}
    task = Task(federation_id="bench", round=2, model="fedavg_cnn", in_channels=1, num_classes=10,
                image_size=28, model_version=1,
                training=TrainingConfig(batch_size=64, lr=0.01, momentum=0.9, max_steps=steps),
                strategy=StrategySpec(name=strategy, params=params), deadline=time.time() + 3600,
                memory_budget_mb=parse_size(budget) / 2**20)
    return task, weights


def measure_strategy(config: dict[str, Any]) -> dict[str, Any]:
    """run_task of one strategy at one budget in this (fresh) process, after one warm-up
    task (a long-lived agent's later rounds: one-off costs are in the idle baseline)."""
    from edge_agent.local import run_task
    from models import make_synthetic
    from sparse_kernels import ErrorFeedback

    fixed = configure_allocator()
    torch.manual_seed(0)
    task, weights = strategy_task(config["strategy"], config["budget"], config["steps"])
    data = make_synthetic(512, channels=1, image_size=28)
    row = {**config, "model": "fedavg_cnn", "allocator_fixed": fixed, "threads": torch.get_num_threads(),
           "budget_bytes": parse_size(config["budget"])}
    start = time.perf_counter()
    try:
        run_task(task.model_copy(update={"training": task.training.model_copy(update={"max_steps": 1})}),
                 weights, data, ErrorFeedback())
        start = time.perf_counter()
        result = run_task(task, weights, data, ErrorFeedback())
    except Exception as exc:  # noqa: BLE001 - a row that says why (BudgetExceeded, a hook's failure)
        return {**row, "error": f"{type(exc).__name__}: {exc}"[:300]}
    report = result.report
    return {
        **row, "batch": report.batch_size,
        "estimate_bytes": report.planned_memory_bytes, "measured_bytes": report.peak_memory_bytes,
        "baseline_bytes": report.baseline_memory_bytes, "replans": getattr(result, "replans", None),
        "seconds": round(time.perf_counter() - start, 2),
    }


def measure(config: dict[str, Any]) -> dict[str, Any]:
    """Run one configuration in this (fresh) process; returns its result row."""
    if config["table"] == "strategies":
        return measure_strategy(config)
    fixed = config["allocator"] == "fixed" and configure_allocator()
    torch.manual_seed(0)
    name, optimizer, shape = config["model"], config["optimizer"], input_shape(config["model"])
    build = model_builder(name)
    warm = build()
    train_steps(warm, make_optimizer(optimizer, warm.parameters()), 2, shape, 1)
    estimate_training_memory(warm, shape, 2)  # the first meta pass imports decompositions
    row: dict[str, Any] = {**config, "allocator_fixed": fixed, "threads": torch.get_num_threads()}
    plan = None
    if "budget" in config:
        row["budget_bytes"] = budget = parse_size(config["budget"])
        try:
            plan = plan_training(warm, shape, budget, optimizer=optimizer)
        except BudgetExceeded as exc:
            return {**row, "exceeded": str(exc), "needed_bytes": exc.needed_bytes}
        row.update(batch=plan.batch_size, frozen=list(plan.frozen))
        estimate = plan.estimate
    else:
        estimate = estimate_training_memory(warm, shape, config["batch"], optimizer=optimizer)
    del warm
    start = time.perf_counter()
    with PeakMemoryMeter() as meter:
        model = build()
        if plan is not None:
            plan.apply(model)
        opt = make_optimizer(optimizer, [p for p in model.parameters() if p.requires_grad])
        train_steps(model, opt, row["batch"], shape, config["steps"])
    return {
        **row,
        "params": sum(p.numel() for p in model.parameters()),
        "estimate_bytes": estimate.total,
        "estimate": estimate.describe(),
        "measured_bytes": meter.peak_rise_bytes,
        "baseline_bytes": meter.baseline_bytes,
        "meter": meter.method,
        "seconds": round(time.perf_counter() - start, 2),
    }


# --------------------------------------------------------------------------- parent


def run_fresh(config: dict[str, Any]) -> dict[str, Any]:
    """`measure(config)` in a fresh interpreter; its last stdout line is the row."""
    proc = subprocess.run([sys.executable, "-m", "bench.memory", "--one", json.dumps(config)],
                          cwd=ROOT, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{config} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# The agent process before it trains: what a device's memory must hold besides the working
# set. Each stage in one fresh interpreter, VmRSS after it (Linux).
_BASELINE = """
import json, sys
def rss():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmRSS:"))
out = {"interpreter": rss()}
import edge_agent.agent, edge_agent.local, edge_agent.levels  # the training path
out["training_imports"] = rss()
out["heavy_modules_loaded"] = sorted({m.split(".")[0] for m in sys.modules} & {"onnx", "onnxscript", "onnxruntime",
                                       "torch_pruning", "matplotlib", "fastapi", "sqlalchemy"})
from models import load_dataset, partition
data = load_dataset("fashion_mnist", None, "train", seed=0)
data = data.subset(partition(data.labels, 10, "dirichlet:0.5", seed=0)[0])
import gc; gc.collect()
from edge_agent.budget import trim_heap; trim_heap()
out["device_partition_loaded"] = rss()
out["samples"] = len(data)
print(json.dumps(out))
"""


def baseline() -> dict[str, Any]:
    """RSS of an agent process at each stage before training (a fresh interpreter)."""
    proc = subprocess.run([sys.executable, "-c", _BASELINE], cwd=ROOT, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:]}
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def configs(quick: bool, strategies: Sequence[str] = STRATEGIES,
            budgets: Sequence[str] = STRATEGY_BUDGETS) -> list[dict[str, Any]]:
    estimates = [e for e in ESTIMATES if e[1] == 64 and e[0].startswith("fedavg_cnn")] if quick else ESTIMATES
    allocators = ("fixed",) if quick else ("default", "fixed")
    out: list[dict[str, Any]] = [
        {"table": "estimate", "model": m, "batch": b, "optimizer": o, "allocator": a, "steps": STEPS}
        for m, b, o in estimates for a in allocators
    ]
    planned = [("fedavg_cnn", "16MB")] if quick else [(m, b) for m in ("fedavg_cnn", STRUCTURED) for b in BUDGETS]
    out += [{"table": "planner", "model": m, "budget": b, "optimizer": "sgd_momentum", "allocator": "fixed",
             "steps": STEPS} for m, b in planned]
    out += [{"table": "strategies", "strategy": st, "budget": b, "optimizer": "sgd_momentum", "allocator": "fixed",
             "steps": STRATEGY_STEPS} for st in strategies for b in budgets]
    return out


def structured_vs_dense(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per allocator: the structured model's peak (and estimate) as a fraction of dense's."""
    def pick(model: str, allocator: str) -> dict[str, Any] | None:
        return next((r for r in rows if r["table"] == "estimate" and r["model"] == model
                     and r["batch"] == 64 and r["optimizer"] == "sgd_momentum"
                     and r["allocator"] == allocator), None)

    pairs = []
    for allocator in ("default", "fixed"):
        dense, pruned = pick("fedavg_cnn", allocator), pick(STRUCTURED, allocator)
        if dense and pruned:
            ratio = pruned["measured_bytes"] / dense["measured_bytes"]
            pairs.append({
                "allocator": allocator, "batch": 64, "optimizer": "sgd_momentum",
                "dense_bytes": dense["measured_bytes"], "structured_bytes": pruned["measured_bytes"],
                "measured_ratio": round(ratio, 4),
                "estimate_ratio": round(pruned["estimate_bytes"] / dense["estimate_bytes"], 4),
                "meets_target": ratio <= TARGET_STRUCTURED_RATIO,
            })
    return pairs


def markdown(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def frozen_layers(names: list[str]) -> str:
    layers = list(dict.fromkeys(n.rsplit(".", 1)[0] for n in names))
    return ", ".join(layers) if layers else "none"


def summary(result: dict[str, Any]) -> str:
    def mb(n: float) -> str:
        return f"{n / MB:.1f}"

    est = [r for r in result["rows"] if r["table"] == "estimate"]
    parts = [markdown(
        ("model", "batch", "optimizer", "allocator", "estimate MB", "measured MB", "estimate / measured", "s"),
        [(r["model"], str(r["batch"]), r["optimizer"], r["allocator"], mb(r["estimate_bytes"]),
          mb(r["measured_bytes"]), f"{r['estimate_bytes'] / r['measured_bytes']:.2f}", f"{r['seconds']:.1f}")
         for r in est])]
    parts.append(markdown(
        ("allocator", "batch", "dense MB", "structured MB", "structured / dense", "estimate ratio",
         f"≤ {TARGET_STRUCTURED_RATIO}"),
        [(p["allocator"], str(p["batch"]), mb(p["dense_bytes"]), mb(p["structured_bytes"]),
          f"{p['measured_ratio']:.2f}", f"{p['estimate_ratio']:.2f}", "yes" if p["meets_target"] else "NO")
         for p in result["structured_vs_dense"]]))
    plan_rows = []
    for r in (r for r in result["rows"] if r["table"] == "planner"):
        if "exceeded" in r:
            plan_rows.append((r["model"], mb(r["budget_bytes"]), "—", "BudgetExceeded: needs "
                              f"{mb(r['needed_bytes'])} MB", "—", "—", "—", "—"))
            continue
        ratio = r["measured_bytes"] / r["budget_bytes"]
        plan_rows.append((r["model"], mb(r["budget_bytes"]), str(r["batch"]), frozen_layers(r["frozen"]),
                          mb(r["estimate_bytes"]), mb(r["measured_bytes"]), f"{ratio:.2f}",
                          "yes" if ratio <= TARGET_BUDGET_RATIO else "NO"))
    parts.append(markdown(("model", "budget MB", "batch", "frozen", "estimate MB", "measured MB",
                           "measured / budget", f"≤ {TARGET_BUDGET_RATIO}"), plan_rows))
    strat_rows = []
    for r in (r for r in result["rows"] if r["table"] == "strategies"):
        if "error" in r:
            strat_rows.append((r["strategy"], mb(r["budget_bytes"]), "—", "—", "—", "—", "—",
                               r["error"].split(":")[0]))
            continue
        ratio = r["measured_bytes"] / r["budget_bytes"]
        strat_rows.append((r["strategy"], mb(r["budget_bytes"]), mb(r["estimate_bytes"]), mb(r["measured_bytes"]),
                           f"{ratio:.2f}", str(r["batch"]), "?" if r["replans"] is None else str(r["replans"]),
                           "yes" if ratio <= TARGET_BUDGET_RATIO else "NO"))
    if strat_rows:
        parts.append(markdown(("strategy", "budget MB", "planned MB", "measured MB", "measured / budget",
                               "batch", "re-plans", f"≤ {TARGET_BUDGET_RATIO}"), strat_rows))
    base = result.get("baseline") or {}
    if "training_imports" in base:
        parts.append(markdown(("agent process", "RSS MB"), [
            ("interpreter", mb(base["interpreter"])), ("+ training-path imports", mb(base["training_imports"])),
            (f"+ its own partition ({base['samples']} images)", mb(base["device_partition_loaded"]))])
            + f"\nheavy modules on the training path: {', '.join(base['heavy_modules_loaded']) or 'none'}")
    load = result["load_average"]
    parts.append(f"threads={est[0]['threads'] if est else '?'} steps={STEPS} cpu={result['cpu']} "
                 f"load={load['start'][0]:.1f}→{load['end'][0]:.1f}")
    return "\n\n".join(parts)


def run(quick: bool, strategies: Sequence[str] = STRATEGIES, budgets: Sequence[str] = STRATEGY_BUDGETS,
        only_strategies: bool = False) -> dict[str, Any]:
    from bench.export import cpu_name

    load_start, rows = list(os.getloadavg()), []
    todo = configs(quick, strategies, budgets)
    if only_strategies:
        todo = [c for c in todo if c["table"] == "strategies"]
    for i, config in enumerate(todo, 1):
        row = run_fresh(config)
        rows.append(row)
        outcome = ("exceeded" if "exceeded" in row else row["error"][:80] if "error" in row
                   else f"{row['measured_bytes'] / MB:.1f} MB in {row['seconds']} s")
        print(f"[{i}/{len(todo)}] {config.get('model', config.get('strategy'))} "
              f"{config.get('budget', config.get('batch'))} "
              f"{config['optimizer']} {config['allocator']}: {outcome}", file=sys.stderr)
    return {
        "command": " ".join(["python -m bench.memory", *sys.argv[1:]]),
        "steps": STEPS,
        "mb": MB,
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "load_average": {"start": load_start, "end": list(os.getloadavg())},
        "versions": {"torch": torch.__version__, "python": sys.version.split()[0]},
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "rows": rows,
        "structured_vs_dense": structured_vs_dense(rows),
        "baseline": baseline(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the fedavg_cnn pair and one planner budget")
    p.add_argument("--json", action="store_true", help="print the result JSON on stdout")
    p.add_argument("--out", type=Path)
    p.add_argument("--strategies", default=",".join(STRATEGIES),
                   help="strategies of the strategies table (comma-separated; empty: none)")
    p.add_argument("--budgets", default=",".join(STRATEGY_BUDGETS), help="budgets of the strategies table")
    p.add_argument("--only-strategies", action="store_true", help="only the strategies table")
    p.add_argument("--one", metavar="CONFIG", help=argparse.SUPPRESS)  # worker: one JSON config
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(measure(json.loads(args.one))))
        return 0
    strategies = [x for x in args.strategies.split(",") if x]
    budgets = [x for x in args.budgets.split(",") if x]
    result = run(args.quick, strategies, budgets, args.only_strategies)
    out = args.out or RESULTS / ("memory-quick.json" if args.quick else "memory.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2) if args.json else summary(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
