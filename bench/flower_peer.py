"""Flower's side of `bench.compare`: FedAvg in Flower's own simulation runtime (Ray), on
fedslim's partition, model, initial weights and local training loop.

    python -m bench.flower_peer --setup                 # (main venv) make .venv-flower
    .venv-flower/bin/python -m bench.flower_peer --config run.json --out flower.json

flwr 1.41 pins protobuf<7, fastapi 0.138, starlette 1.3, uvicorn 0.49 and rich<15, all in
conflict with the coordinator's pins, so Flower runs in its own venv (`FLOWER_REQUIREMENTS`)
with this repository on its path; it imports `models` only (numpy + torch).

What is Flower's and what is shared: the ServerApp, the message-based FedAvg strategy
(sampling, weighted averaging), the ClientApp and the Ray simulation backend are
Flower's; the data split (written back to `--out`'s .npz so the caller can check it is
fedslim's), the model, the seeded initial weights, the local SGD loop
(`models.train_epochs`, the agent's shuffling seed) and the server-side evaluation are
fedslim's, so that the comparison isolates the systems.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["FLOWER_REQUIREMENTS", "VENV", "flower_python", "main", "setup_venv"]

REPO = Path(__file__).resolve().parents[1]
VENV = Path(os.environ.get("FEDSLIM_FLOWER_VENV", REPO / ".venv-flower"))
# torch and numpy as in constraints.txt, so both systems train with the same kernels
FLOWER_REQUIREMENTS = ["flwr[simulation]==1.41.0", "torch==2.13.0", "numpy==2.4.6"]


def flower_python(venv: Path = VENV) -> Path:
    return venv / "bin" / "python"


def setup_venv(venv: Path = VENV, *, python: str = sys.executable) -> Path:
    """Create the Flower venv and install `FLOWER_REQUIREMENTS` (idempotent: a stamp holds
    the requirements it was made with)."""
    stamp = venv / ".fedslim-flower"
    want = hashlib.sha256("\n".join(FLOWER_REQUIREMENTS).encode()).hexdigest()
    if stamp.exists() and stamp.read_text() == want and flower_python(venv).exists():
        return flower_python(venv)
    if not flower_python(venv).exists():
        subprocess.run([python, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(flower_python(venv)), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    *FLOWER_REQUIREMENTS], check=True)
    stamp.write_text(want)
    return flower_python(venv)


# ---------------------------------------------------------------------- inside .venv-flower

def _record_bytes(content: Any) -> int:
    """Payload bytes of a message's arrays (what Flower serialises onto the wire)."""
    return sum(len(arr.data) for rec in content.array_records.values() for arr in rec.values())


def run_flower(cfg: dict[str, Any], out: Path) -> dict[str, Any]:
    import torch
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    from models import build_model, evaluate, load_dataset, partition, train_epochs
    from models.state import load_numpy_state, seeded_weights

    model_kw = {"in_channels": cfg["in_channels"], "num_classes": 10}
    train = load_dataset(cfg["dataset"], cfg.get("data_dir"), "train", seed=cfg["seed"])
    test = load_dataset(cfg["dataset"], cfg.get("data_dir"), "test", seed=cfg["seed"])
    if cfg.get("eval_samples"):
        test = test.subset(np.arange(min(cfg["eval_samples"], len(test))))
    parts = partition(train.labels, cfg["clients"], cfg["partition"], seed=cfg["seed"])
    np.savez(out.with_suffix(".npz"), **{f"client_{i}": p for i, p in enumerate(parts)})  # type: ignore[arg-type]
    initial = seeded_weights(cfg["model"], cfg["seed"], **model_kw)
    train_kw = {"epochs": cfg["epochs"], "batch_size": cfg["batch_size"], "max_steps": cfg.get("max_steps")}

    def model_from(arrays: Any) -> torch.nn.Module:
        model = build_model(cfg["model"], **model_kw)
        model.load_state_dict(arrays.to_torch_state_dict())
        return model

    client_app = ClientApp()

    @client_app.train()
    def client_train(msg: Message, context: Context) -> Message:
        torch.set_num_threads(1)  # one core per ClientApp, as its num_cpus=1 reserves
        index = int(context.node_config["partition-id"])
        rnd = int(msg.content["config"]["server-round"])
        model = model_from(msg.content["arrays"])
        opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=cfg["momentum"])
        # the agent's seed (fedslim-agent: seed*1000 + index) and its per-round shuffle
        stats = train_epochs(model, train.subset(parts[index]), optimizer=opt,
                             seed=(cfg["seed"] * 1000 + index) * 100_003 + rnd, **train_kw)
        metrics = MetricRecord({"num-examples": stats.samples, "train-loss": stats.loss})
        return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}), reply_to=msg)

    rows: list[dict[str, Any]] = []
    marks: dict[int, float] = {}
    traffic: dict[int, dict[str, int]] = {}

    class CountingFedAvg(FedAvg):  # type: ignore[misc]
        """FedAvg, counting the array payload of every message each way."""

        def configure_train(self, server_round: int, arrays: Any, config: Any, grid: Any) -> Any:
            marks.setdefault(server_round, time.perf_counter())
            messages = list(super().configure_train(server_round, arrays, config, grid))
            traffic[server_round] = {"down": sum(_record_bytes(m.content) for m in messages), "up": 0, "n": len(messages)}
            return messages

        def aggregate_train(self, server_round: int, replies: Any) -> Any:
            replies = list(replies)
            traffic[server_round]["up"] = sum(_record_bytes(r.content) for r in replies if r.has_content())
            return super().aggregate_train(server_round, replies)

    def central_eval(rnd: int, arrays: Any) -> Any:
        if rnd == 0:
            return None
        model = model_from(arrays)
        ev = evaluate(model, test)
        t = traffic.get(rnd, {})
        rows.append({"round": rnd, "accuracy": ev.accuracy, "loss": ev.loss, "participants": t.get("n", 0),
                     "bytes_up": t.get("up", 0), "bytes_down": t.get("down", 0),
                     "seconds": time.perf_counter() - marks[rnd]})
        return MetricRecord({"accuracy": ev.accuracy, "loss": ev.loss})

    server_app = ServerApp()

    @server_app.main()
    def server_main(grid: Grid, context: Context) -> None:
        fraction = cfg["per_round"] / cfg["clients"]
        strategy = CountingFedAvg(fraction_train=fraction, fraction_evaluate=0.0, min_train_nodes=cfg["per_round"],
                                  min_evaluate_nodes=0, min_available_nodes=cfg["clients"])
        model = build_model(cfg["model"], **model_kw)
        load_numpy_state(model, initial)
        strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=cfg["rounds"],
                       evaluate_fn=central_eval)

    started = time.perf_counter()
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=cfg["clients"],
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": cfg.get("cores") or os.cpu_count(),
                                                 "include_dashboard": False, "logging_level": "ERROR"}})
    result = {"rounds": rows, "wall_seconds": time.perf_counter() - started, "flwr": _flwr_version()}
    out.write_text(json.dumps(result, indent=2))
    return result


def _flwr_version() -> str:
    from importlib.metadata import version

    return version("flwr")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setup", action="store_true", help="create the Flower venv (idempotent) and exit")
    p.add_argument("--config", type=Path, help="the run's JSON config (written by bench.compare)")
    p.add_argument("--out", type=Path, help="results JSON; the partition goes beside it as .npz")
    args = p.parse_args(argv)
    if args.setup:
        print(setup_venv())
        return 0
    if args.config is None or args.out is None:
        p.error("--config and --out are required (or --setup)")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    run_flower(json.loads(args.config.read_text()), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
