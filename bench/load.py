"""Load benchmark: N simulated agents against one real coordinator process on loopback.

    python -m bench.load [--agents 50,200,1000] [--rounds 3] [--quick] [--json] [--timeout 300]

For each N (one after another, each against a fresh coordinator on a fresh data dir):
starts `fedslim-coordinator serve --dev` on 127.0.0.1 with the enrollment/upload rate
limits and the agent cap raised out of the way, creates a LeNet-5 federation on synthetic
data with the `sparse` preset's compression (top-10 % fp16 both ways), clients_per_round
= min_clients = N, enrolls N agents and runs them as coroutines of this one process (one
httpx.AsyncClient). Each agent does what edge_agent does, minus the training: long-polls
GET /v1/tasks, syncs the model (version 0 is rebuilt from the seed, so nothing is
downloaded; later versions by patch, the full model when there is no patch), "trains"
for a random time (--train-s), PUTs a realistic sparse update (per-tensor top-10 % of
every tensor with >= SMALL_TENSOR entries, dense below, fp16 values, codec-encoded, with
the X-Fedslim-Report header) and asks once more with wait=0 before long-polling again.
Every upload of the run is encoded before round 1 (round r's from version r-1), so
during the rounds the generator's own CPU is its HTTP; the table gives both processes'
CPU seconds over the rounds.
A prober GETs /v1/health every 50 ms, from a process of its own (as an orchestrator's
probe would): in this process it measured this event loop's lag as much as the server.

What is measured (latency = request sent -> response read, on the client):
  upload   PUT .../update                      p50 / p99, uploads/s
  poll     GET /v1/tasks?wait=0 after each upload: the no-wait fast path (mostly 204),
           sampled exactly when the server is busiest. A long poll's duration is its wait
           and says nothing, so long polls are only counted (and their failures are errors).
  health   GET /v1/health every 50 ms, throughout (enrollment included)
  errors   any unexpected status (2xx expected; 204 on polls, 404 on a missing patch) and
           any exception or timeout; requests cancelled at shutdown are not errors
  RSS      the coordinator's resident set (psutil), sampled as each round closes
Targets (issue 10): /health p99 < 100 ms, upload p99 < 250 ms, zero errors, RSS flat
(last round within max(10 MB, 5 %) of the first).

Prints a table (or, with --json, one JSON object on stdout: the run's row for one N,
{"runs": [...]} for several), writes bench/results/load.json (load-quick.json with
--quick: N=50, 2 rounds) and a plot beside it. Progress goes to stderr. Each N has a wall
limit (--timeout); past it the run stops, reports what it has and is marked incomplete.
The coordinator is terminated in every case (finally; SIGTERM and Ctrl-C included).

Client and server share this machine's cores: on a 2-core box the agents' own CPU
(HTTP parsing, encoding) inflates the latencies; `loop_lag_p99_s` says how late the
client's event loop ran, to tell the two apart.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np

from coordinator.protocol import API_PREFIX, REPORT_HEADER, Task, UpdateReport
from sparse_kernels import SMALL_TENSOR, DeltaMeta, ModelDelta, SparseTensor, decode, encode

RESULTS = Path(__file__).resolve().parent / "results"
ADMIN_TOKEN, ENROLL_TOKEN = "dev-admin-token", "dev-enroll-token"
HEALTH_TARGET_S, UPLOAD_TARGET_S = 0.100, 0.250
PROBE_INTERVAL_S = 0.05
MAX_PATCH_CHAIN = 4  # as edge_agent: further behind than this, a full download
UPLOAD_DENSITY = 0.1
T = TypeVar("T")


def federation_config(n: int, rounds: int, deadline_s: float) -> dict[str, Any]:
    """tests/federation_fixtures.small_federation with the `sparse` preset's compression."""
    return {
        "name": f"load-{n}", "model": "lenet5", "rounds": rounds, "clients_per_round": n, "min_clients": n,
        "round_deadline_s": deadline_s, "data": {"dataset": "synthetic", "eval_samples": 200},
        "training": {"batch_size": 32, "lr": 0.05, "max_steps": 4,
                     "upload_density": UPLOAD_DENSITY, "upload_values": "fp16"},
        "download_density": 0.1, "download_values": "fp16",
    }


def make_update(shapes: dict[str, tuple[int, ...]], meta: DeltaMeta, seed: tuple[int, int]) -> bytes:
    """What a sparse agent uploads: per-tensor top-10 % (random support here: the codec's
    cost depends on the counts, not on which entries) of every tensor with at least
    SMALL_TENSOR entries, small tensors dense; fp16 values of a plausible delta's size."""
    rng = np.random.default_rng(seed)
    tensors = []
    for name, shape in shapes.items():
        n = math.prod(shape)
        dense = n < SMALL_TENSOR
        idx = np.arange(n) if dense else np.sort(rng.choice(n, max(1, round(UPLOAD_DENSITY * n)), replace=False))
        mag = 1e-3 * (1.0 + np.abs(rng.standard_normal(idx.size)))  # never 0, like a top-k
        tensors.append(SparseTensor(name, shape, idx, np.where(rng.random(idx.size) < 0.5, -mag, mag)))
    return encode(ModelDelta(meta, tuple(tensors)), values="fp16")


def _num_samples(agent: int, rnd: int) -> int:
    return random.Random(agent * 100_003 + rnd).randint(100, 300)


def percentile(xs: list[float], q: float) -> float | None:
    return float(np.percentile(xs, q)) if xs else None


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------- the coordinator
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _own_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def raise_nofile(need: int) -> int:
    """Each agent holds a socket here and one in the coordinator (which inherits this)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        soft = need if hard == resource.RLIM_INFINITY else min(need, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return int(soft)


class Coordinator:
    """One `fedslim-coordinator serve --dev` process on loopback and a scratch data dir."""

    def __init__(self, n_agents: int) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._tmp = tempfile.TemporaryDirectory(prefix="fedslim-load-")
        self.root = Path(self._tmp.name)
        self.log_path = self.root / "coordinator.log"
        self.env = {
            **os.environ, "PYTHONUNBUFFERED": "1", "FEDSLIM_TICK_S": "0.05",
            # the benchmark's own agents, all from 127.0.0.1, must not be throttled
            "FEDSLIM_ENROLL_PER_IP_PER_MINUTE": "1000000", "FEDSLIM_UPLOADS_PER_AGENT_PER_MINUTE": "1000000",
            "FEDSLIM_UPLOADS_PER_IP_PER_MINUTE": "1000000",
            "FEDSLIM_MAX_AGENTS": "1000000",
            "FEDSLIM_LIMIT_CONCURRENCY": str(max(4096, 3 * n_agents + 256)),
        }
        exe = Path(sys.executable).parent / "fedslim-coordinator"
        self.cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "coordinator.cli"]
        self.cmd += ["serve", "--dev", "--host", "127.0.0.1", "--port", str(self.port),
                     "--data-dir", str(self.root / "coord"), "--torch-threads", "1"]
        self.proc: subprocess.Popen[bytes] | None = None
        self.killed = False  # did not exit within the grace after SIGTERM

    def start(self, timeout_s: float) -> float:
        t0 = time.perf_counter()
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT)
        with httpx.Client(base_url=self.url, timeout=2) as http:
            while time.perf_counter() - t0 < timeout_s:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"coordinator exited with {self.proc.returncode}:\n{self.log_tail()}")
                try:
                    if http.get(f"{API_PREFIX}/health").status_code == 200:
                        return time.perf_counter() - t0
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
        raise RuntimeError(f"coordinator did not answer /health within {timeout_s:.0f} s:\n{self.log_tail()}")

    def rss_mb(self) -> float | None:
        import psutil

        try:
            return float(psutil.Process(self.proc.pid).memory_info().rss) / 2**20 if self.proc else None
        except psutil.Error:
            return None

    def cpu_s(self) -> float | None:
        import psutil

        try:
            t = psutil.Process(self.proc.pid).cpu_times() if self.proc else None
        except psutil.Error:
            return None
        return None if t is None else float(t.user + t.system)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after `grace_s`: uvicorn's graceful shutdown waits for
        every in-flight request, and a long poll held in a thread outlives its client."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.killed = True
                self.proc.kill()
                self.proc.wait(10)
        self._tmp.cleanup()


# ---------------------------------------------------------------------- one run
@dataclass
class Recorder:
    latency: dict[str, list[float]] = field(default_factory=lambda: {
        k: [] for k in ("upload", "poll", "health", "download", "enroll")})
    errors: Counter[str] = field(default_factory=Counter)
    uploads: int = 0
    long_polls: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    loop_lag: list[float] = field(default_factory=list)
    task_times: dict[int, list[float]] = field(default_factory=dict)  # round -> arrival times
    rss_mb_start: float | None = None
    rss_mb_per_round: list[float | None] = field(default_factory=list)
    round_close: list[float] = field(default_factory=list)  # perf_counter of each close
    cpu_start: tuple[float | None, float] | None = None  # (coordinator, generator) CPU seconds at start
    cpu_end: tuple[float | None, float] | None = None  # ... at the last round close
    started_at: float | None = None  # federation start
    incomplete: str | None = None

    def error(self, what: str, detail: str = "") -> None:
        self.errors[what] += 1
        if sum(self.errors.values()) <= 5:  # the first few, so a broken run says why at once
            log(f"  error: {what} {detail}".rstrip())


def _limits(pool: int) -> httpx.Limits:
    # Idle connections expire here well before the server's keep-alive timeout (5 s), so
    # a request never goes out on a connection the server is closing at that moment.
    return httpx.Limits(max_connections=pool, max_keepalive_connections=pool, keepalive_expiry=2.0)


class Run:
    def __init__(self, n: int, args: argparse.Namespace, coord: Coordinator, rec: Recorder) -> None:
        self.n, self.args, self.coord, self.rec = n, args, coord, rec
        self.stop = asyncio.Event()
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.fid = ""
        self.encoder = ThreadPoolExecutor(1, thread_name_prefix="encode")  # keeps the event loop free
        self.prepared: dict[tuple[int, int, int], bytes] = {}  # (agent, round, base version) -> upload
        pool = n + 16  # a connection per agent (each has at most one request out) and spare
        self.http = httpx.AsyncClient(base_url=coord.url, timeout=30, limits=_limits(pool))

    async def call(self, op: str, method: str, path: str, *, ok: tuple[int, ...] = (200,),
                   http: httpx.AsyncClient | None = None, timed: bool = True, **kw: Any) -> httpx.Response | None:
        """One request; its latency under `op` if the status is expected, else an error."""
        t0 = time.perf_counter()
        try:
            resp = await (http or self.http).request(method, API_PREFIX + path, **kw)
        except httpx.HTTPError as exc:
            self.rec.error(f"{op} {type(exc).__name__}")
            return None
        if resp.status_code not in ok:
            self.rec.error(f"{op} {resp.status_code}", resp.text[:300])
            return None
        if timed:
            self.rec.latency[op].append(time.perf_counter() - t0)
        return resp

    async def until_stop(self, aw: Awaitable[T]) -> T | None:
        """`aw`, or None (cancelled) as soon as the run stops: long polls end at once."""
        job = asyncio.ensure_future(aw)
        stopper = asyncio.ensure_future(self.stop.wait())
        await asyncio.wait({job, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if job.done():
            return job.result()
        job.cancel()
        return None

    # ------------------------------------------------------------------ roles
    def start_prober(self) -> subprocess.Popen[str]:
        """The /health prober in a process of its own, so its figures are the server's
        latency, not this loop's lag."""
        root = Path(__file__).resolve().parents[1]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
        return subprocess.Popen([sys.executable, "-m", "bench.load", "--probe", self.coord.url], cwd=root, env=env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def stop_prober(self, proc: subprocess.Popen[str]) -> None:
        try:
            out, _ = proc.communicate("stop\n", timeout=30)
            latencies, errors = json.loads(out)
        except (subprocess.TimeoutExpired, ValueError):
            proc.kill()
            proc.wait(10)
            self.rec.error("health prober did not report")
            return
        self.rec.latency["health"].extend(latencies)
        for what, count in errors.items():
            self.rec.errors[what] += count

    async def ticker(self) -> None:
        """How late this process's event loop runs: the client's share of any latency."""
        while not self.stop.is_set():
            t0 = time.perf_counter()
            await asyncio.sleep(PROBE_INTERVAL_S)
            self.rec.loop_lag.append(max(0.0, time.perf_counter() - t0 - PROBE_INTERVAL_S))

    async def enroll(self, i: int, gate: asyncio.Semaphore) -> str | None:
        async with gate:
            resp = await self.call("enroll", "POST", "/agents/enroll", ok=(201,), json={
                "enrollment_token": ENROLL_TOKEN, "name": f"load-{i}", "platform": "bench.load"})
        return str(resp.json()["agent_token"]) if resp is not None else None

    async def agent(self, i: int, token: str) -> None:
        try:
            await self._agent(i, token)
        except Exception as exc:  # a bug or a malformed answer: count it, do not vanish
            self.rec.error(f"agent {type(exc).__name__}: {str(exc)[:80]}")

    async def _agent(self, i: int, token: str) -> None:
        # a client of its own, as a device has: one shared pool of N connections costs the
        # benchmark O(N) per request in httpcore and made the load generator the bottleneck
        async with httpx.AsyncClient(base_url=self.coord.url, timeout=30, limits=_limits(2)) as http:
            await self._work(i, token, http)

    async def _work(self, i: int, token: str, http: httpx.AsyncClient) -> None:
        auth = {"Authorization": f"Bearer {token}"}
        rng = random.Random(i)
        have: int | None = None  # the model version this agent holds
        wait = self.args.poll_wait
        task: Task | None = None
        while not self.stop.is_set():
            if task is None:
                resp = await self.until_stop(self.call("long_poll", "GET", "/tasks", ok=(200, 204), timed=False, http=http,
                                                       params={"wait": wait}, headers=auth, timeout=wait + 30))
                if self.stop.is_set():
                    return
                self.rec.long_polls += 1
                if resp is None:
                    await asyncio.sleep(0.5)  # an error: do not spin
                    continue
                if resp.status_code == 204:
                    continue
                task = Task.model_validate_json(resp.content)
            self.rec.task_times.setdefault(task.round, []).append(time.perf_counter())
            have = await self.sync_model(task, have, auth, http)
            await asyncio.sleep(rng.uniform(0, 2 * self.args.train_s))  # local training
            num_samples = _num_samples(i, task.round)
            body = self.prepared.pop((i, task.round, task.model_version), None)
            if body is None:  # a round this run did not foresee (a retry): encode it now
                meta = DeltaMeta(federation_id=task.federation_id, round=task.round, base_version=task.model_version,
                                 num_samples=num_samples, kind="delta")
                body = await asyncio.get_running_loop().run_in_executor(
                    self.encoder, make_update, self.shapes, meta, (i, task.round))
            report = UpdateReport(num_samples=num_samples, train_loss=rng.uniform(0.5, 2.5),
                                  train_accuracy=rng.uniform(0.1, 0.9), train_seconds=self.args.train_s)
            resp = await self.call("upload", "PUT", f"/federations/{task.federation_id}/rounds/{task.round}/update",
                                   http=http, content=body, headers={**auth, REPORT_HEADER: report.model_dump_json(),
                                                          "Content-Type": "application/octet-stream"})
            task = None
            if resp is not None:
                if resp.json().get("accepted") and not resp.json().get("duplicate"):
                    self.rec.uploads += 1
                    self.rec.bytes_up += len(body)
                else:
                    self.rec.error(f"upload not accepted: {resp.text[:80]}")
            # the no-wait fast path, measured while the others are still uploading
            resp = await self.call("poll", "GET", "/tasks", ok=(200, 204), params={"wait": 0}, headers=auth, http=http)
            if resp is not None and resp.status_code == 200:
                task = Task.model_validate_json(resp.content)

    def prepare(self) -> dict[tuple[int, int, int], bytes]:
        out = {}
        for i in range(self.n):
            for rnd in range(1, self.args.rounds + 1):
                meta = DeltaMeta(federation_id=self.fid, round=rnd, base_version=rnd - 1,
                                 num_samples=_num_samples(i, rnd), kind="delta")
                out[(i, rnd, rnd - 1)] = make_update(self.shapes, meta, (i, rnd))
        return out

    async def sync_model(self, task: Task, have: int | None, auth: dict[str, str], http: httpx.AsyncClient) -> int:
        """As EdgeAgent.sync_model: version 0 is rebuilt from the seed (no bytes); patches
        forward from what we hold; else, or when a patch is missing, the full model."""
        fid, v = task.federation_id, task.model_version
        if v == 0 and task.model_sha256:
            return 0
        if have is not None and 0 <= v - have <= MAX_PATCH_CHAIN:
            for u in range(have + 1, v + 1):
                resp = await self.call("download", "GET", f"/federations/{fid}/models/{u}/patch", ok=(200, 404),
                                       headers=auth, http=http)
                if resp is None or resp.status_code == 404:
                    break
                self.rec.bytes_down += len(resp.content)
            else:
                return v
        resp = await self.call("download", "GET", f"/federations/{fid}/models/{v}", headers=auth, http=http)
        if resp is not None:
            self.rec.bytes_down += len(resp.content)
        return v

    async def watcher(self) -> None:
        """Admin view of the federation: RSS and wall time as each round closes; stops the
        run when it completes (or fails)."""
        done = 0
        while not self.stop.is_set():
            resp = await self.admin_call("GET", f"/federations/{self.fid}")
            if resp is not None:
                fed = resp.json()
                for _ in range(done, int(fed["current_round"])):
                    done += 1
                    self.rec.round_close.append(time.perf_counter())
                    self.rec.cpu_end = (self.coord.cpu_s(), _own_cpu_s())
                    self.rec.rss_mb_per_round.append(self.coord.rss_mb())
                    started = self.rec.started_at or 0.0
                    prev = self.rec.round_close[-2] if done > 1 else started
                    log(f"  round {done}/{self.args.rounds} closed in {self.rec.round_close[-1] - prev:.2f} s, "
                        f"RSS {self.rec.rss_mb_per_round[-1] or 0:.0f} MB, {self.rec.uploads} uploads, "
                        f"{sum(self.rec.errors.values())} errors")
                if fed["status"] == "completed":
                    self.stop.set()
                    return
                if fed["status"] in ("failed", "stopped"):
                    self.rec.incomplete = f"federation {fed['status']}: {fed.get('error') or ''}".strip()
                    self.stop.set()
                    return
            await asyncio.sleep(0.1)

    # ------------------------------------------------------------------ the whole run
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

    async def admin_call(self, method: str, path: str, **kw: Any) -> httpx.Response | None:
        """An admin request on a connection of its own: a pooled one can pass the server's
        keep-alive between the pool's expiry check and the send when this loop lags by
        seconds (1000 agents), and the server then closes it under the request."""
        async with httpx.AsyncClient(base_url=self.coord.url, timeout=30) as http:
            return await self.call("admin", method, path, timed=False, headers=self.admin, http=http, **kw)

    async def main(self) -> None:
        tasks: list[asyncio.Task[None]] = []
        prober: subprocess.Popen[str] | None = None
        try:
            prober = self.start_prober()
            tasks += [asyncio.create_task(self.ticker())]
            config = federation_config(self.n, self.args.rounds, self.args.timeout)
            resp = await self.admin_call("POST", "/federations", ok=(201,), json=config)
            if resp is None:
                raise RuntimeError(f"federation create failed:\n{self.coord.log_tail()}")
            self.fid = resp.json()["id"]
            # the model's shapes, from the model the coordinator serves (admin: counted nowhere
            # in the agents' figures)
            resp = await self.admin_call("GET", f"/federations/{self.fid}/models/0")
            if resp is None:
                raise RuntimeError("model download failed")
            self.shapes = {t.name: t.shape for t in decode(resp.content).tensors}
            # every upload of the run encoded before it starts (round r's from version r-1),
            # so the generator's own CPU during the rounds is HTTP only
            t0 = time.perf_counter()
            self.prepared = await asyncio.get_running_loop().run_in_executor(self.encoder, self.prepare)
            log(f"  encoded {len(self.prepared)} uploads in {time.perf_counter() - t0:.1f} s")
            t0 = time.perf_counter()
            gate = asyncio.Semaphore(100)
            tokens = await asyncio.gather(*(self.enroll(i, gate) for i in range(self.n)))
            log(f"  enrolled {sum(t is not None for t in tokens)}/{self.n} agents in {time.perf_counter() - t0:.1f} s")
            tasks += [asyncio.create_task(self.agent(i, t)) for i, t in enumerate(tokens) if t is not None]
            resp = await self.admin_call("POST", f"/federations/{self.fid}/start")
            if resp is None:
                raise RuntimeError(f"federation start failed:\n{self.coord.log_tail()}")
            self.rec.started_at = time.perf_counter()
            self.rec.cpu_start = (self.coord.cpu_s(), _own_cpu_s())
            self.rec.rss_mb_start = self.coord.rss_mb()
            await self.watcher()
        finally:
            self.stop.set()
            if tasks:  # in-flight uploads and wait=0 polls finish; long polls end at once
                await asyncio.wait(tasks, timeout=5)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if prober is not None:
                self.stop_prober(prober)
            await self.http.aclose()
            self.encoder.shutdown(wait=False, cancel_futures=True)


def probe_main(url: str) -> None:
    """`--probe URL`: GET /health every PROBE_INTERVAL_S whether or not the previous probe
    came back (a stall shows as many slow probes, not as one) until a line arrives on
    stdin; then print [latencies, {error: count}] as JSON."""
    import threading

    latencies: list[float] = []
    errors: Counter[str] = Counter()
    stop = threading.Event()

    def wait_for_stop() -> None:
        sys.stdin.readline()
        stop.set()

    threading.Thread(target=wait_for_stop, daemon=True).start()

    async def probe(http: httpx.AsyncClient) -> None:
        t0 = time.perf_counter()
        try:
            resp = await http.get(f"{API_PREFIX}/health")
        except httpx.HTTPError as exc:
            errors[f"health {type(exc).__name__}"] += 1
            return
        if resp.status_code == 200:
            latencies.append(time.perf_counter() - t0)
        else:
            errors[f"health {resp.status_code}"] += 1

    async def main() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=10, limits=_limits(256)) as http:
            probes: set[asyncio.Task[None]] = set()
            while not stop.is_set():
                if len(probes) < 200:  # 10 s of probes outstanding: the timeout's worth
                    task = asyncio.create_task(probe(http))
                    probes.add(task)
                    task.add_done_callback(probes.discard)
                await asyncio.sleep(PROBE_INTERVAL_S)
            if probes:
                await asyncio.wait(probes, timeout=5)

    asyncio.run(main())
    print(json.dumps([latencies, dict(errors)]), flush=True)


def run_one(n: int, args: argparse.Namespace) -> dict[str, Any]:
    """One N against a fresh coordinator; always returns a summary (incomplete if cut short)."""
    rec = Recorder()
    t0 = time.perf_counter()
    raise_nofile(4 * n + 512)
    coord = Coordinator(n)
    interrupted = False
    try:
        log(f"[N={n}] coordinator up on {coord.url} in {coord.start(min(60.0, args.timeout)):.1f} s")
        remaining = args.timeout - (time.perf_counter() - t0)
        asyncio.run(asyncio.wait_for(Run(n, args, coord, rec).main(), remaining))
    except (asyncio.TimeoutError, TimeoutError):
        rec.incomplete = f"wall limit of {args.timeout:.0f} s reached"
    except KeyboardInterrupt:
        rec.incomplete, interrupted = "interrupted", True
    except RuntimeError as exc:
        rec.incomplete = str(exc).splitlines()[0]
        log(str(exc))
    finally:
        coord.stop()
    row = summarize(n, args, rec, time.perf_counter() - t0)
    row["coordinator_killed"] = coord.killed
    if interrupted:
        row["interrupted"] = True
    return row


def summarize(n: int, args: argparse.Namespace, rec: Recorder, wall_s: float) -> dict[str, Any]:
    lat = rec.latency
    rounds_done = len(rec.round_close)
    if rec.incomplete is None and rounds_done < args.rounds:
        rec.incomplete = f"{rounds_done} of {args.rounds} rounds"
    start = rec.started_at
    span = (rec.round_close[-1] if rec.round_close else time.perf_counter()) - start if start else None
    rss = [r for r in rec.rss_mb_per_round if r is not None]
    growth = rss[-1] - rss[0] if len(rss) >= 2 else None
    rss_flat = None if growth is None else bool(growth <= max(10.0, 0.05 * rss[0]))
    closes = [start or 0.0, *rec.round_close]
    errors = sum(rec.errors.values())
    row: dict[str, Any] = {
        "agents": n, "errors": errors,
        "health_p99_s": percentile(lat["health"], 99), "upload_p99_s": percentile(lat["upload"], 99),
        "poll_p99_s": percentile(lat["poll"], 99), "rss_mb_per_round": rec.rss_mb_per_round,
        "health_p50_s": percentile(lat["health"], 50), "upload_p50_s": percentile(lat["upload"], 50),
        "poll_p50_s": percentile(lat["poll"], 50),
        "download_p50_s": percentile(lat["download"], 50), "download_p99_s": percentile(lat["download"], 99),
        "enroll_p50_s": percentile(lat["enroll"], 50), "enroll_p99_s": percentile(lat["enroll"], 99),
        "samples": {k: len(v) for k, v in lat.items()} | {"long_polls": rec.long_polls},
        "error_kinds": dict(rec.errors.most_common()),
        "uploads": rec.uploads, "uploads_per_s": rec.uploads / span if span else None,
        "bytes_up": rec.bytes_up, "bytes_down": rec.bytes_down,
        "rounds": args.rounds, "rounds_completed": rounds_done,
        "round_wall_s": [float(x) for x in np.diff(closes)],
        # from the first to the last agent receiving the round's task: how promptly long polls wake
        "task_spread_s": [max(v) - min(v) for _, v in sorted(rec.task_times.items())],
        "rss_mb_start": rec.rss_mb_start, "rss_growth_mb": growth,
        "loop_lag_p99_s": percentile(rec.loop_lag, 99),
        # CPU seconds from the start to the last round close: who had the cores
        "coordinator_cpu_s": _cpu_delta(rec, 0), "generator_cpu_s": _cpu_delta(rec, 1),
        "uploads_offered_per_s": n / (2 * args.train_s) if args.train_s > 0 else None,
        "complete": rec.incomplete is None, "incomplete_reason": rec.incomplete, "wall_s": wall_s,
        "train_s": args.train_s, "poll_wait_s": args.poll_wait,
    }
    h, u = row["health_p99_s"], row["upload_p99_s"]
    row["targets"] = {
        "health_p99_lt_100ms": None if h is None else h < HEALTH_TARGET_S,
        "upload_p99_lt_250ms": None if u is None else u < UPLOAD_TARGET_S,
        "zero_errors": errors == 0 and rec.incomplete is None, "rss_flat": rss_flat,
    }
    return row


def _cpu_delta(rec: Recorder, k: int) -> float | None:
    if rec.cpu_start is None or rec.cpu_end is None or rec.cpu_start[k] is None or rec.cpu_end[k] is None:
        return None
    return float(rec.cpu_end[k] - rec.cpu_start[k])  # type: ignore[operator]


# ---------------------------------------------------------------------- output
def _ms(x: float | None) -> str:
    return "-" if x is None else f"{1000 * x:.0f}"


def _cpu(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def _mark(ok: bool | None) -> str:
    return "-" if ok is None else "✓" if ok else "✗"


def print_table(rows: list[dict[str, Any]]) -> None:
    header = (f"{'agents':>6} {'rounds':>6} {'errors':>6} {'up/s':>6} {'upload p50/p99 ms':>17} "
              f"{'poll p50/p99 ms':>15} {'health p50/p99 ms':>17}  {'RSS MB per round':<22} "
              f"{'health':>6} {'upload':>6} {'errors':>6} {'RSS':>4}  {'CPU s coord/gen':>15}")
    print(header + "\n" + "-" * len(header))
    for r in rows:
        rss = "/".join(f"{x:.0f}" for x in r["rss_mb_per_round"] if x is not None) or "-"
        ups = "-" if r["uploads_per_s"] is None else f"{r['uploads_per_s']:.0f}"
        t = r["targets"]
        print(f"{r['agents']:>6} {r['rounds_completed']:>3}/{r['rounds']:<2} {r['errors']:>6} {ups:>6} "
              f"{_ms(r['upload_p50_s']) + '/' + _ms(r['upload_p99_s']):>17} "
              f"{_ms(r['poll_p50_s']) + '/' + _ms(r['poll_p99_s']):>15} "
              f"{_ms(r['health_p50_s']) + '/' + _ms(r['health_p99_s']):>17}  {rss:<22} "
              f"{_mark(t['health_p99_lt_100ms']):>6} {_mark(t['upload_p99_lt_250ms']):>6} "
              f"{_mark(t['zero_errors']):>6} {_mark(t['rss_flat']):>4}  "
              f"{_cpu(r.get('coordinator_cpu_s')) + '/' + _cpu(r.get('generator_cpu_s')):>15}"
              + ("" if r["complete"] else f"  INCOMPLETE: {r['incomplete_reason']}"))
    print("targets: /health p99 < 100 ms, upload p99 < 250 ms, zero errors, RSS flat across rounds")


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ns = [r["agents"] for r in rows]
    for key, label in (("health", "/health"), ("upload", "upload"), ("poll", "poll wait=0")):
        ys = [r[f"{key}_p99_s"] for r in rows]
        ax1.plot(ns, [1000 * y if y is not None else math.nan for y in ys], "o-", label=f"{label} p99")
    ax1.axhline(1000 * HEALTH_TARGET_S, ls=":", c="gray", label="/health target")
    ax1.axhline(1000 * UPLOAD_TARGET_S, ls="--", c="gray", label="upload target")
    ax1.set(xlabel="agents", ylabel="ms", title="p99 latency", xscale="log", yscale="log", xticks=ns)
    ax1.set_xticklabels([str(n) for n in ns])
    ax1.minorticks_off()
    for r in rows:
        rss = [x if x is not None else math.nan for x in r["rss_mb_per_round"]]
        ax2.plot(range(1, len(rss) + 1), rss, "o-", label=f"N={r['agents']}")
    ax2.set(xlabel="round", ylabel="MB", title="coordinator RSS at each round close", ylim=(0, None))
    ax2.xaxis.get_major_locator().set_params(integer=True)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--agents", action="append", help="N agents; repeatable or a comma list (default 50,200,1000)")
    p.add_argument("--rounds", type=int, help="rounds per run (default 3; 2 with --quick)")
    p.add_argument("--quick", action="store_true", help="N=50, 2 rounds, results to load-quick.json")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--timeout", type=float, default=300.0, help="wall limit per N, seconds")
    p.add_argument("--train-s", type=float, default=1.0,
                   help="mean simulated training time; each agent waits uniform(0, 2x) (0: all upload at once)")
    p.add_argument("--poll-wait", type=float, default=20.0, help="long-poll wait, seconds")
    p.add_argument("--results", type=Path, help="JSON path (default bench/results/load[-quick].json)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--probe", metavar="URL", help=argparse.SUPPRESS)  # the /health prober's own process
    args = p.parse_args(argv)
    if args.probe:
        probe_main(args.probe)
        return 0
    agents = [int(x) for a in (args.agents or (["50"] if args.quick else ["50,200,1000"])) for x in a.split(",") if x]
    args.rounds = args.rounds or (2 if args.quick else 3)
    results = args.results or RESULTS / ("load-quick.json" if args.quick else "load.json")
    rows: list[dict[str, Any]] = []
    for n in agents:
        rows.append(run_one(n, args))
        if rows[-1].get("interrupted"):
            break
    if args.json:
        print(json.dumps(rows[0] if len(rows) == 1 else {"runs": rows}))
    else:
        print_table(rows)
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps({"args": {**vars(args), "agents": agents, "results": str(results)},
                                   "cpus": os.cpu_count(), "runs": rows}, indent=2))
    if not args.no_plot:
        plot(rows, results.with_suffix(".png"))
    log(f"wrote {results}")
    return 0 if all(r["complete"] and r["errors"] == 0 for r in rows) else 1


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM cleans up like Ctrl-C
    sys.exit(main())
