"""The coordinator's state machine over the durable `Store`: federation lifecycle, uploads,
round opening and closing, and the scheduler that drives them.

Around it, one module per responsibility: `auth` (tokens, enrollment, rate limits),
`tasks` (the task board long polls wait on), `aggregation` (an attempt's updates, each
folded once), `broadcast` (what agents will hold), `round_metrics`, `isolation` (a failing
federation backs off and fails alone), `admission` (what a federation config may ask).

Concurrency: request handlers run in a thread pool (long polls on the event loop, via the
task board) and a scheduler thread ticks. `self.lock` guards the in-memory federation
caches and serialises uploads with round closing; the task board has its own short lock,
so a poll never waits for a round to close.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import math
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from coordinator import rounds as rules
from coordinator.admission import check_federation
from coordinator.aggregation import RoundUpdates, clip_bound
from coordinator.auth import Auth
from coordinator.broadcast import RESIDUAL_PREFIX, make_broadcast, round_for_broadcast
from coordinator.errors import (
    BadRequest,
    FederationFailed,
    Forbidden,
    NotFound,
    PayloadTooLarge,
    StaleUpdate,
)
from coordinator.evaluation import Evaluator
from coordinator.exports import ExportCache
from coordinator.group_commit import GroupCommit
from coordinator.isolation import Backoff
from coordinator.labelled import load_labelled_set
from coordinator.levels import PlannedLevel, assign_level, plan_levels, task_levels
from coordinator.metrics import Metrics
from coordinator.protocol import FederationCreate, FederationStatus, Task, TaskDecline, TrainingConfig, UpdateReport
from coordinator.round_metrics import round_metrics
from coordinator.settings import CoordinatorSettings
from coordinator.store import AgentRow, BlobCache, FederationRow, RoundRow, Store, UpdateRow
from coordinator.tasks import OpenRound, TaskBoard
from coordinator.uploads import upload_shapes, validate_upload
from models.state import is_bn_stat
from models.zoo import model_identity
from pruning.levels import level_slices
from sparse_kernels import MAX_MODEL_BYTES, ModelDelta, decode, warmup_density
from sparse_kernels.masks import encode_masks, mask_patch
from sparse_kernels.npz import arrays_from_npz as _from_npz
from sparse_kernels.npz import arrays_to_npz as _npz
from sparse_kernels.patch import encode_model
from sparse_kernels.reshape import apply_reshape
from strategies import RoundContext, Strategy, Weights, build_strategy
from strategies.masking import masks_from_state

__all__ = ["CoordinatorService", "Served"]

log = logging.getLogger("fedslim.coordinator")
MAX_MODEL_BLOB = MAX_MODEL_BYTES  # stored full models: written by us, read back without a smaller cap
_ACTIVE = ("running", "paused")
_MODEL_ROWS_CACHED = 4096


_ACCEPTED = (True, False)  # an upload's outcome: (accepted, duplicate)


@dataclass(frozen=True)
class _Upload:
    """A validated, blob-stored upload on its way into the group commit."""

    agent_id: str
    fid: str
    rnd: int
    digest: str
    nbytes: int
    report: UpdateReport
    budget_bytes: int | None
    delta: ModelDelta
    live: _Live
    updates: RoundUpdates
    deadline: float


@dataclass(frozen=True)
class Served:
    """Bytes of one model version's artifact, with what its download headers say."""

    version: int
    data: bytes
    reshaped: bool  # the version has a reshape (apply it before the patch)
    mask_sha256: str  # the version's mask artifact ("" for none): apply w⊙m after the patch


@dataclass
class _Live:
    """In-memory view of one federation, rebuilt from the store after a restart."""

    config: FederationCreate
    strategy: Strategy
    version: int
    weights: Weights
    state: dict[str, np.ndarray]  # strategy arrays + the server's broadcast residual
    members: set[str]  # agents ever selected: the only ones that may read its models
    needs: dict[str, int]  # agent -> the training memory it said this federation's task needs
    updates: RoundUpdates | None = None  # the open attempt's accepted updates
    round_started: float = dataclasses.field(default_factory=time.time)
    # width levels of (version, round) and, for the open round, the level each agent got
    levels: tuple[tuple[int, int], list[PlannedLevel]] | None = None
    assigned: dict[str, int] = dataclasses.field(default_factory=dict)
    unfit: dict[str, int] = dataclasses.field(default_factory=dict)  # agent -> the smallest level's need
    slices: dict[tuple[int, int, int], bytes] = dataclasses.field(default_factory=dict)  # served level slices
    # agent -> until when it said "not now" (device policy); in memory only: after a restart
    # it is sampled again and, if its policy still says no, declines again
    not_now: dict[str, float] = dataclasses.field(default_factory=dict)


class CoordinatorService:
    def __init__(self, settings: CoordinatorSettings) -> None:
        self.settings = settings
        self.store = Store(settings.db_url, settings.blob_dir)
        self.auth = Auth(settings, self.store)
        self.board = TaskBoard()
        self.lock = threading.RLock()
        self.evaluator = Evaluator(torch_threads=settings.torch_threads)
        self.exports = ExportCache(settings.data_dir / "exports", self.evaluator, threads=settings.torch_threads)
        self.backoff = Backoff()
        self._live: dict[str, _Live] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_tick = time.time()
        self._failed: dict[str, str | None] = {}  # federation -> reason, as of the last tick
        # bytes served per (federation, round), counted in memory and written once per tick
        # (a download must not cost a durable write: 200 agents fetch at once); a SIGKILL
        # loses at most one tick's count
        self._served: dict[tuple[str, int], int] = {}
        self._served_lock = threading.Lock()
        # model rows by (federation, version): written once, never changed, read per download
        self._model_rows: dict[tuple[str, int], dict[str, Any]] = {}
        self.blob_cache = BlobCache(max_bytes=256 << 20)
        self.metrics = Metrics()  # this coordinator's Prometheus registry (GET /metrics)
        # accepted uploads are recorded in batches: one transaction (one fsync) per batch
        self._commits: GroupCommit[_Upload, tuple[bool, bool]] = GroupCommit(self._commit_uploads)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run_scheduler, name="fedslim-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.board.close()
        if self._thread:
            self._thread.join(timeout=30)
        with contextlib.suppress(Exception):  # best effort: counters noted since the last tick
            self.auth.flush_seen()
            self._flush_served()
        self.store.close()

    def _run_scheduler(self) -> None:
        while not self._stop.wait(self.settings.tick_s):
            try:
                self.tick()
            except Exception:  # listing federations failed (database down): next tick
                log.exception("scheduler tick failed")

    def health(self) -> dict[str, Any]:
        """In-memory only: answers while the database or a round close is slow."""
        now = time.time()
        failing = self.backoff.snapshot(now)
        failed = [{"federation_id": f, "reason": r} for f, r in sorted(self._failed.items())]
        stalled = now - self.last_tick > max(30.0, 50 * self.settings.tick_s)
        return {"status": "stalled" if stalled else "degraded" if failing or failed else "ok",
                "scheduler_last_tick_s": round(now - self.last_tick, 3),
                "failing_federations": failing, "failed_federations": failed}

    # ------------------------------------------------------------------ federations
    def create_federation(self, config: FederationCreate) -> FederationRow:
        try:
            strategy = build_strategy(config.strategy.name, config.strategy.params)
            check_federation(config, self.settings)  # model size, eval memory: before allocating
            if self.evaluator.has_test_set(config):
                self.evaluator.test_data(config)  # the data must load now, not at round 1's close
            weights = self.evaluator.initial_weights(config)
            ctx = self._context(config, 0, 0)
            request = strategy.labelled_set()
            if request is not None:  # FedTiny's pre-training set: a bad path is refused here
                ctx = replace(ctx, labelled=load_labelled_set(config, request, self.evaluator.input_shape(config)))
            state = strategy.initial_state(weights, ctx)
            weights = round_for_broadcast(strategy.initial_weights(weights, ctx), config.download_values)
        except (ValueError, TypeError, OSError, KeyError, RuntimeError) as exc:  # RuntimeError: torch
            raise BadRequest(f"federation config refused: {str(exc)[:500]}") from None
        fid = uuid.uuid4().hex[:12]
        blob = self.store.blobs.put(encode_model(fid, 0, weights))
        state_blob = self.store.blobs.put(_npz(state)) if state else None
        mask_blob, _ = self._put_masks(state)
        row = FederationRow(fid, config.model_dump(mode="json"), FederationStatus.created.value, 0, 0, time.time())
        with self.store.tx() as conn:
            self.store.add_federation(conn, row)
            self.store.add_model(conn, fid, 0, blob, None, state_blob, mask_blob=mask_blob)
        return row

    def get_federation(self, fid: str) -> FederationRow:
        with self.store.tx() as conn:
            row = self.store.get_federation(conn, fid)
        if row is None:
            raise NotFound(f"federation {fid} not found")
        return row

    def list_federations(self) -> list[FederationRow]:
        with self.store.tx() as conn:
            return self.store.list_federations(conn)

    def set_status(self, fid: str, action: str) -> FederationRow:
        allowed = {
            "start": ({"created"}, "running"),
            "pause": ({"running"}, "paused"),
            "resume": ({"paused"}, "running"),
            "stop": ({"created", "running", "paused", "failed"}, "stopped"),
        }
        if action not in allowed:
            raise NotFound(f"unknown action {action!r}")
        sources, target = allowed[action]
        with self.lock, self.store.tx() as conn:
            row = self.store.get_federation(conn, fid)
            if row is None:
                raise NotFound(f"federation {fid} not found")
            if row.status not in sources:
                raise StaleUpdate(f"cannot {action} a federation that is {row.status}")
            self.store.update_federation(conn, fid, status=target)
        if target == "stopped":
            self.board.withdraw(fid)
            self._live.pop(fid, None)  # an upload checked before the stop cannot be recorded after it
        return self.get_federation(fid)

    def round_metrics(self, fid: str) -> list[dict[str, Any]]:
        self.get_federation(fid)
        with self.store.tx() as conn:
            return [r.metrics for r in self.store.list_rounds(conn, fid) if r.metrics]

    # ------------------------------------------------------------------ agents
    def list_agents(self) -> list[AgentRow]:
        with self.store.tx() as conn:
            return self.store.list_agents(conn)

    def agent_status(self, agent: AgentRow) -> str:
        if agent.revoked_at is not None:
            return "revoked"
        return "online" if time.time() - agent.last_seen <= self.settings.agent_timeout_s else "offline"

    def revoke_agent(self, agent_id: str) -> AgentRow:
        agent = self.auth.revoke(agent_id)
        if agent is None:
            raise NotFound(f"agent {agent_id} not found")
        return agent

    # ------------------------------------------------------------------ models
    def check_reader(self, token: str | None, fid: str) -> None:
        """The admin reads every federation; an agent only those it was selected for."""
        if not self.check_reader_in_memory(token, fid):
            fed = self.get_federation(fid)
            with self.lock:
                live = self._load(fed)
            agent = self.auth.agent(token)
            if agent.id not in live.members:
                raise Forbidden(f"agent {agent.id} takes no part in federation {fid}")

    def check_reader_in_memory(self, token: str | None, fid: str) -> bool:
        """`check_reader` from memory alone (safe on the event loop): True when allowed,
        Forbidden/Unauthorized when not, False when the federation is not loaded yet."""
        if self.auth.is_admin(token):
            return True
        agent = self.auth.agent(token)
        live = self._live.get(fid)  # a dict read: no lock, so downloads never queue behind a close
        if live is None:
            return False
        if agent.id not in live.members:
            raise Forbidden(f"agent {agent.id} takes no part in federation {fid}")
        return True

    def model_bytes(self, fid: str, version: int | None, *, patch: bool = False,
                    reshape: bool = False, mask: bool = False) -> Served:
        """Full model (codec kind=model), the patch from version-1, the reshape (JSON) into
        `version`, or its mask artifact (`sparse_kernels.masks`; with `patch`, the mask
        patch from version-1's); counts the bytes."""
        served = self.model_bytes_in_memory(fid, version, patch=patch, reshape=reshape, mask=mask)
        if served is not None:
            return served
        row = self.get_federation(fid)
        version = row.model_version if version is None else version
        m = self._model_row(fid, version)
        digest = _artifact_digest(m, fid, version, patch=patch, reshape=reshape, mask=mask)
        data = self.blob_cache.get(digest, self.store.blobs.get)
        self._count_served(fid, row.current_round + 1, len(data))
        return Served(version, data, m["reshape_blob"] is not None, m["mask_blob"] or "")

    def model_bytes_in_memory(self, fid: str, version: int | None, *, patch: bool = False,
                              reshape: bool = False, mask: bool = False) -> Served | None:
        """`model_bytes` without the database or the disk (safe on the event loop), while
        a round is open and the artifact is cached; None otherwise. Model rows never
        change once written, so a cached row cannot be stale."""
        live, entry = self._live.get(fid), self.board.current(fid)
        if live is None or entry is None:
            return None
        version = live.version if version is None else version
        m = self._model_rows.get((fid, version))
        if m is None:
            return None
        data = self.blob_cache.peek(_artifact_digest(m, fid, version, patch=patch, reshape=reshape, mask=mask))
        if data is None:
            return None
        self._count_served(fid, entry.round, len(data))
        return Served(version, data, m["reshape_blob"] is not None, m["mask_blob"] or "")

    def _model_row(self, fid: str, version: int) -> dict[str, Any]:
        m = self._model_rows.get((fid, version))
        if m is None:
            with self.store.tx() as conn:
                m = self.store.get_model(conn, fid, version)
            if m is None:
                raise NotFound(f"model version {version} of federation {fid} not found")
            with self._served_lock:  # evicting iterates the dict: no insert may race it
                if len(self._model_rows) >= _MODEL_ROWS_CACHED:
                    self._model_rows.pop(next(iter(self._model_rows)))  # oldest first
                self._model_rows[(fid, version)] = m
        return m

    def _count_served(self, fid: str, rnd: int, n: int) -> None:
        with self._served_lock:
            self._served[(fid, rnd)] = self._served.get((fid, rnd), 0) + n

    def _put_masks(self, state: dict[str, np.ndarray], before: dict[str, np.ndarray] | None = None,
                   ) -> tuple[str | None, str | None]:
        """Store the mask artifact of the strategy's "mask/<name>" arrays and, when the
        previous version's (`before`) differ, the mask patch between them: their sha256s."""
        masks = masks_from_state(state)
        if not masks:
            return None, None
        data = encode_masks(masks)
        old = masks_from_state(before or {})
        patch = mask_patch(old, masks) if old and encode_masks(old) != data else None
        return self.store.blobs.put(data), self.store.blobs.put(patch) if patch is not None else None

    def level_model_bytes(self, fid: str, version: int, rnd: int, level: int) -> bytes:
        """The slice of width level `level` of round `rnd` of model `version` (codec
        kind=model, the slice's shapes): what an agent of that level downloads instead of
        the whole model. Served for the current version only; counts the bytes."""
        fed = self.get_federation(fid)
        with self.lock:
            live = self._load(fed)
            if version != live.version:
                raise NotFound(f"level slices are served for the current version {live.version} only, not {version}")
            levels = self._levels(live, rnd)
            if not 0 <= level < len(levels):
                raise NotFound(f"round {rnd} of federation {fid} has {len(levels)} width level(s); no level {level}")
            key = (version, rnd, level)
            cached = live.slices.get(key)
            if cached is None:
                cached = encode_model(fid, version, apply_reshape(live.weights, levels[level].level.reshape))
                live.slices = {key: cached, **{k: v for k, v in live.slices.items() if k[:2] == key[:2]}}
        with self._served_lock:
            served = (fid, fed.current_round + 1)
            self._served[served] = self._served.get(served, 0) + len(cached)
        return cached

    def export(self, fid: str, level: int | None = None) -> tuple[Path, dict[str, Any]]:
        """The current global model (or its width level `level`) as verified ONNX + its
        report (built once per version and level)."""
        fed = self.get_federation(fid)
        with self.lock:
            live = self._load(fed)
            cfg, weights, version = live.config, live.weights, live.version
        try:
            return self.exports.get(fid, version, cfg, weights, level)
        except ValueError as exc:
            raise NotFound(str(exc)) from None

    # ------------------------------------------------------------------ tasks
    async def next_task(self, agent: AgentRow, wait_s: float) -> bytes | None:
        """Long poll: a train task (JSON) for `agent`, or None after `wait_s` seconds."""
        return await self.board.wait_for(agent.id, max(0.0, min(wait_s, self.settings.long_poll_s)))

    def _task_json(self, fed: FederationRow, live: _Live, row: RoundRow) -> bytes:
        cfg = live.config
        with self.store.tx() as conn:
            base = self.store.get_model(conn, fed.id, row.base_version)
        task = Task(
            federation_id=fed.id, round=row.round, model=cfg.model, in_channels=cfg.in_channels,
            num_classes=cfg.num_classes, image_size=cfg.image_size, model_version=row.base_version,
            training=_training_for_round(cfg, row.round),
            strategy=cfg.strategy.model_copy(update={
                "params": {**cfg.strategy.params, **live.strategy.task_params(row.round, live.weights, live.state)}
            }),
            deadline=row.deadline, memory_budget_mb=cfg.memory_budget_mb,
            model_sha256=base["blob"] if base else "", seed=cfg.seed, download_values=cfg.download_values,
            mask_sha256=(base["mask_blob"] or "") if base else "",
            levels=task_levels(self._levels(live, row.round)),
            model_shapes={k: list(v.shape) for k, v in live.weights.items()} if cfg.levels is not None else {},
            **_model_identity(cfg),
            input=cfg.data.input, evaluate=cfg.data.evaluation_mode() != "server",
        )
        return task.model_dump_json().encode()

    # ------------------------------------------------------------------ uploads
    def check_upload(self, agent: AgentRow, fid: str, rnd: int, client_ip: str = "unknown") -> None:
        """What can be refused before the body is read: rate, federation, round, selection.
        An agent that already uploaded to this round passes (its retry is answered after
        the body, as a duplicate or a conflict)."""
        if not self.check_upload_in_memory(agent, fid, rnd, client_ip):
            self.check_upload_in_store(agent, fid, rnd)

    def check_upload_in_store(self, agent: AgentRow, fid: str, rnd: int) -> None:
        """`check_upload` for a round that is not the published open one (after a restart,
        a stale or a wrong round), from the store."""
        fed = self.get_federation(fid)
        with self.store.tx() as conn:
            row = self.store.get_round(conn, fid, rnd)
            previous = self.store.get_update(conn, fid, rnd, agent.id)
        if previous is not None:
            return
        if row is None or row.round != fed.current_round + 1 or row.status != "open":
            raise StaleUpdate(f"round {rnd} of federation {fid} is not open (current round {fed.current_round + 1})")
        if agent.id not in row.selected:
            raise StaleUpdate(f"agent {agent.id} was not selected for round {rnd}")

    def check_upload_in_memory(self, agent: AgentRow, fid: str, rnd: int, client_ip: str = "unknown") -> bool:
        """The rate limit, then `check_upload` from memory (safe on the event loop): True
        when the round is the published open one and the agent was selected for it; False
        when only the store can tell."""
        self.auth.check_upload_rate(agent, client_ip)
        entry = self.board.current(fid)
        return entry is not None and entry.round == rnd and agent.id in entry.selected

    def submit_update(self, agent: AgentRow, fid: str, rnd: int, body: bytes, report: UpdateReport) -> tuple[bool, bool]:
        """Validate, store durably, fold once. Returns (accepted, duplicate). Raises a
        domain error, leaving the round and the global model untouched, when anything is
        wrong (storage errors propagate before anything is folded).

        Decoding and the blob's fsync run outside `self.lock` (they are the slow part and
        touch nothing shared). The update is then recorded through the group commit
        (`_commit_uploads`): before it is, the attempt it was checked against must still
        be the open one (the same `RoundUpdates` object)."""
        if len(body) > self.settings.max_upload_bytes:
            raise PayloadTooLarge(f"update of {len(body)} bytes exceeds {self.settings.max_upload_bytes}")
        digest = hashlib.sha256(body).hexdigest()
        target = self._upload_target(agent, fid, rnd, digest)
        if target is None:
            return True, True  # an idempotent retry: counted once
        live, updates, base_version, deadline = target
        try:
            shapes = updates.shapes_for(report.level)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        delta = validate_upload(fid, rnd, base_version, body, shapes, live.config.max_update_norm,
                                self.settings.max_upload_bytes)
        self.store.blobs.put(body)
        return self._commits.submit(_Upload(agent.id, fid, rnd, digest, len(body), report, self.auth.budget(agent),
                                            delta, live, updates, deadline))

    def _commit_uploads(self, batch: Sequence[_Upload]) -> list[tuple[bool, bool] | BaseException]:
        """The group commit's leader: under `self.lock`, check each upload against the
        attempt it was validated for (and against the batch's earlier ones: a twin or a
        copy inside one batch is caught as across batches), record every acceptable one
        in one transaction, then fold them. A storage error refuses the whole batch
        before anything is folded."""
        outcomes: list[tuple[bool, bool] | BaseException] = []
        accept: list[_Upload] = []
        with self.lock:
            in_batch: dict[str, str] = {}  # agent -> digest, of this batch's accepted uploads
            for u in batch:
                try:
                    outcomes.append(self._admit(u, in_batch))
                    if outcomes[-1] == _ACCEPTED:
                        accept.append(u)
                        in_batch[u.agent_id] = u.digest
                except (StaleUpdate, BadRequest) as exc:
                    outcomes.append(exc)
            if not accept:
                return outcomes
            try:
                with self.store.tx() as conn:
                    for u in accept:
                        if u.updates.key[1] > 1:  # an upload from an earlier attempt of this round goes
                            self.store.delete_update(conn, u.fid, u.rnd, u.agent_id)
                        # the budget the agent had stated when it uploaded, beside its planned/measured peaks
                        self.store.add_update(conn, u.fid, u.rnd, UpdateRow(
                            u.agent_id, u.updates.key[1], u.report.num_samples, u.nbytes, u.digest,
                            {**u.report.model_dump(), "budget_bytes": u.budget_bytes},
                        ))
            except Exception as exc:  # noqa: BLE001 - nothing of the batch is folded; each upload hears why
                return [exc if o == _ACCEPTED else o for o in outcomes]
            for u in accept:
                u.updates.add(u.agent_id, u.delta, u.report.num_samples, digest=u.digest, nbytes=u.nbytes,
                              level=u.report.level)
                self.board.mark_done(u.fid, u.rnd, u.updates.key[1], u.agent_id)
        return outcomes

    def _admit(self, u: _Upload, in_batch: dict[str, str]) -> tuple[bool, bool]:
        """_ACCEPTED when `u` may be recorded, (True, True) for an idempotent retry;
        StaleUpdate when the round moved on or the update is a conflict or a copy."""
        updates = u.updates
        if self._live.get(u.fid) is not u.live or u.live.updates is not updates:
            raise StaleUpdate(f"round {u.rnd} of federation {u.fid} moved on while the update was checked")
        if u.agent_id in updates.folded or u.agent_id in in_batch:  # a concurrent twin of this upload got in first
            if in_batch.get(u.agent_id) == u.digest or updates.digests.get(u.digest) == u.agent_id:
                return True, True
            raise StaleUpdate(f"agent {u.agent_id} already uploaded a different update for round {u.rnd}")
        if time.time() > u.deadline:
            raise StaleUpdate(f"round {u.rnd} deadline passed")
        owner = updates.digests.get(u.digest) or next((a for a, d in in_batch.items() if d == u.digest), None)
        if owner is not None and any(t.values.size for t in u.delta.tensors):
            # updates are bound to their uploader: a copy of another agent's counts never
            # (empty deltas are exempt: two idle agents may honestly send the same bytes)
            raise StaleUpdate(f"this update was already uploaded by agent {owner}")
        return _ACCEPTED

    def _upload_target(self, agent: AgentRow, fid: str, rnd: int,
                       digest: str) -> tuple[_Live, RoundUpdates, int, float] | None:
        """(federation, the open attempt's updates, base version, deadline) an upload goes
        into; None when this exact update is already in; StaleUpdate when it may not go in.

        From memory, without `self.lock`, when the round is the published open one: uploads
        must not queue behind a batch's commit just to start decoding, and `_admit` checks
        again under the lock. Else from the store, under the lock."""
        live, entry = self._live.get(fid), self.board.current(fid)
        if live is not None and entry is not None and live.updates is not None and entry.round == rnd \
                and live.updates.key == (entry.round, entry.attempt):
            updates = live.updates
            if agent.id not in entry.selected:
                raise StaleUpdate(f"agent {agent.id} was not selected for round {rnd}")
            if agent.id in updates.folded:
                if updates.digests.get(digest) == agent.id:
                    return None
                raise StaleUpdate(f"agent {agent.id} already uploaded a different update for round {rnd}")
            if time.time() > entry.deadline:
                raise StaleUpdate(f"round {rnd} deadline passed")
            return live, updates, live.version, entry.deadline
        with self.lock:
            return self._stored_target(agent, fid, rnd, digest)

    def _stored_target(self, agent: AgentRow, fid: str, rnd: int,
                       digest: str) -> tuple[_Live, RoundUpdates, int, float] | None:
        """`_upload_target` for a round this process has not published (after a restart,
        or a stale one), from the store. Under `self.lock`."""
        fed = self.get_federation(fid)
        with self.store.tx() as conn:
            row = self.store.get_round(conn, fid, rnd)
            previous = self.store.get_update(conn, fid, rnd, agent.id)
        if previous is not None and previous.blob == digest and (row is None or previous.attempt == row.attempt):
            return None
        if fed.status not in _ACTIVE:
            raise StaleUpdate(f"federation {fid} is {fed.status}")
        if row is None or row.round != fed.current_round + 1 or row.status != "open":
            raise StaleUpdate(f"round {rnd} of federation {fid} is not open (current round {fed.current_round + 1})")
        if agent.id not in row.selected:
            raise StaleUpdate(f"agent {agent.id} was not selected for round {rnd}")
        if previous is not None and previous.attempt == row.attempt:
            raise StaleUpdate(f"agent {agent.id} already uploaded a different update for round {rnd}")
        if time.time() > row.deadline:
            raise StaleUpdate(f"round {rnd} deadline passed")
        live = self._load(fed)
        return live, self._updates(fid, live, row), row.base_version, row.deadline

    def _updates(self, fid: str, live: _Live, row: RoundRow) -> RoundUpdates:
        """The attempt's accepted updates, rebuilt from the store when the process has not
        seen this attempt (a restart): each stored update folded exactly once."""
        key = (row.round, row.attempt)
        if live.updates is None or live.updates.key != key:
            cfg = live.config
            updates = RoundUpdates(key, upload_shapes(live.strategy, row.round, live.weights, live.state), cfg.aggregation,
                                   clip_bound(cfg.aggregation, live.weights),
                                   wants_squares=live.strategy.wants_second_moment,
                                   levels=[p.level.reshape for p in self._levels(live, row.round)])
            with self.store.tx() as conn:
                stored = self.store.list_updates(conn, fid, row.round, row.attempt)
                declined = self.store.list_declines(conn, fid, row.round, row.attempt)
            for u in stored:
                level = u.report.get("level")
                delta = decode(self.store.blobs.get(u.blob), expected=updates.shapes_for(level),
                               max_bytes=max(self.settings.max_upload_bytes, u.bytes))
                updates.add(u.agent_id, delta, u.num_samples, digest=u.blob, nbytes=u.bytes, level=level)
            updates.declined = {d["agent_id"]: d["needed_bytes"] for d in declined}
            live.updates = updates
        return live.updates

    # ------------------------------------------------------------------ scheduling
    def tick(self, now: float | None = None) -> None:
        """One pass over the federations; each in isolation (a failure backs it off and,
        if it persists, fails it alone)."""
        now = time.time() if now is None else now
        self.last_tick = time.time()
        self.auth.flush_seen()  # before sampling: who is online
        active: set[str] = set()
        federations = self.list_federations()
        self._failed = {f.id: f.error for f in federations if f.status == FederationStatus.failed.value}
        for fed in federations:
            if fed.status not in _ACTIVE:
                continue
            active.add(fed.id)
            if not self.backoff.ready(fed.id, now):
                continue
            try:
                with self.lock:
                    self._tick_one(fed, now)
                if fed.error is not None:
                    with self.store.tx() as conn:
                        self.store.update_federation(conn, fed.id, error=None)
                self.backoff.clear(fed.id)
            except Exception as exc:
                self._record_failure(fed, exc, now)
        self.board.keep_only(active)
        self._flush_served()

    def _flush_served(self) -> None:
        with self._served_lock:
            served, self._served = self._served, {}
        if not served:
            return
        try:
            with self.store.tx() as conn:
                for (fid, rnd), n in served.items():
                    self.store.add_download_bytes(conn, fid, rnd, n)
        except Exception:  # keep the counts for the next tick
            with self._served_lock:
                for key, n in served.items():
                    self._served[key] = self._served.get(key, 0) + n
            raise

    def _record_failure(self, fed: FederationRow, exc: Exception, now: float) -> None:
        verdict = self.backoff.record(fed.id, exc, now)
        reason = f"{type(exc).__name__}: {exc}"[:500]
        log.error("federation %s: %s (%s)", fed.id, reason, verdict, exc_info=verdict == "fail")
        try:
            if verdict == "fail":
                self._give_up(fed, reason)
                self.backoff.clear(fed.id)
                return
            self._forget(fed)
            with self.store.tx() as conn:
                self.store.update_federation(conn, fed.id, error=f"retrying: {reason}")
        except Exception:  # the database itself is down: the back-off carries the state
            log.exception("federation %s: could not record the failure", fed.id)

    def _forget(self, fed: FederationRow) -> None:
        """Drop `fed`'s in-memory round state and published task (rebuilt from durable state
        on the next try)."""
        with self.lock:
            self._live.pop(fed.id, None)
        self.board.withdraw(fed.id)

    def _give_up(self, fed: FederationRow, reason: str) -> None:
        """Fail `fed` for good with `reason`: nothing of its open round is folded, its global
        model stays as it was. Raises if the store cannot record it (then it is retried)."""
        self._forget(fed)
        with self.store.tx() as conn:
            self.store.update_federation(conn, fed.id, status=FederationStatus.failed.value, error=reason)
        self._failed = {**self._failed, fed.id: reason}

    def _tick_one(self, fed: FederationRow, now: float) -> None:
        with self.store.tx() as conn:
            rnd = self.store.get_round(conn, fed.id, fed.current_round + 1)
        if rnd is None or rnd.status == "closed":
            self.board.withdraw(fed.id)
            if fed.status == "running":
                self._maybe_open(fed, now, attempt=1)
            return
        live = self._load(fed)
        updates = self._updates(fed.id, live, rnd)
        decision = rules.round_decision(
            received=updates.count, declined=len(updates.declined), selected=len(rnd.selected),
            min_clients=live.config.min_clients, deadline=rnd.deadline, now=now,
        )
        if decision == "close":
            self.board.withdraw(fed.id)
            self._close_round(fed, live, rnd, updates, now)
        elif decision == "retry" and fed.status == "running":
            limit = live.config.max_round_attempts
            if limit is not None and rnd.attempt >= limit:
                reason = (f"round {rnd.round}: {updates.count} of the {live.config.min_clients} updates "
                          f"needed after {rnd.attempt} attempts (max_round_attempts)")
                log.error("federation %s: failed: %s", fed.id, reason)
                self._give_up(fed, reason)
                return
            self._maybe_open(fed, now, attempt=rnd.attempt + 1)
        else:
            self._publish(fed, live, rnd)

    def _publish(self, fed: FederationRow, live: _Live, row: RoundRow) -> None:
        entry = self.board.current(fed.id)
        if entry is not None and (entry.round, entry.attempt) == (row.round, row.attempt):
            return
        done = set(live.updates.folded) if live.updates and live.updates.key == (row.round, row.attempt) else set()
        task = self._task_json(fed, live, row)
        self.board.publish(OpenRound(fed.id, row.round, row.attempt, frozenset(row.selected), row.deadline,
                                     task, done, task_for=self._level_tasks(live, row, task)))

    # ------------------------------------------------------------------ width levels
    def _levels(self, live: _Live, rnd: int) -> list[PlannedLevel]:
        """The width levels of round `rnd` over the live weights ([] without levels)."""
        if live.config.levels is None:
            return []
        key = (live.version, rnd)
        if live.levels is None or live.levels[0] != key:
            live.levels = (key, plan_levels(live.config, live.weights, rnd))
        return live.levels[1]

    def _level_tasks(self, live: _Live, row: RoundRow, task: bytes) -> dict[str, bytes]:
        """Per selected agent, the task naming its level (one bytes object per level)."""
        levels = self._levels(live, row.round)
        if not levels:
            return {}
        if not set(row.selected) <= set(live.assigned):  # after a restart: from the stated budgets
            with self.store.tx() as conn:
                budgets = {a.id: self.auth.budget(a) for a in self.store.list_agents(conn) if a.id in row.selected}
            live.assigned = {a: assign_level(levels, b) or 0 for a, b in budgets.items()}
        parsed = Task.model_validate_json(task)
        by_level = {i: parsed.model_copy(update={"level": i}).model_dump_json().encode() for i in range(len(levels))}
        return {a: by_level[live.assigned.get(a, 0)] for a in row.selected}

    def _maybe_open(self, fed: FederationRow, now: float, attempt: int) -> None:
        live = self._load(fed)
        cfg = live.config
        with self.store.tx() as conn:
            agents = self.store.list_agents(conn)
        candidates = [a.id for a in agents if now - a.last_seen <= self.settings.agent_timeout_s
                      and a.revoked_at is None and live.not_now.get(a.id, 0.0) <= now
                      and self._fits(live, a, fed.current_round + 1)]
        selected = rules.select_clients(
            candidates, cfg.clients_per_round, cfg.min_clients, seed=cfg.seed, rnd=fed.current_round + 1, attempt=attempt,
        )
        if selected is None:
            return
        levels = self._levels(live, fed.current_round + 1)
        if levels:
            budgets = {a.id: self.auth.budget(a) for a in agents if a.id in selected}
            live.assigned = {a: assign_level(levels, budgets[a]) or 0 for a in selected}
        row = RoundRow(fed.id, fed.current_round + 1, "open", attempt, fed.model_version, selected,
                       now, now + cfg.round_deadline_s, None, None)
        with self.store.tx() as conn:
            self.store.put_round(conn, row)
        live.members.update(selected)
        live.round_started = now if attempt == 1 else live.round_started
        self.metrics.round_opened()
        log.info("federation %s: round %d opened (attempt %d) with %d agents", fed.id, row.round, attempt, len(selected))
        self._publish(fed, live, row)

    def _fits(self, live: _Live, agent: AgentRow, rnd: int) -> bool:
        """False for an agent that declined this federation's task for want of memory and has
        not stated a budget that large since, or whose budget fits none of the width levels
        (then `live.unfit` says what the smallest level needs)."""
        budget = self.auth.budget(agent)
        levels = self._levels(live, rnd)
        if levels and budget is not None and assign_level(levels, budget) is None:
            live.unfit[agent.id] = levels[-1].need_bytes
            return False
        live.unfit.pop(agent.id, None)
        need = live.needs.get(agent.id)
        if need is None:
            return True
        return budget is not None and budget >= need

    def decline_task(self, agent: AgentRow, fid: str, rnd: int, decline: TaskDecline) -> bool:
        """Record that `agent` cannot train round `rnd` (returns False if it already said so);
        the round stops waiting for it. Raises StaleUpdate like an upload would."""
        with self.lock:
            target = self._upload_target(agent, fid, rnd, digest="")
            assert target is not None  # None means "this upload is already in": "" is no digest
            live, updates, _, _ = target
            if agent.id in updates.declined:
                return False
            with self.store.tx() as conn:
                self.store.add_decline(conn, fid, rnd, agent.id, updates.key[1], decline.needed_bytes, decline.reason)
            updates.declined[agent.id] = decline.needed_bytes
            if decline.needed_bytes is not None:
                live.needs[agent.id] = decline.needed_bytes
            else:  # "not now": the retry (or the next round) samples someone else meanwhile
                live.not_now[agent.id] = time.time() + (decline.retry_after_s or self.settings.not_now_s)
            self.board.mark_done(fid, rnd, updates.key[1], agent.id)
        log.info("federation %s round %d: agent %s declined (%s)", fid, rnd, agent.id, decline.reason)
        return True

    def agent_needs(self) -> dict[str, dict[str, int]]:
        with self.store.tx() as conn:
            return self.store.needs_by_agent(conn)

    def _close_round(self, fed: FederationRow, live: _Live, row: RoundRow, updates: RoundUpdates, now: float) -> None:
        closing = time.perf_counter()
        cfg = live.config
        with self.store.tx() as conn:
            ups = self.store.list_updates(conn, fed.id, row.round, row.attempt)
        aggregating = time.perf_counter()
        mean, aux, squares = updates.reduce(live.strategy.fill)
        ctx = dataclasses.replace(self._context(cfg, row.round, len(ups)), mean_sq_delta=squares, aux=aux)
        strategy_state = {k: v for k, v in live.state.items() if not k.startswith(RESIDUAL_PREFIX)}
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is detected just below
            result = live.strategy.aggregate(ctx, live.weights, mean, strategy_state)
        self.metrics.aggregated(time.perf_counter() - aggregating)
        bad = [k for k, v in result.weights.items() if not np.isfinite(v).all()]
        if bad:
            raise FederationFailed(f"round {row.round}: the aggregate is not finite in {', '.join(bad[:3])}")
        version = fed.model_version + 1
        # the version's keep-masks: applied after the patch here and by every agent
        masks = masks_from_state(result.state)
        cast = make_broadcast(fed.id, version, live.weights, live.state, result,
                              density=warmup_density(cfg.download_density, row.round, cfg.density_warmup_rounds),
                              values=cfg.download_values, masks=masks or None, energy=cfg.download_energy)
        state = {**result.state, **cast.residual}
        mode = cfg.data.evaluation_mode()
        evaluation = self.evaluator.evaluate(cfg, cast.weights) if mode != "federated" else None
        levels = self._level_metrics(cfg, cast.weights, updates) if cfg.levels is not None else None
        with self._served_lock:
            served = self._served.pop((fed.id, row.round), 0)
        with self.store.tx() as conn:
            bytes_down = self.store.download_bytes(conn, fed.id, row.round) + served
        metrics = round_metrics(
            rnd=row.round, attempt=row.attempt, selected=len(row.selected), updates=ups, weights=cast.weights,
            accuracy=evaluation.accuracy if evaluation else None, loss=evaluation.loss if evaluation else None,
            macs=self.evaluator.macs(cfg, cast.weights),
            bytes_down=bytes_down, seconds=now - live.round_started, budget_mb=cfg.memory_budget_mb,
            clipped=updates.clipped, rule=cfg.aggregation.rule, strategy_metrics=result.metrics,
            declined=updates.declined, evaluation=mode,
        )
        if levels is not None:
            metrics["levels"] = levels
        full_blob = self.store.blobs.put(encode_model(fed.id, version, cast.weights))
        patch_blob = self.store.blobs.put(cast.patch) if cast.patch is not None else None
        reshape_blob = self.store.blobs.put(cast.reshape) if cast.reshape is not None else None
        state_blob = self.store.blobs.put(_npz(state)) if state else None
        mask_blob, mask_patch_blob = self._put_masks(result.state, live.state)
        done = row.round >= cfg.rounds + live.strategy.setup_rounds(live.weights)
        with self.store.tx() as conn:  # one transaction: round closed + new model + federation
            if served:
                self.store.add_download_bytes(conn, fed.id, row.round, served)
            self.store.add_model(conn, fed.id, version, full_blob, patch_blob, state_blob, reshape_blob, mask_blob,
                                 mask_patch_blob)
            self.store.put_round(conn, RoundRow(fed.id, row.round, "closed", row.attempt, row.base_version,
                                                row.selected, row.opened_at, row.deadline, now, metrics))
            self.store.update_federation(conn, fed.id, current_round=row.round, model_version=version,
                                         status="completed" if done else fed.status)
        live.version, live.weights, live.state, live.updates = version, cast.weights, state, None
        live.round_started = time.time()
        self.metrics.round_closed(time.perf_counter() - closing)
        log.info("federation %s: round %d closed: accuracy %s (%s), %d participants", fed.id, row.round,
                 "n/a" if metrics["accuracy"] is None else f"{metrics['accuracy']:.4f}", mode, len(ups))

    def _level_metrics(self, cfg: FederationCreate, weights: Weights, updates: RoundUpdates) -> list[dict[str, Any]]:
        """Per width level of the new global model (first windows for `rolling`): test
        accuracy and loss (BN re-estimated per level), MACs, and who trained it."""
        assert cfg.levels is not None
        out = []
        for i, level in enumerate(level_slices(cfg.model, weights, cfg.levels.width_list(), rule=cfg.levels.rule, rnd=0,
                                               in_channels=cfg.in_channels, num_classes=cfg.num_classes,
                                               image_size=cfg.image_size)):
            ev = self.evaluator.evaluate(cfg, apply_reshape(weights, level.reshape),
                                         calibrate=cfg.levels.bn_calibration_samples)
            out.append({"level": i, "width": level.width, "accuracy": ev.accuracy, "loss": ev.loss, "macs": level.macs,
                        "params": int(sum(math.prod(s) for k, s in level.shapes.items() if not is_bn_stat(k))),
                        "agents": sorted(a for a, lv in updates.level_of.items() if (lv or 0) == i)})
        return out

    def unfit(self, agent_id: str) -> dict[str, int]:
        """Federation -> the smallest budget (bytes) one of its width levels needs, for the
        running federations whose levels all exceed `agent_id`'s stated budget."""
        with self.lock:
            return {fid: live.unfit[agent_id] for fid, live in self._live.items() if agent_id in live.unfit}

    def widths(self) -> dict[str, dict[str, float]]:
        """Agent -> federation -> the width of the level it was given in the open round."""
        out: dict[str, dict[str, float]] = {}
        with self.lock:
            for fid, live in self._live.items():
                if live.levels is None:
                    continue
                for agent, i in live.assigned.items():
                    if i < len(live.levels[1]):
                        out.setdefault(agent, {})[fid] = live.levels[1][i].width
        return out

    # ------------------------------------------------------------------ loading
    def _load(self, fed: FederationRow) -> _Live:
        live = self._live.get(fed.id)
        if live is not None and live.version == fed.model_version:
            return live
        config = FederationCreate.model_validate(fed.config)
        with self.store.tx() as conn:
            m = self.store.get_model(conn, fed.id, fed.model_version)
            members = {a for r in self.store.list_rounds(conn, fed.id) for a in r.selected}
            needs = {d["agent_id"]: int(d["needed_bytes"]) for d in self.store.list_declines(conn, fed.id)
                     if d["needed_bytes"] is not None}
        if m is None:
            raise FederationFailed(f"federation {fed.id} has no model version {fed.model_version}")
        weights = decode(self.store.blobs.get(m["blob"]), max_bytes=MAX_MODEL_BLOB).to_dense()
        state = _from_npz(self.store.blobs.get(m["state_blob"])) if m["state_blob"] else {}
        strategy = build_strategy(config.strategy.name, config.strategy.params)
        live = _Live(config, strategy, fed.model_version, weights, state, members, needs)
        self._live[fed.id] = live
        return live

    @staticmethod
    def _context(cfg: FederationCreate, rnd: int, participants: int) -> RoundContext:
        return RoundContext(rnd, cfg.rounds, cfg.model, cfg.in_channels, cfg.num_classes, cfg.image_size, participants)


def _artifact_digest(m: dict[str, Any], fid: str, version: int, *, patch: bool, reshape: bool, mask: bool) -> str:
    """The blob of one artifact of model row `m`; NotFound when the version has none."""
    what = ("mask_patch" if mask and patch else "mask" if mask else "reshape" if reshape
            else "patch" if patch else "blob")
    digest = m[f"{what}_blob"] if what != "blob" else m["blob"]
    if digest is None:
        raise NotFound(f"no {what.replace('_', ' ')} {'of' if mask else 'into'} version {version}")
    return str(digest)


def _model_identity(cfg: FederationCreate) -> dict[str, str]:
    """The Task fields that let an agent check it builds the same model (a plugin at the
    same version): `models.zoo.model_identity`, cached per name, origin and shape."""
    identity = model_identity(cfg.model, in_channels=cfg.in_channels, num_classes=cfg.num_classes,
                              image_size=cfg.image_size)
    return {"model_fingerprint": identity.fingerprint, "model_origin": identity.origin}


def _training_for_round(cfg: FederationCreate, rnd: int) -> TrainingConfig:
    """The task's training settings: the federation's, with round `rnd`'s upload density
    under the density warm-up."""
    if not cfg.density_warmup_rounds:
        return cfg.training
    density = warmup_density(cfg.training.upload_density, rnd, cfg.density_warmup_rounds)
    return cfg.training.model_copy(update={"upload_density": density})
