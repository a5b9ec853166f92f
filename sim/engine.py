"""The simulation engine: many virtual clients through the real coordinator service, in
one process — no HTTP, no process per client.

The `CoordinatorService` runs as in `fedslim-coordinator` (its SQLite store and blob
directory under the work dir, its scheduler's `tick` called here instead of by a
thread): it samples, publishes tasks, validates and folds uploads, closes rounds,
evaluates. Each sampled client does what `EdgeAgent` does after its poll: fetches the
model the way the agent would (the bytes are counted by the service, so `bytes_down`
matches the demo), trains with the agent's `run_task` (hooks, budget, codec, error
feedback) and submits through the service's upload checks. The clients' updates are
the same bytes an agent would POST.

Deterministic for a seed: client i trains on shard i of the seeded partition with the
agent's seed, and the i-th enrolled identity in sorted order is client i, so the
service's seeded sample names the same clients in every run.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from coordinator.errors import NotFound, StaleUpdate
from coordinator.protocol import EnrollRequest, FederationCreate, Task, TaskDecline
from coordinator.service import CoordinatorService
from coordinator.settings import CoordinatorSettings
from edge_agent.agent import check_model
from edge_agent.local import apply_mask_artifact, initial_mask_artifact, initial_weights, with_mask
from models import load_dataset, partition
from sim.virtual import Backend, ClientJob, LocalBackend, ResidualStore, agent_seed
from sparse_kernels import MAX_MODEL_BYTES, Weights, decode
from sparse_kernels.masks import apply_mask_patch
from sparse_kernels.patch import apply_delta, encode_model
from sparse_kernels.reshape import apply_reshape, decode_reshape

__all__ = ["SimEngine", "VirtualClients", "partition_digest"]

log = logging.getLogger("fedslim.sim")
_MAX_PATCH_CHAIN = 4  # as the agent: further behind than this, it downloads the full model
_SIM_IP = "sim"  # the one "address" every virtual client uploads from
# Every virtual client answers at once, so a round that cannot open within this long never
# will (the service's back-off after a failed close is seconds)
_STALL_S = 60.0


def partition_digest(parts: list[np.ndarray]) -> str:
    """sha256 over the clients' index arrays (int64, in client order): equal digests,
    equal partitions — how bench.compare checks Flower trains on the same split."""
    h = hashlib.sha256()
    for p in parts:
        a = np.ascontiguousarray(p, dtype=np.int64)
        h.update(len(a).to_bytes(8, "little"))
        h.update(a.tobytes())
    return h.hexdigest()


@dataclass
class VirtualClients:
    """Identities (agent id + token, client i = the i-th id in sorted order) and the model
    version each client last trained (-1: none): O(clients) strings and one int array."""

    ids: list[str]
    tokens: list[str]
    held: np.ndarray  # int64 (clients,)
    masks: list[str] = field(default_factory=list)  # sha256 of the mask artifact each holds ("" none)

    def index_of(self) -> dict[str, int]:
        return {a: i for i, a in enumerate(self.ids)}


class SimEngine:
    def __init__(self, federation: dict[str, Any], *, clients: int, workdir: Path, backend: str = "local",
                 torch_threads: int = 1, memory_budget_bytes: int | None = None, ray_address: str | None = None,
                 stall_s: float = _STALL_S) -> None:
        if clients < 1:
            raise ValueError(f"clients must be >= 1, got {clients}")
        self.config = FederationCreate.model_validate(federation)
        if self.config.clients_per_round > clients:
            raise ValueError(f"clients_per_round ({self.config.clients_per_round}) exceeds clients ({clients})")
        enroll = secrets.token_urlsafe(16)
        settings = CoordinatorSettings(
            data_dir=workdir / "coordinator", admin_token=secrets.token_urlsafe(16), enrollment_token=enroll,
            torch_threads=torch_threads, max_agents=max(clients, 1),
            # virtual clients are always online and upload once per round from one "address"
            agent_timeout_s=10 * 365 * 86400.0, enroll_per_ip_per_minute=float(clients) * 60,
            uploads_per_agent_per_minute=1e6, uploads_per_ip_per_minute=1e9,
        )
        self.service = CoordinatorService(settings)
        try:
            self._set_up(clients, workdir, enroll, memory_budget_bytes, backend, ray_address)
        except BaseException:
            self.service.stop()  # its database and blob store, whatever failed
            raise
        self._global: tuple[int, Weights] | None = None  # (version, weights): the one model copy
        self._mask_cache: dict[str, bytes] = {}  # sha256 -> mask artifact, those some client holds
        self._skipped: dict[tuple[int, int], set[str]] = {}  # (round, attempt) -> clients whose task failed
        self._jumped_s: dict[int, float] = {}  # round -> seconds the service's clock was moved ahead
        self.stall_s = stall_s

    def _set_up(self, clients: int, workdir: Path, enroll: str, memory_budget_bytes: int | None, backend: str,
                ray_address: str | None) -> None:
        cfg = self.config
        self.data = load_dataset(cfg.data.dataset, cfg.data.data_dir, "train", seed=cfg.seed)
        # every sample goes to exactly one client: the index arrays add up to the dataset,
        # whatever the number of clients
        self.parts = (partition(self.data.labels, clients, cfg.data.partition, seed=cfg.seed)
                      if clients > 1 else [np.arange(len(self.data))])
        ids, tokens = [], []
        for i in range(clients):
            agent_id, token = self.service.auth.enroll(EnrollRequest(
                enrollment_token=enroll, name=f"sim-{i}", memory_budget_bytes=memory_budget_bytes), _SIM_IP)
            ids.append(agent_id)
            tokens.append(token)
        order = sorted(range(clients), key=ids.__getitem__)
        self.clients = VirtualClients([ids[i] for i in order], [tokens[i] for i in order],
                                      np.full(clients, -1, dtype=np.int64), [""] * clients)
        self.residuals = ResidualStore(workdir / "residuals")
        self.budget = memory_budget_bytes
        self.backend: Backend = self._backend(backend, ray_address)
        self.fid = self.service.create_federation(cfg).id

    def _backend(self, name: str, address: str | None) -> Backend:
        if name == "local":
            return LocalBackend(self.data, self.parts, memory_budget_bytes=self.budget)
        if name == "ray":
            from sim.ray_backend import RayBackend  # lazy: ray is the optional `sim` extra

            return RayBackend(self.data, self.parts, memory_budget_bytes=self.budget, address=address)
        raise ValueError(f"unknown backend {name!r}; valid: local, ray")

    @property
    def partition_digest(self) -> str:
        return partition_digest(self.parts)

    # ------------------------------------------------------------------ the run
    def run(self, *, max_rounds: int | None = None) -> list[dict[str, Any]]:
        """Drive the federation to completion (or `max_rounds` closed rounds); the round
        metrics as the service recorded them (`GET /v1/federations/{id}/rounds`)."""
        svc = self.service
        # The agent's memory meter collects garbage before each client trains; the objects
        # set up so far (torch, the service, the dataset) are moved out of the collector's
        # sight so that costs what it costs in an agent process, not 0.3 s a client.
        gc.freeze()
        svc.set_status(self.fid, "start")
        # (closed rounds, open round, attempt) and when it last changed: every virtual client
        # answers at once, so a round that neither opens, trains nor closes is stuck
        progress: tuple[int, int, int] | None = None
        changed = time.monotonic()
        try:
            while True:
                svc.tick()
                fed = svc.get_federation(self.fid)
                if fed.status in ("completed", "stopped", "failed"):
                    if fed.status == "failed":
                        raise RuntimeError(f"federation failed: {fed.error}")
                    break
                if max_rounds is not None and fed.current_round >= max_rounds:
                    break
                entry = svc.board.current(self.fid)
                skipped = self._skipped.get((entry.round, entry.attempt), set()) if entry is not None else set()
                pending = sorted(set(entry.selected) - entry.done - skipped) if entry is not None else []
                if entry is not None and pending:
                    # agents of different width levels get different tasks: one group per task
                    groups: dict[bytes, list[str]] = {}
                    for agent_id in pending:
                        groups.setdefault(entry.task_for.get(agent_id, entry.task_json), []).append(agent_id)
                    for task_bytes, ids in groups.items():
                        self._train_round(Task.model_validate_json(task_bytes), ids, entry.attempt)
                    continue
                if entry is not None and skipped and not set(entry.selected) - entry.done - skipped:
                    # only clients that skipped the task are left: the round would wait for its
                    # deadline; jump the service's clock there (it closes or retries as at the deadline)
                    jump = max(0.0, entry.deadline + 1e-3 - time.time())
                    self._jumped_s[entry.round] = self._jumped_s.get(entry.round, 0.0) + jump
                    svc.tick(now=entry.deadline + 1e-3)
                    continue
                key = (fed.current_round, entry.round if entry else 0, entry.attempt if entry else 0)
                if key != progress:
                    progress, changed = key, time.monotonic()
                elif time.monotonic() - changed > self.stall_s:
                    raise RuntimeError(f"round {fed.current_round + 1} made no progress for {self.stall_s:.0f} s: "
                                       f"{fed.error or 'too few clients can train it (declined for memory?)'}")
                time.sleep(0.02)  # no client to run: the next tick opens, closes or retries
        finally:
            self.backend.close()
        # a round closed by moving the clock took the wall time it took, not its deadline
        rows = svc.round_metrics(self.fid)
        for row in rows:
            if row.get("round") in self._jumped_s and row.get("seconds") is not None:
                row["seconds"] = round(max(0.0, row["seconds"] - self._jumped_s[row["round"]]), 3)
        return rows

    def _train_round(self, task: Task, agent_ids: list[str], attempt: int) -> None:
        index = self.clients.index_of()
        picked = [index[a] for a in agent_ids]
        weights, task = self._sync(task, picked)
        jobs = [ClientJob(i, agent_seed(self.config.seed, i), self.residuals.get(i)) for i in picked]
        for result in self.backend.train(task, weights, jobs):
            agent = self.service.auth.agent(self.clients.tokens[result.index])
            if result.error:
                log.warning("round %d: client %d skipped the task: %s", task.round, result.index, result.error)
                self._skipped.setdefault((task.round, attempt), set()).add(agent.id)
                continue
            if result.body is None:
                self.service.decline_task(agent, task.federation_id, task.round,
                                          TaskDecline(reason=result.decline_reason, needed_bytes=result.needed_bytes))
                continue
            assert result.report is not None
            try:
                self.service.check_upload(agent, task.federation_id, task.round, _SIM_IP)
                self.service.submit_update(agent, task.federation_id, task.round, result.body, result.report)
            except StaleUpdate as exc:  # the round's deadline passed while it trained: late, as an agent would be
                log.warning("round %d: client %d's update is late: %s", task.round, result.index, exc)
                self._skipped.setdefault((task.round, attempt), set()).add(agent.id)
                continue
            self.residuals.put(result.index, result.residual)

    # ------------------------------------------------------------------ downloads
    def _sync(self, task: Task, picked: list[int]) -> tuple[Weights, Task]:
        """The base model every picked client trains from, and the task as its agent half
        sees it (with the mask artifact). Each client's download is made as the agent makes
        it (rebuilt from the seed at version 0, patches when at most `_MAX_PATCH_CHAIN`
        versions behind, else the full model; a mask artifact only when the one it holds is
        not the one named), so the service counts the same bytes; the weights are decoded
        once for all of them."""
        version = task.model_version
        fetched: dict[tuple[str, int], bytes] = {}
        rebuilt = self._rebuilt(task) if version == 0 else None
        if version == 0 and task.mask_sha256:  # as the agent: version 0's mask is rebuilt when it can be
            mask0 = initial_mask_artifact(task)
            if mask0 is not None and hashlib.sha256(mask0).hexdigest() == task.mask_sha256:
                self._mask_cache[task.mask_sha256] = mask0
                for i in picked:
                    self.clients.masks[i] = task.mask_sha256
        for i in picked:
            if rebuilt is None:
                self._fetch(task.federation_id, int(self.clients.held[i]), version, fetched, i)
            self.clients.held[i] = version
            if task.mask_sha256:
                self._fetch_mask(task.federation_id, version, task.mask_sha256, i)
        self._mask_cache = {k: v for k, v in self._mask_cache.items() if k in set(self.clients.masks)}
        if self._global is None or self._global[0] != version:
            self._global = (version, self._weights_at(version, rebuilt, fetched))
        weights = {k: v.copy() for k, v in self._global[1].items()}
        if not task.mask_sha256:
            return weights, task
        artifact = self._mask_cache[task.mask_sha256]
        return apply_mask_artifact(weights, artifact), with_mask(task, artifact)

    def _fetch_mask(self, fid: str, version: int, sha256: str, client: int) -> None:
        """Client `client` gets `version`'s mask artifact as the agent does: nothing when
        it holds that one, the mask patch when it holds version-1's, else the whole."""
        held = self.clients.masks[client]
        if held == sha256:
            return
        if held in self._mask_cache:
            try:
                flips = self.service.model_bytes(fid, version, patch=True, mask=True).data
                old = self._mask_cache[held]
                patched = apply_mask_patch(old, flips, shapes={t.name: t.shape for t in decode(old).tensors})
                if hashlib.sha256(patched).hexdigest() == sha256:
                    self._mask_cache[sha256] = patched
                    self.clients.masks[client] = sha256
                    return
            except NotFound:  # no patch into `version`: the whole artifact
                pass
        data = self.service.model_bytes(fid, version, mask=True).data
        if hashlib.sha256(data).hexdigest() != sha256:  # as the agent: a mask that is not the one named
            raise RuntimeError(f"mask artifact of version {version}: sha256 differs from the one named")
        self._mask_cache[sha256] = data
        self.clients.masks[client] = sha256

    def _rebuilt(self, task: Task) -> Weights | None:
        weights = initial_weights(task)
        same = hashlib.sha256(encode_model(task.federation_id, 0, weights)).hexdigest() == task.model_sha256
        return weights if same and task.model_sha256 else None

    def _fetch(self, fid: str, held: int, version: int, fetched: dict[tuple[str, int], bytes], client: int) -> None:
        if held == version:  # a retried round: the agent trains from the model it holds
            return
        if held >= 0 and 0 < version - held <= _MAX_PATCH_CHAIN:
            try:
                for v in range(held + 1, version + 1):
                    served = self.service.model_bytes(fid, v, patch=True)
                    fetched[("patch", v)] = served.data
                    if served.reshaped:
                        fetched[("reshape", v)] = self.service.model_bytes(fid, v, reshape=True).data
                    if served.mask_sha256:  # w⊙m follows the patch: the agent needs v's mask
                        fetched[("mask", v)] = served.mask_sha256.encode()
                        self._fetch_mask(fid, v, served.mask_sha256, client)
                return
            except NotFound:  # no patch into v (the structure changed): the agent downloads in full
                pass
        fetched[("full", version)] = self.service.model_bytes(fid, version).data

    def _weights_at(self, version: int, rebuilt: Weights | None, fetched: dict[tuple[str, int], bytes]) -> Weights:
        if rebuilt is not None:
            weights = rebuilt
        elif ("full", version) in fetched:
            weights = decode(fetched[("full", version)], max_bytes=MAX_MODEL_BYTES).to_dense()
        else:  # every client patched: the last patch moves our copy of version-1 forward
            assert self._global is not None and self._global[0] == version - 1, "patch without its base"
            weights = {k: v.copy() for k, v in self._global[1].items()}
            if ("reshape", version) in fetched:
                shapes = {k: w.shape for k, w in weights.items()}
                weights = apply_reshape(weights, decode_reshape(fetched[("reshape", version)], shapes))
            apply_delta(weights, decode(fetched[("patch", version)]))
            if ("mask", version) in fetched:
                weights = apply_mask_artifact(weights, self._mask_cache[fetched[("mask", version)].decode()])
        check_model(weights)  # as the agent: a poisoned or diverged global model is refused
        return weights

    def final_model(self) -> bytes:
        return self.service.model_bytes(self.fid, None).data

    def close(self) -> None:
        self.backend.close()
        self.service.stop()
