"""`fedslim-agent`: enroll, run, export, infer.

Imports are lazy per command so `fedslim-agent infer` needs only onnxruntime + numpy.
`run --config FILE` reads a TOML file whose keys are the flags' names (`data = "/srv/photos"`,
`memory_budget = "256MB"`, `progress = true`); flags given on the command line win.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
from pathlib import Path
from typing import Any

__all__ = ["config_args", "main"]


def config_args(path: str, parser: argparse.ArgumentParser) -> list[str]:
    """A TOML config file as command-line flags (so argparse checks its values as it
    checks flags): `key = value` → `--key value`, `key = true` → `--key`."""
    import tomllib

    try:
        with open(path, "rb") as f:
            values = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SystemExit(f"fedslim-agent: cannot read the config file {path}: {exc}") from None
    known = {a.dest: a for a in parser._actions}  # the run sub-parser's flags
    out: list[str] = []
    for key, value in values.items():
        action = known.get(key.replace("-", "_"))
        if action is None or not action.option_strings or key == "config":
            raise SystemExit(f"fedslim-agent: {path}: unknown key {key!r} (keys are the run flags' names)")
        flag = action.option_strings[-1]
        if isinstance(value, bool):
            if not isinstance(action, argparse._StoreTrueAction):
                raise SystemExit(f"fedslim-agent: {path}: {key} takes a value, not {value}")
            out += [flag] if value else []
        elif isinstance(value, (str, int, float)):
            out += [flag, str(value)]
        else:
            raise SystemExit(f"fedslim-agent: {path}: {key} must be a string, number or boolean")
    return out


def _client(url: str, token: str | None, timeout: float = 60.0):  # type: ignore[no-untyped-def]
    import httpx

    from edge_agent.client import CoordinatorClient

    return CoordinatorClient(httpx.Client(base_url=url, timeout=timeout), token=token)


def _enroll(args: argparse.Namespace) -> int:
    from edge_agent.agent import AgentState
    from edge_agent.budget import parse_size

    budget = parse_size(args.memory_budget) if args.memory_budget else None
    client = _client(args.url, None)
    token = args.enrollment_token or os.environ.get("FEDSLIM_ENROLLMENT_TOKEN", "")
    enrolled = client.enroll(token, name=args.name, memory_budget_bytes=budget, platform=platform.platform())
    AgentState(Path(args.state_dir)).save_identity(enrolled.agent_id, enrolled.agent_token, args.url)
    print(f"enrolled as {enrolled.agent_id}; identity saved in {args.state_dir}")
    return 0


def _policy(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """The device policy from the run flags (the names a flat agent.toml uses, same checks)."""
    from edge_agent.policy import policy_from_config

    return policy_from_config(vars(args))


def _run(args: argparse.Namespace) -> int:
    from edge_agent.policy import PolicyError

    try:
        policy = _policy(args)
    except PolicyError as exc:
        print(f"fedslim-agent: {exc}", file=sys.stderr)
        return 2
    import torch

    from edge_agent.agent import AgentState, EdgeAgent
    from edge_agent.budget import configure_allocator, parse_size
    from models import load_dataset, partition

    torch.set_num_threads(args.threads)
    configure_allocator()  # RSS tracks live tensors, so the memory budget holds
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s agent[{args.state_dir}] %(message)s")
    data: Any
    if args.data:  # the device's own files: checked now, so bad data refuses to start
        from edge_agent.local_data import LocalDataError, read_local

        try:
            data = read_local(args.data, label_column=args.label_column)
        except LocalDataError as exc:
            print(f"fedslim-agent run: bad local data: {exc}", file=sys.stderr)
            return 2
    else:
        data = load_dataset(args.dataset, args.data_dir, "train", seed=args.seed)
        if args.num_clients > 1:
            parts = partition(data.labels, args.num_clients, args.partition, seed=args.seed)
            data = data.subset(parts[args.client_index])
    state = AgentState(Path(args.state_dir))
    identity = state.identity
    if not identity:
        if not args.enrollment_token and not os.environ.get("FEDSLIM_ENROLLMENT_TOKEN"):
            print("not enrolled: run `fedslim-agent enroll` first or pass --enrollment-token", file=sys.stderr)
            return 2
        args.url, args.name, args.memory_budget = args.url, args.name, args.memory_budget
        _enroll(args)
        identity = state.identity
    agent = EdgeAgent(
        client=_client(args.url or identity["url"], identity["agent_token"]), data=data, state=state,
        memory_budget_bytes=parse_size(args.memory_budget) if args.memory_budget else None,
        memory_limit_bytes=parse_size(args.memory_limit) if args.memory_limit else None,
        seed=args.seed * 1000 + args.client_index, progress=args.progress, policy=policy,
        holdout_fraction=args.holdout,
    )
    logging.getLogger("fedslim.agent").info("%d local samples", len(data))
    agent.run(max_tasks=args.max_tasks, idle_exit_s=args.idle_exit, poll_s=args.poll)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "export":
        from edge_agent.export import export_main

        return int(export_main(argv[1:]))
    if argv and argv[0] == "infer":
        from edge_agent.infer import main as infer_main

        return int(infer_main(argv[1:]))
    parser = argparse.ArgumentParser(prog="fedslim-agent", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("enroll", "run"):
        p = sub.add_parser(name)
        p.add_argument("--url", default=None if name == "run" else "http://127.0.0.1:8080")
        p.add_argument("--state-dir", default="fedslim-agent")
        p.add_argument("--enrollment-token", default=None)
        p.add_argument("--name", default=platform.node().replace(" ", "-") or "agent")
        p.add_argument("--memory-budget", default=None,
                       help="training working-set budget, e.g. 256MB; every prefix is binary: 256MB = 256MiB = 256·2^20 bytes")
    run = sub.choices["run"]
    run.add_argument("--dataset", default="fashion_mnist", choices=["fashion_mnist", "cifar10", "synthetic"])
    run.add_argument("--data-dir", default=None)
    run.add_argument("--data", default=None,
                     help="this device's own data: a folder with one sub-folder of PNG/JPEG images per class, an .npz "
                          "(x, y) or a CSV file (numeric columns + a label column); replaces --dataset")
    run.add_argument("--label-column", default="label", help="the CSV column holding the class")
    run.add_argument("--holdout", type=float, default=0.1,
                     help="fraction of the local data held out (seeded) to evaluate the global model on when the "
                          "federation asks for federated evaluation")
    run.add_argument("--config", default=None, help="TOML file of run flags (key = flag name); command-line flags win")
    run.add_argument("--partition", default="dirichlet:0.5", help="iid | dirichlet:<alpha> | shards:<k>")
    run.add_argument("--client-index", type=int, default=0)
    run.add_argument("--num-clients", type=int, default=1)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--threads", type=int, default=1, help="torch threads")
    run.add_argument("--max-tasks", type=int, default=None)
    run.add_argument("--idle-exit", type=float, default=None, help="exit after this many idle seconds")
    run.add_argument("--poll", type=float, default=20.0, help="long-poll seconds")
    run.add_argument("--progress", action="store_true")
    run.add_argument("--memory-limit", default=None,
                     help="the agent process's memory (peak RSS), e.g. 512MB: training gets what the idle process leaves "
                          "of it (with --memory-budget too, the smaller)")
    # the device policy (edge_agent/policy.py): when the device says no, the agent declines
    # the task ("not now") and the coordinator samples another device
    run.add_argument("--min-battery", type=float, metavar="PCT", help="on battery, train only at or above PCT %%")
    run.add_argument("--mains-only", action="store_true", help="train only on mains/charger power")
    run.add_argument("--train-window", metavar="HH:MM-HH:MM", help="train only inside this local time window")
    run.add_argument("--max-cpu-temp", type=float, metavar="C", help="train only while the CPU is below C °C")
    run.add_argument("--sysfs", default=None, help="where to read power_supply/thermal from (default /sys)")
    run.add_argument("--not-now-retry", type=float, metavar="S",
                     help="after a no, ask the coordinator not to sample this device for S s (default 300)")
    sub.add_parser("export", help="export a checkpoint to ONNX (see `fedslim-agent export --help`)")
    sub.add_parser("infer", help="classify inputs with an ONNX model (torch-free)")
    if argv and argv[0] == "run" and "--config" in argv[1:-1]:
        at = argv.index("--config", 1)
        argv = ["run", *config_args(argv[at + 1], run), *argv[1:at], *argv[at + 2:]]
    args = parser.parse_args(argv)
    if args.cmd == "run" and not 0 <= args.holdout < 1:
        parser.error("--holdout is a fraction in [0, 1)")
    return _enroll(args) if args.cmd == "enroll" else _run(args)


if __name__ == "__main__":
    sys.exit(main())
