"""Store backends: the coordinator's database work on SQLite and on PostgreSQL.

    python -m bench.backends [--quick] [--backends sqlite,postgresql] [--postgres-url URL] [--json]

Each operation is the transaction the service runs, through the real `Store`:
  upload   one accepted update recorded: tx{add_update}             (per upload)
  check    an upload's slow-path checks: tx{get_federation, get_round, get_update}
  close    a round's commit: tx{add_download_bytes, add_model, put_round, update_federation}
  touch    last_seen of 200 agents flushed (once per scheduler tick)
  scrape   fedslim_agents_online: count_online over all agents (once per /metrics scrape)
  migrate  a database at revision 0001 holding the agents and updates, upgraded to head
Latency is per transaction on one thread, p50 and p99, commit included.

SQLite runs as the coordinator runs it (WAL, synchronous=FULL); PostgreSQL on loopback:
--postgres-url, or else a throwaway server started here (tests/pg.py's, with fsync and
synchronous commit ON so commits are as durable as SQLite's), stopped at the end.

Prints a table (--json: one JSON object), writes bench/results/backends.json
(backends-quick.json with --quick: 500 agents, 200 operations).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa

from coordinator import store as tables
from coordinator.migrations import upgrade
from coordinator.store import RoundRow, Store, UpdateRow

RESULTS = Path(__file__).resolve().parent / "results"


def _timed(fn: Callable[[int], None], n: int) -> dict[str, float]:
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
    ms = np.array(times) * 1e3
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3),
            "per_s": round(n / float(sum(times)), 1)}


def _populate(engine: sa.Engine, agents: int) -> None:
    """One running federation with an open round, `agents` agents (a spread of last_seen)."""
    now = time.time()
    with engine.begin() as conn:
        conn.execute(tables.federations.insert(), [{"id": "f1", "config": '{"model": "lenet5"}', "status": "running",
                                                     "current_round": 0, "model_version": 0, "created_at": now}])
        conn.execute(tables.rounds.insert(), [{
            "federation_id": "f1", "round": 1, "status": "open", "attempt": 1, "base_version": 0,
            "selected": json.dumps([f"a{i}" for i in range(min(agents, 200))]), "opened_at": now,
            "deadline": now + 600}])
        conn.execute(tables.agents.insert(), [
            {"id": f"a{i}", "name": f"agent-{i}", "token_hash": f"{i:064x}", "enrolled_at": now,
             "last_seen": now - (i % 120), "info": "{}", "memory_budget_bytes": 2**30} for i in range(agents)])


def measure(url: str, *, agents: int, ops: int, work: Path) -> dict[str, Any]:
    # migrate: the previous schema (revision 0001) with the rows, upgraded to head
    engine = sa.create_engine(url)
    upgrade(engine, "0001")
    _populate(engine, agents)
    t0 = time.perf_counter()
    upgrade(engine)
    migrate_s = time.perf_counter() - t0
    engine.dispose()

    store = Store(url, work / "blobs")
    try:
        report = {"agent": "a0", "num_samples": 100, "train_loss": 0.5}

        def upload(i: int) -> None:
            with store.tx() as conn:
                store.add_update(conn, "f1", 1, UpdateRow(f"a{i % agents}-{i}", 1, 100, 40_000, f"{i:064x}", report))

        def check(i: int) -> None:
            with store.tx() as conn:
                store.get_federation(conn, "f1")
                store.get_round(conn, "f1", 1)
                store.get_update(conn, "f1", 1, f"a{i % agents}")

        def close(i: int) -> None:
            now = time.time()
            with store.tx() as conn:
                store.add_download_bytes(conn, "f1", i + 1, 2**31 + i)
                store.add_model(conn, "f1", i + 1, f"{i:064x}", f"{i + 1:064x}", None)
                store.put_round(conn, RoundRow("f1", i + 1, "closed", 1, i, ["a0", "a1"], now, now + 60, now,
                                               {"round": i + 1, "accuracy": 0.5}))
                store.update_federation(conn, "f1", current_round=i + 1, model_version=i + 1)

        def touch(i: int) -> None:
            with store.tx() as conn:
                store.touch_agents(conn, {f"a{(i + j) % agents}": time.time() for j in range(200)})

        since = time.time() - 60

        def scrape(_: int) -> None:
            with store.tx() as conn:
                store.count_online(conn, since)

        row: dict[str, Any] = {"backend": store.engine.dialect.name, "agents": agents, "ops": ops,
                               "migrate_s": round(migrate_s, 3)}
        for name, fn in [("upload", upload), ("check", check), ("close", close), ("touch", touch), ("scrape", scrape)]:
            row[name] = _timed(fn, ops)
        return row
    finally:
        store.close()


def _table(rows: list[dict[str, Any]]) -> str:
    ops = ("upload", "check", "close", "touch", "scrape")
    head = "| backend | " + " | ".join(f"{o} p50 / p99 ms" for o in ops) + " | migrate s |"
    lines = [head, "|---|" + "---:|" * (len(ops) + 1)]
    for r in rows:
        cells = [f"{r[o]['p50_ms']:.2f} / {r[o]['p99_ms']:.2f}" for o in ops]
        lines.append(f"| {r['backend']} | " + " | ".join(cells) + f" | {r['migrate_s']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.backends", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="500 agents, 200 operations")
    ap.add_argument("--agents", type=int)
    ap.add_argument("--ops", type=int)
    ap.add_argument("--backends", default="sqlite,postgresql")
    ap.add_argument("--postgres-url", help="an empty database to use (default: a throwaway local server)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--results", type=Path)
    args = ap.parse_args(argv)
    agents = args.agents or (500 if args.quick else 10_000)
    ops = args.ops or (200 if args.quick else 2_000)
    backends = args.backends.split(",")
    server = None
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedslim-bench-") as tmp:
        try:
            for backend in backends:
                if backend == "sqlite":
                    url = f"sqlite:///{Path(tmp) / 'coordinator.db'}"
                elif backend == "postgresql":
                    url = args.postgres_url or ""
                    if not url:
                        from tests.pg import availability, launch  # the suite's throwaway server

                        bindir, run_as, why = availability()
                        if why is not None or bindir is None:
                            raise SystemExit(f"bench.backends: no PostgreSQL: {why} (or pass --postgres-url)")
                        server = launch(bindir, run_as, durable=True)
                        url = server.create_database()
                else:
                    raise SystemExit(f"bench.backends: unknown backend {backend!r}")
                print(f"==> {backend}: {agents} agents, {ops} operations", file=sys.stderr, flush=True)
                rows.append(measure(url, agents=agents, ops=ops, work=Path(tmp) / backend))
        finally:
            if server is not None:
                server.stop()
    out = {"machine": f"{platform.machine()} {platform.node()}", "python": platform.python_version(),
           "date": time.strftime("%Y-%m-%d"), "runs": rows}
    path = args.results or RESULTS / ("backends-quick.json" if args.quick else "backends.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out) if args.json else _table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
