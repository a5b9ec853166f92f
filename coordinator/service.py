"""The coordinator's state machine driver: federations, enrollment, tasks, uploads and
round closing, over the durable `Store`.

Concurrency: request handlers run in a thread pool and a scheduler thread ticks; one
re-entrant lock guards the in-memory caches (global weights, streaming accumulators),
and a condition on it wakes long-polling agents when a round opens.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from coordinator import rounds as rules
from coordinator.errors import (
    BadRequest,
    Forbidden,
    NotFound,
    PayloadTooLarge,
    StaleUpdate,
    Unauthorized,
)
from coordinator.evaluation import Evaluator
from coordinator.exports import ExportCache
from coordinator.protocol import (
    EnrollRequest,
    FederationCreate,
    FederationStatus,
    Task,
    UpdateReport,
)
from coordinator.settings import CoordinatorSettings
from coordinator.store import AgentRow, FederationRow, RoundRow, Store, UpdateRow
from models.state import is_bn_stat as _is_bn_stat
from sparse_kernels import (
    MAX_MODEL_BYTES,
    SMALL_TENSOR,
    CodecError,
    DeltaMeta,
    ErrorFeedback,
    ModelDelta,
    SparseAccumulator,
    SparseTensor,
    decode,
    encode,
)
from sparse_kernels.npz import arrays_from_npz as _from_npz
from sparse_kernels.npz import arrays_to_npz as _npz
from sparse_kernels.patch import apply_delta, encode_model
from sparse_kernels.patch import round_for_broadcast as _round_for_broadcast
from sparse_kernels.reshape import apply_reshape, encode_reshape
from strategies import AUX_PREFIX, RoundContext, RoundResult, Strategy, Weights, build_strategy

__all__ = ["CoordinatorService", "hash_token"]

log = logging.getLogger("fedslim.coordinator")


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass
class _Live:
    """In-memory view of one federation, rebuilt from the store after a restart."""

    config: FederationCreate
    strategy: Strategy
    version: int
    weights: Weights
    state: dict[str, np.ndarray]  # strategy arrays + the server's broadcast residual
    accumulator: SparseAccumulator | None = None
    squares: SparseAccumulator | None = None  # of squared deltas, when the strategy wants them
    accumulator_key: tuple[int, int] | None = None  # (round, attempt) it holds
    bytes_up: int = 0
    round_started: float = field(default_factory=time.time)


class CoordinatorService:
    def __init__(self, settings: CoordinatorSettings) -> None:
        self.settings = settings
        self.store = Store(settings.db_url, settings.blob_dir)
        self.lock = threading.RLock()
        self.round_opened = threading.Condition(self.lock)
        self.evaluator = Evaluator(torch_threads=settings.torch_threads)
        self.exports = ExportCache(settings.data_dir / "exports", self.evaluator, threads=settings.torch_threads)
        self._live: dict[str, _Live] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run_scheduler, name="fedslim-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self.round_opened:
            self.round_opened.notify_all()
        if self._thread:
            self._thread.join(timeout=30)
        self.store.close()

    def _run_scheduler(self) -> None:
        while not self._stop.wait(self.settings.tick_s):
            try:
                self.tick()
            except Exception:  # keep scheduling; the failure is in the log
                log.exception("scheduler tick failed")

    # ------------------------------------------------------------------ auth
    def check_admin(self, token: str | None) -> None:
        if not token:
            raise Unauthorized("missing bearer token")
        if secrets.compare_digest(token, self.settings.admin_token.get_secret_value()):
            return
        with self.store.tx() as conn:
            if self.store.agent_by_token_hash(conn, hash_token(token)):
                raise Forbidden("agent tokens cannot use admin endpoints")
        raise Unauthorized("invalid token")

    def authenticate_agent(self, token: str | None) -> AgentRow:
        if not token:
            raise Unauthorized("missing bearer token")
        with self.store.tx() as conn:
            agent = self.store.agent_by_token_hash(conn, hash_token(token))
            if agent is None:
                if secrets.compare_digest(token, self.settings.admin_token.get_secret_value()):
                    raise Forbidden("the admin token is not an agent token")
                raise Unauthorized("invalid agent token")
            self.store.touch_agent(conn, agent.id, time.time())
        return agent

    def enroll(self, req: EnrollRequest) -> tuple[str, str]:
        if not secrets.compare_digest(req.enrollment_token, self.settings.enrollment_token.get_secret_value()):
            raise Unauthorized("invalid enrollment token")
        agent_id, token = uuid.uuid4().hex[:16], secrets.token_urlsafe(32)
        now = time.time()
        info = {"memory_budget_bytes": req.memory_budget_bytes, "platform": req.platform}
        with self.store.tx() as conn:
            self.store.add_agent(conn, AgentRow(agent_id, req.name, hash_token(token), now, now, info))
        return agent_id, token

    def agent_status(self, agent: AgentRow) -> str:
        return "online" if time.time() - agent.last_seen <= self.settings.agent_timeout_s else "offline"

    def list_agents(self) -> list[AgentRow]:
        with self.store.tx() as conn:
            return self.store.list_agents(conn)

    # ------------------------------------------------------------------ federations
    def create_federation(self, config: FederationCreate) -> FederationRow:
        strategy = build_strategy(config.strategy.name, config.strategy.params)  # validate early
        try:
            self.evaluator.model_for(config)  # unknown model → clear error now
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        fid = uuid.uuid4().hex[:12]
        weights = self.evaluator.initial_weights(config)
        ctx = self._context(config, 0, 0)
        weights = _round_for_broadcast(strategy.initial_weights(weights, ctx), config.download_values)
        blob = self.store.blobs.put(encode_model(fid, 0, weights))
        row = FederationRow(fid, config.model_dump(mode="json"), FederationStatus.created.value, 0, 0, time.time())
        with self.store.tx() as conn:
            self.store.add_federation(conn, row)
            self.store.add_model(conn, fid, 0, blob, None, None)
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
            "stop": ({"created", "running", "paused"}, "stopped"),
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
        with self.round_opened:
            self.round_opened.notify_all()
        return self.get_federation(fid)

    def round_metrics(self, fid: str) -> list[dict[str, Any]]:
        self.get_federation(fid)
        with self.store.tx() as conn:
            return [r.metrics for r in self.store.list_rounds(conn, fid) if r.metrics]

    # ------------------------------------------------------------------ models
    def model_bytes(self, fid: str, version: int | None, *, patch: bool = False,
                    reshape: bool = False) -> tuple[int, bytes, bool]:
        """Full model (codec kind=model), the patch from version-1, or the reshape (JSON)
        into `version`; counts the bytes. The flag says whether `version` has a reshape."""
        row = self.get_federation(fid)
        version = row.model_version if version is None else version
        with self.lock, self.store.tx() as conn:  # the lock serialises the byte counter
            m = self.store.get_model(conn, fid, version)
            if m is None:
                raise NotFound(f"model version {version} of federation {fid} not found")
            digest = m["reshape_blob"] if reshape else m["patch_blob"] if patch else m["blob"]
            if digest is None:
                raise NotFound(f"no {'reshape' if reshape else 'patch'} into version {version}")
            data = self.store.blobs.get(digest)
            self.store.add_download_bytes(conn, fid, row.current_round + 1, len(data))
        return version, data, m["reshape_blob"] is not None

    def export(self, fid: str) -> tuple[Path, dict[str, Any]]:
        """The current global model as verified ONNX + its report (built once per version)."""
        fed = self.get_federation(fid)
        with self.lock:
            live = self._load(fed)
            cfg, weights, version = live.config, live.weights, live.version
        return self.exports.get(fid, version, cfg, weights)

    # ------------------------------------------------------------------ tasks
    def next_task(self, agent: AgentRow, wait_s: float) -> Task | None:
        """Long poll: a train task for `agent`, or None after `wait_s` seconds."""
        deadline = time.monotonic() + max(0.0, min(wait_s, self.settings.long_poll_s))
        with self.round_opened:
            while True:
                task = self._find_task(agent)
                if task or self._stop.is_set():
                    return task
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self.round_opened.wait(timeout=min(remaining, 1.0))

    def _find_task(self, agent: AgentRow) -> Task | None:
        with self.store.tx() as conn:
            for fed in self.store.list_federations(conn):
                if fed.status not in ("running", "paused"):
                    continue
                rnd = self.store.get_round(conn, fed.id, fed.current_round + 1)
                if rnd is None or rnd.status != "open" or agent.id not in rnd.selected:
                    continue
                if rnd.deadline <= time.time():  # its upload would be refused: not worth a download
                    continue
                done = self.store.get_update(conn, fed.id, rnd.round, agent.id)
                if done and done.attempt == rnd.attempt:
                    continue
                live = self._load(fed)
                cfg = live.config
                base = self.store.get_model(conn, fed.id, rnd.base_version)
                return Task(
                    federation_id=fed.id, round=rnd.round, model=cfg.model, in_channels=cfg.in_channels,
                    num_classes=cfg.num_classes, image_size=cfg.image_size, model_version=rnd.base_version,
                    training=cfg.training,
                    strategy=cfg.strategy.model_copy(update={
                        "params": {**cfg.strategy.params, **live.strategy.task_params(rnd.round, live.weights, live.state)}
                    }),
                    deadline=rnd.deadline, memory_budget_mb=cfg.memory_budget_mb,
                    model_sha256=base["blob"] if base else "", seed=cfg.seed,
                    download_values=cfg.download_values,
                )
        return None

    # ------------------------------------------------------------------ uploads
    def submit_update(self, agent: AgentRow, fid: str, rnd: int, body: bytes, report: UpdateReport) -> tuple[bool, bool]:
        """Validate and fold one update. Returns (accepted, duplicate). Raises a domain
        error, leaving the round and the global model untouched, when anything is wrong."""
        if len(body) > self.settings.max_upload_bytes:
            raise PayloadTooLarge(f"update of {len(body)} bytes exceeds {self.settings.max_upload_bytes}")
        with self.lock:
            fed = self.get_federation(fid)
            with self.store.tx() as conn:
                row = self.store.get_round(conn, fid, rnd)
                previous = self.store.get_update(conn, fid, rnd, agent.id)
            digest = hashlib.sha256(body).hexdigest()
            if previous is not None and previous.blob == digest and (row is None or previous.attempt == row.attempt):
                return True, True  # an idempotent retry: counted once
            if row is None or row.round != fed.current_round + 1 or row.status != "open":
                raise StaleUpdate(f"round {rnd} of federation {fid} is not open (current round {fed.current_round + 1})")
            if agent.id not in row.selected:
                raise StaleUpdate(f"agent {agent.id} was not selected for round {rnd}")
            if previous is not None and previous.attempt == row.attempt:
                raise StaleUpdate(f"agent {agent.id} already uploaded a different update for round {rnd}")
            if time.time() > row.deadline:
                raise StaleUpdate(f"round {rnd} deadline passed")
            live = self._load(fed)
            delta = self._validate(live, fid, row, body)
            self.store.blobs.put(body)
            with self.store.tx() as conn:
                if previous is not None:  # an upload from an earlier attempt of this round
                    self.store.delete_update(conn, fid, rnd, agent.id)
                self.store.add_update(conn, fid, rnd, UpdateRow(
                    agent.id, row.attempt, report.num_samples, len(body), digest, report.model_dump(),
                ))
            self._accumulator(fid, live, row)  # (re)built for this attempt
            self._fold(live, delta, float(report.num_samples))
            live.bytes_up += len(body)
        return True, False

    def _validate(self, live: _Live, fid: str, row: RoundRow, body: bytes) -> ModelDelta:
        shapes = _upload_shapes(live, row.round)
        try:
            delta = decode(body, expected=shapes, max_bytes=self.settings.max_upload_bytes)
        except CodecError as exc:
            raise BadRequest(f"malformed update: {exc}") from None
        meta = delta.meta
        if meta.federation_id != fid or meta.round != row.round or meta.base_version != row.base_version:
            raise StaleUpdate(
                f"update is for federation {meta.federation_id!r} round {meta.round} base {meta.base_version}; "
                f"expected {fid!r} round {row.round} base {row.base_version}"
            )
        bound = live.config.max_update_norm
        if bound:
            norm = float(np.sqrt(sum(float(np.dot(t.values, t.values)) for t in delta.tensors
                                     if not t.name.startswith(AUX_PREFIX))))
            if norm > bound:
                raise BadRequest(f"update norm {norm:.3g} exceeds the bound {bound:.3g}")
        return delta

    def _accumulator(self, fid: str, live: _Live, row: RoundRow) -> SparseAccumulator:
        key = (row.round, row.attempt)
        if live.accumulator is None or live.accumulator_key != key:
            live.accumulator = SparseAccumulator(_upload_shapes(live, row.round))
            shapes = {k: v.shape for k, v in live.weights.items()}
            live.squares = SparseAccumulator(shapes) if live.strategy.wants_second_moment else None
            live.accumulator_key = key
            live.bytes_up = 0
            # after a restart: refold what was durably accepted in this attempt
            with self.store.tx() as conn:
                for u in self.store.list_updates(conn, fid, row.round, row.attempt):
                    self._fold(live, decode(self.store.blobs.get(u.blob)), float(u.num_samples))
                    live.bytes_up += u.bytes
        return live.accumulator

    @staticmethod
    def _fold(live: _Live, delta: ModelDelta, weight: float) -> None:
        assert live.accumulator is not None
        live.accumulator.fold(delta, weight)
        if live.squares is not None:
            squared = tuple(SparseTensor(t.name, t.shape, t.indices, t.values * t.values) for t in delta.tensors
                            if not t.name.startswith(AUX_PREFIX))
            live.squares.fold(ModelDelta(delta.meta, squared), weight)

    # ------------------------------------------------------------------ scheduling
    def tick(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self.lock:
            for fed in self.list_federations():
                if fed.status not in ("running", "paused"):
                    continue
                with self.store.tx() as conn:
                    rnd = self.store.get_round(conn, fed.id, fed.current_round + 1)
                if rnd is None or rnd.status == "closed":
                    if fed.status == "running":
                        self._maybe_open(fed, now, attempt=1)
                    continue
                with self.store.tx() as conn:
                    received = len(self.store.list_updates(conn, fed.id, rnd.round, rnd.attempt))
                live = self._load(fed)
                decision = rules.round_decision(
                    received=received, selected=len(rnd.selected), min_clients=live.config.min_clients,
                    deadline=rnd.deadline, now=now,
                )
                if decision == "close":
                    self._close_round(fed, live, rnd, now)
                elif decision == "retry" and fed.status == "running":
                    self._maybe_open(fed, now, attempt=rnd.attempt + 1)

    def _maybe_open(self, fed: FederationRow, now: float, attempt: int) -> None:
        live = self._load(fed)
        cfg = live.config
        with self.store.tx() as conn:
            candidates = [a.id for a in self.store.list_agents(conn) if now - a.last_seen <= self.settings.agent_timeout_s]
        selected = rules.select_clients(
            candidates, cfg.clients_per_round, cfg.min_clients, seed=cfg.seed, rnd=fed.current_round + 1, attempt=attempt,
        )
        if selected is None:
            return
        row = RoundRow(fed.id, fed.current_round + 1, "open", attempt, fed.model_version, selected,
                       now, now + cfg.round_deadline_s, None, None)
        with self.store.tx() as conn:
            self.store.put_round(conn, row)
        live.round_started = now if attempt == 1 else live.round_started
        log.info("federation %s: round %d opened (attempt %d) with %d agents", fed.id, row.round, attempt, len(selected))
        self.round_opened.notify_all()

    def _close_round(self, fed: FederationRow, live: _Live, row: RoundRow, now: float) -> None:
        cfg = live.config
        acc = self._accumulator(fed.id, live, row)
        with self.store.tx() as conn:
            ups = self.store.list_updates(conn, fed.id, row.round, row.attempt)
        ctx = self._context(cfg, row.round, len(ups))
        if live.squares is not None:
            ctx = dataclasses.replace(ctx, mean_sq_delta=live.squares.mean(fill=live.strategy.fill))
        mean = acc.mean(fill=live.strategy.fill)
        aux = {k: mean.pop(k) for k in [k for k in mean if k.startswith(AUX_PREFIX)]}
        ctx = dataclasses.replace(ctx, aux=aux)
        strategy_state = {k: v for k, v in live.state.items() if not k.startswith("residual/")}
        result = live.strategy.aggregate(ctx, live.weights, mean, strategy_state)
        version = fed.model_version + 1
        new_weights, patch, reshape, residual = self._broadcast(fed.id, live, result, version)
        state = {**result.state, **residual}
        evaluation = self.evaluator.evaluate(cfg, new_weights)
        with self.store.tx() as conn:
            bytes_down = self.store.download_bytes(conn, fed.id, row.round)
        reports = [u.report for u in ups]
        metrics: dict[str, Any] = {
            "round": row.round, "accuracy": evaluation.accuracy, "loss": evaluation.loss,
            "participants": len(ups), "stragglers": len(row.selected) - len(ups),
            "bytes_up": sum(u.bytes for u in ups), "bytes_down": bytes_down,
            "seconds": round(now - live.round_started, 3), "attempts": row.attempt,
            "params": int(sum(v.size for k, v in new_weights.items() if not _is_bn_stat(k))),
            "density": _weight_density(new_weights),  # strategies with masks report their own
            "macs": self.evaluator.macs(cfg, new_weights),
            "train_loss": float(np.average([r["train_loss"] for r in reports], weights=[u.num_samples for u in ups])) if ups else None,
            "agent_peak_mb": max((r.get("peak_memory_bytes", 0) for r in reports), default=0) / 2**20,
            "agent_planned_mb": max((r.get("planned_memory_bytes", 0) for r in reports), default=0) / 2**20,
            "agent_budget_mb": cfg.memory_budget_mb,
            **result.metrics,
        }
        full_blob = self.store.blobs.put(encode_model(fed.id, version, new_weights))
        patch_blob = self.store.blobs.put(patch) if patch is not None else None
        reshape_blob = self.store.blobs.put(reshape) if reshape is not None else None
        state_blob = self.store.blobs.put(_npz(state)) if state else None
        done = row.round >= cfg.rounds + live.strategy.setup_rounds(live.weights)
        with self.store.tx() as conn:  # one transaction: round closed + new model + federation
            self.store.add_model(conn, fed.id, version, full_blob, patch_blob, state_blob, reshape_blob)
            self.store.put_round(conn, RoundRow(fed.id, row.round, "closed", row.attempt, row.base_version,
                                                row.selected, row.opened_at, row.deadline, now, metrics))
            self.store.update_federation(conn, fed.id, current_round=row.round, model_version=version,
                                         status="completed" if done else fed.status)
        live.version, live.weights, live.state = version, new_weights, state
        live.accumulator, live.squares, live.accumulator_key = None, None, None
        live.round_started = time.time()
        log.info("federation %s: round %d closed: accuracy %.4f, %d participants",
                 fed.id, row.round, evaluation.accuracy, len(ups))

    def _broadcast(self, fid: str, live: _Live, result: RoundResult,
                   version: int) -> tuple[Weights, bytes | None, bytes | None, dict[str, np.ndarray]]:
        """Turn the strategy's target weights into what agents will hold: the old weights
        (sliced to the new structure when channels were pruned) plus a (possibly sparse,
        quantised) patch, the rest kept in a server residual."""
        cfg, target = live.config, result.weights
        residual_before = {k.removeprefix("residual/"): v for k, v in live.state.items() if k.startswith("residual/")}
        base, reshape_bytes = live.weights, None
        if result.structure_changed:
            if result.reshape is None:  # structure unknown: a full download (fp16 when lossy anyway)
                return _round_for_broadcast(target, cfg.download_values), None, None, {}
            base = apply_reshape(live.weights, result.reshape)
            residual_before = apply_reshape(residual_before, result.reshape)
            reshape_bytes = encode_reshape(result.reshape)
        feedback = ErrorFeedback()
        feedback.load_state_dict(residual_before)
        change = {k: target[k] - base[k] for k in target}
        meta = DeltaMeta(federation_id=fid, round=version, base_version=version - 1, num_samples=0, kind="delta")
        if cfg.download_density >= 1.0 and cfg.download_values == "fp32":
            delta = ModelDelta(meta, tuple(SparseTensor.from_dense_nonzero(k, v) for k, v in change.items()))
        else:
            delta = feedback.compress(change, density=cfg.download_density, meta=meta, values=cfg.download_values,
                                      min_dense_numel=SMALL_TENSOR)
        patch = encode(delta, values=cfg.download_values)
        new_weights = {k: v.copy() for k, v in base.items()}
        apply_delta(new_weights, decode(patch))  # exactly what an agent will compute
        residual = {f"residual/{k}": v for k, v in feedback.state_dict().items()}
        return new_weights, patch, reshape_bytes, residual

    # ------------------------------------------------------------------ loading
    def _load(self, fed: FederationRow) -> _Live:
        live = self._live.get(fed.id)
        if live is not None and live.version == fed.model_version:
            return live
        config = FederationCreate.model_validate(fed.config)
        with self.store.tx() as conn:
            m = self.store.get_model(conn, fed.id, fed.model_version)
        assert m is not None, f"federation {fed.id} has no model version {fed.model_version}"
        weights = decode(self.store.blobs.get(m["blob"]), max_bytes=MAX_MODEL_BYTES).to_dense()
        state = _from_npz(self.store.blobs.get(m["state_blob"])) if m["state_blob"] else {}
        live = _Live(config, build_strategy(config.strategy.name, config.strategy.params), fed.model_version, weights, state)
        self._live[fed.id] = live
        return live

    @staticmethod
    def _context(cfg: FederationCreate, rnd: int, participants: int) -> RoundContext:
        return RoundContext(rnd, cfg.rounds, cfg.model, cfg.in_channels, cfg.num_classes, cfg.image_size, participants)


def _upload_shapes(live: _Live, rnd: int) -> dict[str, tuple[int, ...]]:
    """What an upload for round `rnd` may carry: the model's tensors and the strategy's
    auxiliary statistics."""
    aux = live.strategy.aux_shapes(rnd, live.weights, live.state)
    if any(not k.startswith(AUX_PREFIX) for k in aux):
        raise ValueError(f"auxiliary upload names must start with {AUX_PREFIX!r}: {sorted(aux)[:3]}")
    return {**{k: v.shape for k, v in live.weights.items()}, **aux}


def _weight_density(weights: Weights) -> float:
    """Nonzero fraction of the conv and linear weights (tensors with ≥ 2 dimensions)."""
    mats = [v for v in weights.values() if v.ndim >= 2]
    return sum(int(np.count_nonzero(v)) for v in mats) / max(sum(v.size for v in mats), 1)
