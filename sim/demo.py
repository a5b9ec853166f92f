"""`fedslim-demo`: a whole local federation in real processes.

Starts a coordinator (uvicorn, SQLite) and N agent processes on 127.0.0.1, runs R rounds
on Fashion-MNIST split Dirichlet(α) over the agents, shows progress, prints a per-round
table, and writes results.json and results.png into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

__all__ = ["main", "run_demo"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"coordinator exited with code {proc.returncode}; see its log")
        try:
            if httpx.get(f"{url}/v1/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"coordinator at {url} did not become healthy in {timeout:.0f} s")


def federation_config(args: argparse.Namespace) -> dict[str, Any]:
    from sim.presets import strategy_preset

    preset = strategy_preset(args.strategy, rounds=args.rounds)
    training = {"local_epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "momentum": 0.9,
                **preset.get("training", {})}
    if args.max_steps:
        training["max_steps"] = args.max_steps
    if args.upload_density is not None:
        training["upload_density"] = args.upload_density
    config: dict[str, Any] = {
        "name": f"demo-{args.strategy}", "model": args.model, "rounds": args.rounds,
        "clients_per_round": args.agents, "min_clients": max(1, args.agents // 2),
        "round_deadline_s": args.deadline, "seed": args.seed, "training": training,
        # a local run whose round fails five times is broken (e.g. every update non-finite)
        "max_round_attempts": 5,
        "strategy": {"name": preset["name"], "params": {**preset.get("params", {}), **json.loads(args.strategy_params)}},
        "data": {"dataset": args.dataset, "data_dir": args.data_dir, "partition": f"dirichlet:{args.alpha}",
                 "eval_samples": args.eval_samples},
        "download_density": preset.get("download_density", 1.0),
        "download_values": preset.get("download_values", "fp32"),
        "density_warmup_rounds": preset.get("density_warmup_rounds", 0),
    }
    if args.download_density is not None:
        config["download_density"] = args.download_density
    if args.memory_budget_mb:
        config["memory_budget_mb"] = args.memory_budget_mb
    if args.levels:
        widths: Any = "auto" if args.levels == "auto" else [float(w) for w in args.levels.split(",")]
        config["levels"] = {"widths": widths, "rule": args.level_rule}
    return deep_merge(config, json.loads(args.config or "{}"))


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`base` with `override`'s keys put in, nested dicts merged key by key."""
    out = dict(base)
    for key, value in override.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def agent_budgets(args: argparse.Namespace) -> list[str | None]:
    """Per agent, its --memory-budget (None: unlimited): --agent-budgets, one per agent, or
    --agent-memory-budget for all."""
    if not args.agent_budgets:
        return [args.agent_memory_budget] * args.agents
    budgets = [None if b.strip().lower() in ("none", "") else b.strip() for b in args.agent_budgets.split(",")]
    if len(budgets) != args.agents:
        raise RuntimeError(f"--agent-budgets names {len(budgets)} budgets for {args.agents} agents")
    return budgets


def launched(args: argparse.Namespace) -> list[int]:
    """The client indices that run (--skip-agents leaves the partition as it is)."""
    skip = {int(i) for i in args.skip_agents.split(",") if i.strip()} if args.skip_agents else set()
    return [i for i in range(args.agents) if i not in skip]


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out).resolve()
    for stale in ("coordinator", "agents"):  # a run is a fresh federation: an earlier run's
        shutil.rmtree(out / stale, ignore_errors=True)  # agents would count as enrolled
    (out / "logs").mkdir(parents=True, exist_ok=True)
    port = args.port or _free_port()
    url = f"http://127.0.0.1:{port}"
    admin, enroll = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
    env = {**os.environ, "FEDSLIM_ADMIN_TOKEN": admin, "FEDSLIM_ENROLLMENT_TOKEN": enroll,
           "PYTHONUNBUFFERED": "1"}
    cores = os.cpu_count() or 1
    threads = max(1, cores // args.agents)  # agents share the cores without oversubscription
    procs: list[subprocess.Popen] = []
    logs = []
    started = time.time()
    admin_http: httpx.Client | None = None
    try:
        log = open(out / "logs" / "coordinator.log", "w")  # noqa: SIM115 (closed in finally)
        logs.append(log)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "coordinator.cli", "serve", "--port", str(port),
             "--data-dir", str(out / "coordinator"), "--torch-threads", str(cores)],
            env=env, stdout=log, stderr=subprocess.STDOUT))
        _wait_healthy(url, procs[0])
        admin_http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {admin}"}, timeout=60)
        resp = admin_http.post("/v1/federations", json=federation_config(args))
        if resp.is_error:
            raise RuntimeError(f"creating the federation failed: {resp.status_code} {resp.text}")
        fid = resp.json()["id"]
        budgets = agent_budgets(args)
        for i in launched(args):
            log = open(out / "logs" / f"agent-{i}.log", "w")  # noqa: SIM115
            logs.append(log)
            cmd = [sys.executable, "-m", "edge_agent.cli", "run", "--url", url, "--state-dir", str(out / "agents" / f"agent-{i}"),
                   "--name", f"agent-{i}", "--dataset", args.dataset, "--partition", f"dirichlet:{args.alpha}",
                   "--client-index", str(i), "--num-clients", str(args.agents), "--seed", str(args.seed),
                   "--threads", str(threads), "--idle-exit", "120", "--poll", "5"]
            if args.data_dir:
                cmd += ["--data-dir", args.data_dir]
            if budgets[i]:
                cmd += ["--memory-budget", str(budgets[i])]
            procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
        _wait_enrolled(admin_http, len(launched(args)), procs)
        admin_http.post(f"/v1/federations/{fid}/start").raise_for_status()
        rows = _follow(admin_http, fid, args.rounds, procs, quiet=args.quiet)
        final_weights = admin_http.get(f"/v1/federations/{fid}/model").content
        agents = admin_http.get("/v1/agents").json()
        level_exports = _level_exports(admin_http, fid, rows) if args.levels and not args.no_export else []
    finally:
        if admin_http is not None:
            admin_http.close()
        for p in procs[1:] + procs[:1]:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
        for f in logs:
            f.close()
    results = _results(args, fid, rows, time.time() - started)
    results["agents"] = agents
    if level_exports:
        results["level_exports"] = level_exports
    (out / "final_model.bin").write_bytes(final_weights)
    if not args.no_export:
        from sim.demo_export import export_final

        results["final"].update(export_final(args, out, final_weights))
    (out / "results.json").write_text(json.dumps(results, indent=2))
    _plot(rows, out / "results.png", title=f"{args.model} · {args.strategy} · {args.agents} agents · α={args.alpha}")
    if not args.quiet:
        print(format_table(results))
        print(f"\nwrote {out / 'results.json'} and {out / 'results.png'}")
    return results


def _level_exports(http: httpx.Client, fid: str, rows: list[dict]) -> list[dict[str, Any]]:
    """The coordinator's ONNX export report of every width level of the final model."""
    reports = []
    for level in rows[-1].get("levels", []) if rows else []:
        resp = http.get(f"/v1/federations/{fid}/export/{level['level']}/report", timeout=600)
        resp.raise_for_status()
        reports.append(resp.json())
    return reports


def _wait_enrolled(http: httpx.Client, n: int, procs: list[subprocess.Popen], timeout: float = 180) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if len(http.get("/v1/agents").json()) >= n:
            return
        dead = [str(p.args) for p in procs if p.poll() is not None]
        if dead:
            raise RuntimeError(f"a process exited early: {dead[0]}; see the logs")
        time.sleep(0.5)
    raise RuntimeError(f"{n} agents did not enroll within {timeout:.0f} s")


def _follow(http: httpx.Client, fid: str, rounds: int, procs: list[subprocess.Popen], *, quiet: bool) -> list[dict]:
    from tqdm import tqdm

    bar = tqdm(total=rounds, unit="round", disable=quiet, desc="federation")
    rows: list[dict] = []
    while True:
        fed = http.get(f"/v1/federations/{fid}").json()
        rows = http.get(f"/v1/federations/{fid}/rounds").json()
        if len(rows) > bar.n:
            bar.update(len(rows) - bar.n)
            last = rows[-1]
            bar.set_postfix(acc=f"{last['accuracy']:.4f}", up_kb=last["bytes_up"] // 1024, down_kb=last["bytes_down"] // 1024)
        if fed["status"] in ("completed", "stopped"):
            break
        if procs[0].poll() is not None:
            raise RuntimeError("the coordinator died; see logs/coordinator.log")
        if all(p.poll() is not None for p in procs[1:]):
            raise RuntimeError("every agent exited before the federation completed; see logs/agent-*.log")
        time.sleep(0.5)
    bar.close()
    return rows


def _results(args: argparse.Namespace, fid: str, rows: list[dict], seconds: float) -> dict[str, Any]:
    last = rows[-1] if rows else {}
    training = [r for r in rows if not r.get("setup")]  # FedTiny's selection rounds train nothing
    per_round_mb = [(r["bytes_up"] + r["bytes_down"]) / 1e6 for r in training]
    return {
        "federation": fid,
        "config": {k: v for k, v in vars(args).items() if k != "func"},
        "rounds": rows,
        "final": {
            "accuracy": last.get("accuracy"), "loss": last.get("loss"), "rounds": len(training),
            "setup_rounds": len(rows) - len(training),
            "setup_mb": sum((r["bytes_up"] + r["bytes_down"]) / 1e6 for r in rows if r.get("setup")),
            "macs": last.get("macs"), "params": last.get("params"), "density": last.get("density"),
            "mean_mb_per_round": sum(per_round_mb) / max(len(training), 1), "wall_seconds": round(seconds, 1),
        },
    }


def format_table(results: dict[str, Any]) -> str:
    head = (f"{'round':>5} {'accuracy':>8} {'loss':>7} {'clients':>7} {'MB up':>8} {'MB down':>8} {'MMACs':>7} "
            f"{'density':>7} {'peak MB':>7} {'s':>6}")
    lines = [head, "-" * len(head)]
    for r in results["rounds"]:
        density = r.get("density")
        lines.append(
            f"{r['round']:>5} {r['accuracy']:>8.4f} {r['loss']:>7.4f} {r['participants']:>7} "
            f"{r['bytes_up'] / 1e6:>8.3f} {r['bytes_down'] / 1e6:>8.3f} {(r.get('macs') or 0) / 1e6:>7.2f} "
            f"{density if density is not None else 1.0:>7.3f} {r.get('agent_peak_mb') or 0:>7.1f} {r['seconds']:>6.1f}"
        )
    final = results["final"]
    lines.append(f"\nfinal accuracy {final['accuracy']:.4f} · {final['mean_mb_per_round']:.2f} MB per round · "
                 f"{final['wall_seconds']:.0f} s")
    for key in ("dense_macs", "pruned_macs", "parity_max_abs_diff", "onnx_path"):
        if key in final:
            lines.append(f"{key}: {final[key]}")
    if "ort_latency_ms" in final:
        lines.append(latency_line(final))
    return "\n".join(lines)


def _plot(rows: list[dict], path: Path, *, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        return
    r = [x["round"] for x in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax1.plot(r, [x["accuracy"] for x in rows], "o-")
    ax1.set(xlabel="round", ylabel="test accuracy", title="accuracy")
    ax1.grid(alpha=0.3)
    ax2.bar([x - 0.2 for x in r], [x["bytes_up"] / 1e6 for x in rows], 0.4, label="up")
    ax2.bar([x + 0.2 for x in r], [x["bytes_down"] / 1e6 for x in rows], 0.4, label="down")
    ax2.set(xlabel="round", ylabel="MB", title="bytes on the wire per round")
    ax2.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    from sim.presets import STRATEGY_PRESETS

    p = argparse.ArgumentParser(prog="fedslim-demo", description=__doc__)
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--agents", type=int, default=10)
    p.add_argument("--model", default="fedavg_cnn")
    p.add_argument("--dataset", default="fashion_mnist", choices=["fashion_mnist", "cifar10", "synthetic"])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration of the label split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--strategy", default="structured", choices=sorted(STRATEGY_PRESETS))
    p.add_argument("--strategy-params", default="{}",
                   help='JSON overriding the preset\'s strategy params, e.g. \'{"target_macs": 0.3}\'')
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--upload-density", type=float, default=None, help="override the strategy's upload density")
    p.add_argument("--download-density", type=float, default=None)
    p.add_argument("--config", default=None,
                   help='JSON merged into the federation config last, e.g. \'{"training": {"clip_grad_norm": 5}}\'')
    p.add_argument("--memory-budget-mb", type=float, default=None, help="federation-wide agent memory budget in MiB")
    p.add_argument("--agent-memory-budget", default=None, help="per-agent --memory-budget, e.g. 200MB (= 200 MiB)")
    p.add_argument("--agent-budgets", default=None,
                   help="one --memory-budget per agent, comma-separated ('none': unlimited), e.g. 8MB,8MB,none")
    p.add_argument("--skip-agents", default=None, help="client indices not to launch (the partition is unchanged)")
    p.add_argument("--levels", default=None, help="width levels: comma-separated widths (e.g. 1,0.75,0.5,0.25) or auto")
    p.add_argument("--level-rule", default="importance", choices=["first", "importance", "rolling"])
    p.add_argument("--eval-samples", type=int, default=None)
    p.add_argument("--max-steps", type=int, default=None, help="cap local steps (smoke tests)")
    p.add_argument("--deadline", type=float, default=600.0, help="round deadline in seconds")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--no-export", action="store_true")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run_demo(args)
    except RuntimeError as exc:
        print(f"fedslim-demo: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())


def latency_line(final: dict[str, Any]) -> str:
    """ORT latency of the dense and the pruned export, interleaved, as medians with the
    speed-up's 10th–90th percentile over the repeats and the load average they ran under."""
    lat, spread = final["ort_latency_ms"], final.get("latency_speedup_spread") or {}
    parts = []
    for bs in sorted(lat.get("dense", {})):
        ratio = lat["dense"][bs] / max(lat["pruned"][bs], 1e-9)
        p = spread.get(bs)
        parts.append(f"{bs} {lat['dense'][bs]:.3f} → {lat['pruned'][bs]:.3f} ms ({ratio:.2f}x"
                     + (f", p10–p90 {p[0]:.2f}–{p[2]:.2f}x" if p else "") + ")")
    load = (final.get("load_average") or {}).get("before")
    return "ORT latency, interleaved, median: " + "; ".join(parts) + (f" · load average {load[0]:.2f}" if load else "")
