"""The agent's main loop: poll → sync the model → train → upload, surviving coordinator
restarts and flaky networks. Durable state (token, cached model, error-feedback
residual) lives in a state directory as JSON and .npz (never pickle)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from coordinator.protocol import Task, UpdateReport
from edge_agent.budget import rss_bytes
from edge_agent.client import CoordinatorClient, CoordinatorRefused, CoordinatorUnavailable
from edge_agent.levels import SliceSource, local_slices, train_level
from edge_agent.local import (
    BudgetExceeded,
    apply_mask_artifact,
    evaluate_global,
    initial_mask_artifact,
    initial_weights,
    run_task,
    with_mask,
)
from edge_agent.local_data import LocalData, LocalDataError, holdout_split, to_dataset
from edge_agent.policy import Policy, decide, read_conditions
from models import ImageDataset
from models.zoo import model_identity
from sparse_kernels import MAX_MODEL_BYTES, CodecError, ErrorFeedback, Weights, decode
from sparse_kernels.masks import apply_mask_patch
from sparse_kernels.npz import escape_key, unescape_key
from sparse_kernels.patch import apply_delta, encode_model
from sparse_kernels.reshape import apply_reshape, decode_reshape

__all__ = ["MAX_ABS_WEIGHT", "AgentState", "EdgeAgent", "ModelMismatch", "UnsafeModel", "check_identity", "check_model"]

log = logging.getLogger("fedslim.agent")
_MAX_PATCH_CHAIN = 4  # further behind than this, a full download is cheaper
# No trained network of the zoo's kind comes near this; a global model past it was
# poisoned or diverged, and training from it would only spread NaNs.
MAX_ABS_WEIGHT = 1e8


class UnsafeModel(ValueError):
    """A downloaded global model that is not safe to train from (NaN/Inf, absurd values)."""


class ModelMismatch(ValueError):
    """This agent's build of the task's model differs from the coordinator's (another
    plugin version, or the plugin missing): training it would mix two structures."""


def check_identity(task: Task) -> None:
    """Raise ModelMismatch unless `task.model` builds here what it built on the coordinator
    (a task without a fingerprint, from an older coordinator, is not checked)."""
    if not task.model_fingerprint:
        return
    try:
        mine = model_identity(task.model, in_channels=task.in_channels, num_classes=task.num_classes,
                              image_size=task.image_size)
    except ValueError as exc:  # unknown here: the plugin is not installed on this device
        raise ModelMismatch(f"model {task.model!r} ({task.model_origin}) cannot be built here: {exc}") from None
    if mine.fingerprint != task.model_fingerprint:
        raise ModelMismatch(
            f"model {task.model!r}: the coordinator has {task.model_origin}, this agent {mine.origin}, and they "
            f"build different structures (fingerprint {task.model_fingerprint[:12]} vs {mine.fingerprint[:12]}); "
            "install the coordinator's version on this device")


def check_model(weights: Weights, *, bound: float = MAX_ABS_WEIGHT) -> None:
    """Raise UnsafeModel unless every tensor is finite and within ±bound."""
    for name, w in weights.items():
        if not np.isfinite(w).all():
            raise UnsafeModel(f"{name}: NaN or Inf in the global model")
        if w.size and float(np.abs(w).max()) > bound:
            raise UnsafeModel(f"{name}: |w| up to {float(np.abs(w).max()):.3g} exceeds {bound:.3g}")


@dataclass
class AgentState:
    """What survives a restart, under `root`."""

    root: Path

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    @property
    def identity(self) -> dict[str, str]:
        path = self.root / "identity.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def save_identity(self, agent_id: str, token: str, url: str) -> None:
        path, tmp = self.root / "identity.json", self.root / "identity.json.tmp"
        # created 0600 (never readable by others, not even for a moment), then renamed into place
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"agent_id": agent_id, "agent_token": token, "url": url}, f)
        os.chmod(tmp, 0o600)  # O_CREAT's mode applies only to a new file
        os.replace(tmp, path)

    def load_arrays(self, name: str) -> tuple[dict[str, str], Weights] | None:
        path = self.root / f"{name}.npz"
        if not path.exists():
            return None
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["__meta__"]))
            return meta, {unescape_key(k): z[k] for k in z.files if k != "__meta__"}

    def save_arrays(self, name: str, meta: dict[str, object], arrays: Weights) -> None:
        tmp = self.root / f"{name}.tmp.npz"
        np.savez(tmp, __meta__=np.array(json.dumps(meta)), **{escape_key(k): v for k, v in arrays.items()})  # type: ignore[arg-type]
        tmp.replace(self.root / f"{name}.npz")


@dataclass
class EdgeAgent:
    client: CoordinatorClient
    # a benchmark split, or the device's own files (mapped to each task's input spec)
    data: ImageDataset | LocalData
    state: AgentState
    memory_budget_bytes: int | None = None  # the training working set (bytes)
    # the whole process's resident set (bytes): what the device can give this agent; the
    # working-set budget is then what is left of it above the idle process, now
    memory_limit_bytes: int | None = None
    seed: int = 0
    progress: bool = False
    policy: Policy | None = None  # when the device may train (power, time window, temperature)
    holdout_fraction: float = 0.1  # held out for federated evaluation, when a task asks for it
    _model: tuple[str, int, Weights] | None = field(default=None, init=False)  # (federation, version, weights)
    _mapped: tuple[str, ImageDataset] | None = field(default=None, init=False)  # (input spec JSON, dataset)
    _mask: tuple[str, bytes] | None = field(default=None, init=False)  # (sha256, mask artifact)

    # ------------------------------------------------------------------ model sync
    def sync_model(self, federation_id: str, version: int, task: Task | None = None) -> Weights:
        """The global weights at `version`: cached, patched forward, rebuilt from the
        seed (version 0, checked against the task's sha256), or downloaded."""
        if task is not None and version == 0 and task.model_sha256:
            rebuilt = initial_weights(task)
            if hashlib.sha256(encode_model(federation_id, 0, rebuilt)).hexdigest() == task.model_sha256:
                return self._remember(federation_id, 0, rebuilt)
        if self._model is None:
            cached = self.state.load_arrays("model")
            if cached:
                self._model = (cached[0]["federation"], int(cached[0]["version"]), cached[1])
        if self._model and self._model[0] == federation_id and 0 <= version - self._model[1] <= _MAX_PATCH_CHAIN:
            have, weights = self._model[1], {k: v.copy() for k, v in self._model[2].items()}
            try:
                for v in range(have + 1, version + 1):
                    patch, reshaped, mask = self.client.download_patch(federation_id, v)
                    if reshaped:  # channels were pruned: slice what we hold, then patch
                        shapes = {k: w.shape for k, w in weights.items()}
                        weights = apply_reshape(weights, decode_reshape(self.client.download_reshape(federation_id, v), shapes))
                    apply_delta(weights, decode(patch))
                    if mask:  # then w⊙m, as the coordinator did after this patch
                        weights = apply_mask_artifact(weights, self.mask_artifact(federation_id, v, mask))
                return self._remember(federation_id, version, weights)
            except (CoordinatorRefused, KeyError, CodecError) as exc:  # no patch (structure changed): full download
                log.info("patch path unavailable (%s); downloading the full model", exc)
        full = decode(self.client.download_model(federation_id, version), max_bytes=MAX_MODEL_BYTES)
        return self._remember(federation_id, version, full.to_dense())

    def task_mask(self, task: Task) -> bytes:
        """The mask artifact `task` names: rebuilt from the seed at version 0 (as the model
        is, sha256 checked), else `mask_artifact`."""
        if task.model_version == 0:
            rebuilt = initial_mask_artifact(task)
            if rebuilt is not None and hashlib.sha256(rebuilt).hexdigest() == task.mask_sha256:
                return self._keep_mask(task.mask_sha256, rebuilt)
        return self.mask_artifact(task.federation_id, task.model_version, task.mask_sha256)

    def mask_artifact(self, federation_id: str, version: int, sha256: str) -> bytes:
        """`version`'s mask artifact: cached (memory, then the state directory) when its
        sha256 is the one named; else the mask patch applied to the one held (version-1's,
        when this agent kept up), else downloaded whole; checked against the sha256
        named (UnsafeModel if not)."""
        if self._mask is None and (self.state.root / "mask.bin").exists():
            data = (self.state.root / "mask.bin").read_bytes()
            self._mask = (hashlib.sha256(data).hexdigest(), data)  # the file's own digest: no stale trust
        if self._mask is not None and self._mask[0] == sha256:
            return self._mask[1]
        if self._mask is not None:
            try:
                held = self._mask[1]
                shapes = {t.name: t.shape for t in decode(held).tensors}
                patched = apply_mask_patch(held, self.client.download_mask_patch(federation_id, version), shapes=shapes)
                if hashlib.sha256(patched).hexdigest() == sha256:
                    return self._keep_mask(sha256, patched)
                log.info("mask patch into version %d does not fit the mask held; downloading it whole", version)
            except (CoordinatorRefused, CodecError) as exc:
                log.info("mask patch into version %d unavailable (%s); downloading it whole", version, exc)
        data = self.client.download_mask(federation_id, version)
        if hashlib.sha256(data).hexdigest() != sha256:
            raise UnsafeModel(f"mask artifact of version {version}: sha256 differs from the one named")
        return self._keep_mask(sha256, data)

    def _keep_mask(self, sha256: str, data: bytes) -> bytes:
        tmp = self.state.root / "mask.bin.tmp"
        tmp.write_bytes(data)
        tmp.replace(self.state.root / "mask.bin")
        self._mask = (sha256, data)
        return data

    def _remember(self, federation_id: str, version: int, weights: Weights) -> Weights:
        check_model(weights)  # before it is cached: a poisoned model is never kept
        self._model = (federation_id, version, weights)
        self.state.save_arrays("model", {"federation": federation_id, "version": version}, weights)
        return {k: v.copy() for k, v in weights.items()}

    # ------------------------------------------------------------------ one task
    def _slices(self, task: Task) -> SliceSource:
        """Level slices: cut from the seeded initial model when this agent can rebuild it
        (version 0) or from the global model when its level is the whole model (cached and
        patched as without levels), else downloaded (the current version's slice only)."""
        if task.model_version == 0 and task.model_sha256:
            rebuilt = initial_weights(task)
            if hashlib.sha256(encode_model(task.federation_id, 0, rebuilt)).hexdigest() == task.model_sha256:
                return local_slices(task, rebuilt)
        if not task.levels[task.level or 0].slices:  # the whole model: the cached model and its patches
            return local_slices(task, self.sync_model(task.federation_id, task.model_version, task))

        def download(level: int) -> Weights:
            data = self.client.download_level(task.federation_id, task.model_version, level, task.round)
            weights = decode(data, max_bytes=MAX_MODEL_BYTES).to_dense()
            check_model(weights)
            return weights

        return download

    def _feedback(self, federation_id: str, shapes: dict[str, tuple[int, ...]]) -> ErrorFeedback:
        feedback = ErrorFeedback()
        saved = self.state.load_arrays("residual")
        if saved and saved[0].get("federation") == federation_id and all(
            k in shapes and shapes[k] == v.shape for k, v in saved[1].items()
        ):
            feedback.load_state_dict(saved[1])  # else the structure changed: start afresh
        return feedback

    def datasets(self, task: Task) -> tuple[ImageDataset, ImageDataset | None]:
        """(train, held out) for `task`: local files mapped to its input spec (LocalDataError
        when they do not fit it), with a seeded held-out split only when it asks to evaluate."""
        data = self.data
        if isinstance(data, LocalData):
            if task.input is None:
                raise LocalDataError(f"{data.path}: federation {task.federation_id} declares no input spec "
                                     "(data.input: shape, classes), so local files cannot be mapped to it")
            key = task.input.model_dump_json()
            if self._mapped is None or self._mapped[0] != key:
                self._mapped = (key, to_dataset(data, task.input))
            data = self._mapped[1]
        if not task.evaluate:
            return data, None
        return holdout_split(data, self.holdout_fraction, self.seed)

    def handle(self, task: Task) -> None:
        if time.time() > task.deadline:
            log.warning("round %d: deadline already passed, skipping", task.round)
            return
        check_identity(task)  # before any download: a different build cannot use the weights
        data, held = self.datasets(task)  # before any download: bad data sends nothing
        kw: dict[str, Any] = {"memory_budget_bytes": self.working_budget(), "seed": self.seed,
                              "progress": self.progress}
        evaluated: dict[str, Any] = {}
        if task.levels:  # a width level: only the slice is downloaded
            shapes = {k: tuple(v) for k, v in task.model_shapes.items()}
            feedback = self._feedback(task.federation_id, shapes)
            result = train_level(task, self._slices(task), data, feedback, **kw)
        else:
            weights = self.sync_model(task.federation_id, task.model_version, task)
            if task.mask_sha256:  # the mask is the artifact the task names, never the zeros downloaded
                artifact = self.task_mask(task)
                weights = apply_mask_artifact(weights, artifact)
                task = with_mask(task, artifact)
            if held is not None:  # the global model as received, before local training changes it
                ev = evaluate_global(task, weights, held)
                evaluated = {"eval_samples": ev.samples, "eval_loss": ev.loss, "eval_accuracy": ev.accuracy}
            feedback = self._feedback(task.federation_id, {k: v.shape for k, v in weights.items()})
            result = run_task(task, weights, data, feedback, **kw)
        report = UpdateReport.model_validate({**result.report.model_dump(), **evaluated,
                                              "memory_limit_bytes": self.memory_limit_bytes})
        receipt = self.client.upload_update(task.federation_id, task.round, result.body, report)
        self.state.save_arrays("residual", {"federation": task.federation_id}, feedback.state_dict())
        log.info("round %d: uploaded %d bytes (loss %.4f, %d samples, peak %.1f MB)%s", task.round,
                 len(result.body), result.report.train_loss, result.report.num_samples,
                 result.report.peak_memory_bytes / 2**20, " (duplicate)" if receipt.duplicate else "")

    def working_budget(self) -> int | None:
        """The training working-set budget: the explicit one, and with a process memory
        limit at most the limit minus the resident set now (at least 1 byte: a limit the
        idle process already fills fits nothing, and the plan says what would)."""
        budget = self.memory_budget_bytes
        if self.memory_limit_bytes is not None:
            headroom = max(1, self.memory_limit_bytes - rss_bytes())
            budget = headroom if budget is None else min(budget, headroom)
        return budget

    def _not_now(self, task: Task) -> bool:
        """True if the device policy says no: the coordinator is told so (a decline without
        needed_bytes) and samples another device meanwhile."""
        if self.policy is None or not self.policy.active:
            return False
        decision = decide(self.policy, read_conditions(self.policy.sysfs), datetime.now())
        if decision.ok:
            return False
        log.info("round %d: not now: %s", task.round, decision.reason)
        try:
            self.client.decline_task(task.federation_id, task.round, reason=f"not now: {decision.reason}",
                                     retry_after_s=self.policy.retry_after_s)
        except (CoordinatorRefused, CoordinatorUnavailable) as exc:
            log.warning("round %d: could not decline (%s)", task.round, exc)
        return True

    def _skip(self, task: Task) -> None:
        """Wait out a refused task's round, so the next poll does not hand it back."""
        time.sleep(max(0.0, min(task.deadline - time.time(), 30.0)))

    # ------------------------------------------------------------------ the loop
    def run(self, *, max_tasks: int | None = None, idle_exit_s: float | None = None, poll_s: float = 20.0) -> int:
        """Work until `max_tasks` tasks are done or no task came for `idle_exit_s`."""
        done, idle_since = 0, time.monotonic()
        while max_tasks is None or done < max_tasks:
            try:
                task = self.client.poll_task(poll_s, memory_budget_bytes=self.working_budget())
            except CoordinatorUnavailable as exc:
                log.warning("coordinator unreachable (%s); retrying", exc)
                task = None
                time.sleep(1.0)
            if task is None:
                if idle_exit_s is not None and time.monotonic() - idle_since > idle_exit_s:
                    break
                continue
            if self._not_now(task):
                idle_since = time.monotonic()
                continue
            try:
                self.handle(task)
                done += 1
            except BudgetExceeded as exc:  # say so: the round stops waiting, we are not resampled
                log.error("round %d: %s", task.round, exc)
                try:
                    self.client.decline_task(task.federation_id, task.round, reason=str(exc),
                                             needed_bytes=exc.needed_bytes)
                except (CoordinatorRefused, CoordinatorUnavailable) as refused:
                    log.warning("round %d: could not decline (%s)", task.round, refused)
                    time.sleep(poll_s)
            except ModelMismatch as exc:  # say why: the operator sees which side to upgrade
                log.error("round %d: declined: %s", task.round, exc)
                try:
                    self.client.decline_task(task.federation_id, task.round, reason=str(exc))
                except (CoordinatorRefused, CoordinatorUnavailable) as refused:
                    log.warning("round %d: could not decline (%s)", task.round, refused)
                    self._skip(task)  # undeclined, the same task would come back at once
            except LocalDataError as exc:  # nothing was sent; the round stops waiting for us
                log.error("round %d: declined: %s", task.round, exc)
                try:
                    self.client.decline_task(task.federation_id, task.round, reason=str(exc)[:500])
                except (CoordinatorRefused, CoordinatorUnavailable) as refused:
                    log.warning("round %d: could not decline (%s)", task.round, refused)
                self._skip(task)
            except CoordinatorRefused as exc:
                log.warning("round %d: coordinator refused: %s", task.round, exc)
                if exc.status == 401:
                    raise
                self._skip(task)  # the same task would be refused again: no busy loop
            except CoordinatorUnavailable as exc:
                log.warning("round %d: upload failed (%s)", task.round, exc)
            except (UnsafeModel, CodecError) as exc:  # refuse the model, keep serving
                log.error("round %d: skipped: the global model was refused (%s)", task.round, exc)
                self._skip(task)
            except (ValueError, RuntimeError, KeyError) as exc:  # a model or task we cannot train
                log.error("round %d: skipped: %s", task.round, exc, exc_info=True)
                self._skip(task)
            idle_since = time.monotonic()
        return done
