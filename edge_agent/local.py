"""One task's local work as a function: build the model from the global weights, plan
memory, train, and return the compressed delta with a report. No HTTP here.

Plans that hold: the plan is made with the strategy's hooks built (their
`extra_memory_bytes` in the estimate), and after the first `RECHECK_STEPS` steps the
measured peak is compared with the budget; over it, the round restarts from the global
weights at half the batch (down to the planner's smallest), logged as a re-plan."""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from coordinator.protocol import Task, UpdateReport
from edge_agent.budget import BudgetExceeded, PeakMemoryMeter, TrainingPlan, plan_training, shrunk_batch, trim_heap
from models import ImageDataset, evaluate, train_epochs
from models.state import build_from_state, seeded_weights, to_numpy_state
from models.training import EvalStats, TrainStats, iterate_batches
from sparse_kernels import (
    SMALL_TENSOR,
    DeltaMeta,
    ErrorFeedback,
    ModelDelta,
    SparseTensor,
    Weights,
    encode,
)
from sparse_kernels.masks import decode_masks, encode_masks
from sparse_kernels.patch import round_for_broadcast
from strategies.base import RoundContext
from strategies.masking import MASK_PARAM, apply_np_masks
from strategies.registry import agent_half, hooks_for

__all__ = ["RECHECK_STEPS", "BudgetExceeded", "LocalResult", "Planner", "apply_mask_artifact", "default_threads",
           "evaluate_global", "initial_mask_artifact", "initial_weights", "run_task", "scaled_lr", "warm_up", "with_mask"]

log = logging.getLogger("fedslim.agent")

# Steps before the measured peak is compared with the budget: the second step is the
# first to hold optimizer state and the previous gradients (steady state), one more for margin.
RECHECK_STEPS = 3
# the planner's smallest batch (`plan_training`'s batch_sizes): a re-plan never goes below
MIN_BATCH = 4
# (model, input shape, budget, *, preferred_batch, optimizer, hooks_bytes) → the plan;
# `plan_training`, or a test's planner with a made-up estimate
Planner = Callable[..., TrainingPlan]


def apply_mask_artifact(weights: Weights, artifact: bytes) -> Weights:
    """w⊙m with a mask artifact (validated against the weights' shapes, CodecError if it
    does not fit): what the coordinator did after the same patch, so pruned coordinates
    are exactly 0 in what this agent holds however the patch was compressed."""
    return apply_np_masks(weights, decode_masks(artifact, shapes={k: v.shape for k, v in weights.items()}))


def with_mask(task: Task, artifact: bytes) -> Task:
    """`task` with its verified mask artifact in the strategy params (`MASK_PARAM`), where
    the method's agent half reads it (`strategies.masking.agent_masks`)."""
    params = {**task.strategy.params, MASK_PARAM: artifact}
    return task.model_copy(update={"strategy": task.strategy.model_copy(update={"params": params})})


class _OverBudget(Exception):
    """Raised from the step hook at the re-check: the measured peak is over the budget."""

    def __init__(self, peak_bytes: int) -> None:
        super().__init__(peak_bytes)
        self.peak_bytes = peak_bytes


@dataclass(frozen=True)
class LocalResult:
    body: bytes  # the encoded update
    report: UpdateReport
    delta: ModelDelta
    replans: int = 0  # batch halvings after the re-check (the report's batch_size is the last)


def run_task(task: Task, weights: Weights, data: ImageDataset, feedback: ErrorFeedback, *,
             memory_budget_bytes: int | None = None, seed: int = 0, progress: bool = False,
             planner: Planner = plan_training, level: int | None = None) -> LocalResult:
    """Train `task` from `weights` (the global model, or the slice of width level `level`)
    on `data` and return the encoded update with its report."""
    cfg = task.training
    budget = memory_budget_bytes
    if budget is None and task.memory_budget_mb:
        budget = int(task.memory_budget_mb * 2**20)
    batch_size: int | None = None  # None: plan; else the re-plan's batch
    replans = 0
    while True:
        model = build_from_state(task.model, weights, in_channels=task.in_channels,
                                 num_classes=task.num_classes, image_size=task.image_size)
        # The hooks first: the plan covers what they hold (masks, copies, gradient buffers).
        hooks = hooks_for(task.strategy.name, task.strategy.params, model, weights, data)
        plan = None
        if budget is not None:
            own = {} if hooks.optimizer_memory is None else {  # the hooks' optimizer: what it holds
                "optimizer_memory": partial(_with_momentum, hooks.optimizer_memory, bool(cfg.momentum))}
            plan = planner(model, data.input_shape, budget, preferred_batch=batch_size or cfg.batch_size,
                           optimizer="sgd_momentum" if cfg.momentum else "sgd",
                           hooks_bytes=hooks.extra_memory_frozen or hooks.extra_memory_bytes, **own)
            plan.apply(model)  # freezes what the plan froze (requires_grad off)
        batch = plan.batch_size if plan is not None else cfg.batch_size
        planned = plan.estimate.total if plan is not None else 0
        params = [p for p in model.parameters() if p.requires_grad]
        lr = scaled_lr(cfg.lr, batch, cfg.batch_size) if cfg.scale_lr_with_batch else cfg.lr
        make_optimizer = hooks.optimizer or _sgd
        optimizer = make_optimizer(params, lr, cfg.momentum, cfg.weight_decay)
        if hooks.train:
            warm_up(model, data)
        start = time.perf_counter()
        try:
            with PeakMemoryMeter() as meter, hooks.context:
                if hooks.train:
                    after_step = hooks.after_step if budget is None else _rechecked(
                        hooks.after_step, meter, budget, can_shrink=batch > MIN_BATCH)
                    # the strategy's own loop (AutoFLIP's scouts) or the plain one, clipped as configured
                    fit = hooks.fit or partial(train_epochs, clip_grad_norm=cfg.clip_grad_norm)
                    stats = fit(model, data, optimizer=optimizer, epochs=cfg.local_epochs, batch_size=batch,
                                seed=seed * 100_003 + task.round, progress=progress,
                                max_steps=cfg.max_steps, regularizer=hooks.regularizer, after_step=after_step)
                else:
                    stats = TrainStats(loss=0.0, accuracy=0.0, samples=len(data), steps=0, seconds=0.0)
        except _OverBudget as over:
            smaller = shrunk_batch(batch, over.peak_bytes, budget or 0, min_batch=MIN_BATCH)
            assert smaller is not None  # raised only over the budget and above the smallest batch
            replans += 1
            log.warning("re-plan %d: measured %d B after %d steps at batch %d, over the budget of %d B "
                        "(planned %d B); restarting the round at batch %d", replans, over.peak_bytes,
                        RECHECK_STEPS, batch, budget, planned, smaller)
            del model, hooks, optimizer, params, plan
            trim_heap()
            batch_size = smaller
            continue
        break
    if budget is not None and meter.peak_rise_bytes > budget:
        log.warning("training peak %d B over the budget of %d B at the smallest batch %d (planned %d B)",
                    meter.peak_rise_bytes, budget, batch, planned)
    aux = hooks.aux() if hooks.aux else {}
    meta = DeltaMeta(federation_id=task.federation_id, round=task.round, base_version=task.model_version,
                     num_samples=stats.samples, kind="delta")
    tensors: tuple[SparseTensor, ...] = ()  # statistics only: the residual waits for a training round
    if hooks.train and hooks.upload_delta:
        local = to_numpy_state(model)
        change = {k: local[k] - weights[k] for k in weights}
        if cfg.upload_density >= 1.0 and cfg.upload_values == "fp32" and cfg.upload_energy is None:
            tensors = tuple(SparseTensor.from_dense_nonzero(k, v) for k, v in change.items())
        else:
            tensors = feedback.compress(change, density=cfg.upload_density, meta=meta, values=cfg.upload_values,
                                        scope=cfg.upload_scope, min_dense_numel=SMALL_TENSOR,
                                        support=hooks.upload_support, energy=cfg.upload_energy).tensors
    extra = tuple(SparseTensor.from_dense_nonzero(k, np.asarray(v, dtype=np.float32)) for k, v in aux.items())
    delta = ModelDelta(meta, tensors + extra)
    body = encode(delta, values=hooks.upload_values or cfg.upload_values)
    report = UpdateReport(
        num_samples=max(stats.samples, 1), train_loss=float(np.nan_to_num(stats.loss, nan=1e9, posinf=1e9)),
        train_accuracy=stats.accuracy, train_seconds=time.perf_counter() - start,
        peak_memory_bytes=meter.peak_rise_bytes, planned_memory_bytes=planned,
        baseline_memory_bytes=meter.baseline_bytes, batch_size=batch, level=level,
        peak_rss_bytes=meter.baseline_bytes + meter.peak_rise_bytes,
    )
    return LocalResult(body, report, delta, replans)


def _with_momentum(memory: Callable[[tuple[str, ...], bool], tuple[int, int]], momentum: bool,
                   frozen: tuple[str, ...]) -> tuple[int, int]:
    return memory(frozen, momentum)


def _sgd(params: list[torch.nn.Parameter], lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


# small batches: evaluation runs inside the device's training memory budget, before training
EVAL_BATCH = 64


def evaluate_global(task: Task, weights: Weights, data: ImageDataset) -> EvalStats:
    """Loss and accuracy of the received global model `weights` on `data` (the held-out
    split): the agent's part of federated evaluation, run before it trains."""
    model = build_from_state(task.model, weights, in_channels=task.in_channels, num_classes=task.num_classes,
                             image_size=task.image_size)
    with torch.no_grad():
        stats = evaluate(model, data, batch_size=EVAL_BATCH)
    # a diverged model's loss is reported as a large finite number, as train_loss is
    return EvalStats(float(np.nan_to_num(stats.loss, nan=1e9, posinf=1e9)), stats.accuracy, stats.samples)


def scaled_lr(lr: float, batch: int, configured_batch: int) -> float:
    """The learning rate for a batch the budget shrank below the configured one (linear
    scaling rule); never above the configured rate."""
    return lr * min(1.0, batch / configured_batch)


def _rechecked(after_step: Callable[[], None] | None, meter: PeakMemoryMeter, budget: int, *,
               can_shrink: bool) -> Callable[[], None]:
    """`after_step` plus the re-check: after step `RECHECK_STEPS`, raise `_OverBudget` when
    the peak so far is over `budget` and the batch can still shrink (the caller re-plans)."""
    steps = 0

    def step() -> None:
        nonlocal steps
        if after_step is not None:
            after_step()
        steps += 1
        if steps == RECHECK_STEPS and can_shrink:
            peak = meter.peak_rise_so_far()
            if peak > budget:
                raise _OverBudget(peak)

    return step


def warm_up(model: torch.nn.Module, data: ImageDataset) -> None:
    """One forward and backward pass at batch 2 on a copy of `model`, so that one-off costs
    (kernel primitives for these shapes, thread pools, lazy imports: 5-20 MB on the first
    round of a process) land in the idle baseline, not in the measured training peak
    that the budget covers. The copy keeps the model's weights and BN statistics intact."""
    probe = copy.deepcopy(model)
    probe.train()
    x, y = next(iterate_batches(data, 2))
    torch.nn.functional.cross_entropy(probe(x), y).backward()
    del probe
    trim_heap()


def initial_weights(task: Task) -> Weights:
    """The federation's seeded initial model, built as the coordinator builds it: the
    seeded zoo model, transformed by the strategy's `initial_weights` (FedDIP's ERK mask,
    the gates of `dynamic`), rounded like the broadcasts. The caller checks the result
    against the task's sha256 and downloads on any mismatch."""
    weights = seeded_weights(task.model, task.seed, in_channels=task.in_channels, num_classes=task.num_classes,
                             image_size=task.image_size)
    weights = _strategy_initial(task, weights)
    return round_for_broadcast(weights, task.download_values)  # as the coordinator rounds it


def initial_mask_artifact(task: Task) -> bytes | None:
    """Version 0's mask artifact rebuilt as the coordinator built it (the strategy's
    round-0 masks of the seeded model, `AgentHalf.initial_masks`), or None when the agent
    half has none. The caller checks it against the task's mask_sha256."""
    try:
        half = agent_half(task.strategy.name)
    except ValueError:
        return None
    if half is None or half.initial_masks is None:
        return None
    weights = seeded_weights(task.model, task.seed, in_channels=task.in_channels, num_classes=task.num_classes,
                             image_size=task.image_size)
    try:
        ctx = RoundContext(0, 1, task.model, task.in_channels, task.num_classes, task.image_size, 0)
        masks = half.initial_masks(task.strategy.params, weights, ctx)
    except (ValueError, TypeError, KeyError) as exc:  # params it cannot read: the download is the fallback
        log.warning("cannot rebuild the initial mask (%s); downloading it", exc)
        return None
    return encode_masks(masks)


def _strategy_initial(task: Task, weights: Weights) -> Weights:
    # The agent half rebuilds the server half's round-0 transform from the task's params
    # (the constructor params plus per-round extras); nothing of the server is imported.
    try:
        half = agent_half(task.strategy.name)
    except ValueError:  # a strategy this agent does not know: the download is the fallback
        return weights
    if half is None or half.initial_weights is None:
        return weights
    try:
        ctx = RoundContext(0, 1, task.model, task.in_channels, task.num_classes, task.image_size, 0)
        return half.initial_weights(task.strategy.params, weights, ctx)
    except (ValueError, TypeError, KeyError) as exc:  # the download is the fallback
        log.warning("cannot rebuild the %s initial model locally (%s); downloading it", task.strategy.name, exc)
        return weights


def default_threads(agents_on_host: int) -> int:
    """Torch threads per agent so that co-located agents do not oversubscribe the cores."""
    return max(1, (os.cpu_count() or 1) // max(1, agents_on_host))

