"""`fedslim-sim`: many virtual clients through the coordinator service in one process.

    fedslim-sim --clients 100 --per-round 10 --rounds 10 --strategy fedavg [--backend ray]

Takes the demo's flags (`--per-round` is the demo's `--agents`: clients sampled per round)
and writes the demo's results.json and results.png into --out. The real-process demo
(`fedslim-demo`) stays the reference; this trades its HTTP and processes for scale.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["build_parser", "main", "run_sim"]


def build_parser() -> argparse.ArgumentParser:
    from sim.demo import build_parser as demo_parser

    p = demo_parser()
    p.prog, p.description = "fedslim-sim", __doc__
    # None: min(10, --clients). Virtual clients never straggle, so a round's deadline can
    # only pass because the machine is slow (a ResNet round on 2 loaded cores can take
    # longer than the demo's 600 s): the longest deadline the config allows, one day.
    p.set_defaults(out="runs/sim", agents=None, deadline=86_400.0)
    p.add_argument("--clients", type=int, default=100, help="virtual clients (the partition's size)")
    p.add_argument("--per-round", dest="agents", type=int, help="clients sampled per round (the demo's --agents)")
    p.add_argument("--backend", default="local", choices=["local", "ray"])
    p.add_argument("--ray-address", default=None, help="join a running Ray cluster (default: start one locally)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: every core)")
    return p


def run_sim(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from edge_agent.budget import parse_size
    from sim.demo import _plot, _results, federation_config, format_table  # the demo's own results format
    from sim.engine import SimEngine

    out = Path(args.out).resolve()
    shutil.rmtree(out / "sim", ignore_errors=True)  # a run is a fresh federation
    (out / "logs").mkdir(parents=True, exist_ok=True)
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    federation = federation_config(args)
    federation["name"] = f"sim-{args.strategy}"
    started = time.time()
    budget = parse_size(args.agent_memory_budget) if args.agent_memory_budget else None
    engine = SimEngine(federation, clients=args.clients, workdir=out / "sim", backend=args.backend,
                       torch_threads=threads, memory_budget_bytes=budget, ray_address=args.ray_address)
    try:
        rows = engine.run()
        final_weights = engine.final_model()
        digest = engine.partition_digest
    finally:
        engine.close()
    results = _results(args, engine.fid, rows, time.time() - started)
    results["simulation"] = {"clients": args.clients, "per_round": args.agents, "backend": args.backend,
                             "partition_sha256": digest, "threads": threads}
    (out / "final_model.bin").write_bytes(final_weights)
    if not args.no_export:
        from sim.demo_export import export_final

        results["final"].update(export_final(args, out, final_weights))
    (out / "results.json").write_text(json.dumps(results, indent=2))
    _plot(rows, out / "results.png", title=f"{args.model} · {args.strategy} · {args.agents}/{args.clients} clients · "
                                            f"α={args.alpha}")
    if not args.quiet:
        print(format_table(results))
        print(f"\nwrote {out / 'results.json'} and {out / 'results.png'}")
    return results


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.agents is None:
        args.agents = min(10, args.clients)
    try:
        run_sim(args)
    except (RuntimeError, ValueError) as exc:
        print(f"fedslim-sim: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
