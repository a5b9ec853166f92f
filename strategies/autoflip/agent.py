"""Agent half of AutoFLIP (ALGORITHMS.md §3; server half in `strategies.autoflip.server`).

- Exploration (the task's params carry ``explore``): this client is a scout. It holds out
  a seeded validation split, trains θ₀ → θ_k on the rest for up to ``epochs`` epochs with
  early stopping (``patience``), and uploads (θ_k − θ₀)² of every parameter plus its extra
  local work as auxiliary statistics, in fp32 (squares of small moves underflow fp16). No
  delta goes up: exploration leaves the global model at θ₀, and the error-feedback
  residual waits for a training round.
- Training (``pruned``): the mask — the task's mask artifact (`strategies.masking.agent_masks`),
  never the downloaded zeros — is re-applied after every optimiser step and only masked
  coordinates are uploaded.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from models import ImageDataset
from models.state import to_numpy_state
from models.training import TrainStats
from pruning.masks import apply_masks, masked_weight_names
from strategies.autoflip.common import EXPLORE_EPOCHS, PATIENCE, VAL_FRACTION, scored_names, sq_key, work_key
from strategies.autoflip.ops import ScoutRun, squared_displacement, train_scout, validation_split
from strategies.base import LocalHooks, largest_bytes, masks_bytes
from strategies.masking import agent_masks

__all__ = ["autoflip_hooks", "scout_hooks"]


def autoflip_hooks(params: Mapping[str, Any], model: nn.Module, weights: dict[str, np.ndarray],
                   data: ImageDataset) -> LocalHooks:
    if "explore" in params:
        return scout_hooks(params["explore"], model, weights, data)
    if not params.get("pruned", False):
        return LocalHooks()
    masks = agent_masks(params, model, weights, [n for n in masked_weight_names(model) if n in weights])
    apply_masks(model, masks)  # already zero; makes the invariant hold from step 0

    def after_step() -> None:
        apply_masks(model, masks)

    # the boolean masks, and apply_masks' float copy of one mask after each step
    extra = masks_bytes(masks) + largest_bytes(masks)
    return LocalHooks(after_step=after_step, upload_support={n: m.cpu().numpy() for n, m in masks.items()},
                      extra_memory_bytes=extra)


def scout_hooks(spec: Mapping[str, Any], model: nn.Module, weights: dict[str, np.ndarray],
                data: ImageDataset) -> LocalHooks:
    """The exploration task's hooks: `fit` trains the scout in place of the task's epochs,
    `aux` reports its squared displacement from `weights` (θ₀) and its work."""
    epochs = int(spec.get("epochs", EXPLORE_EPOCHS))
    patience = int(spec.get("patience", PATIENCE))
    train_idx, val_idx = validation_split(len(data), float(spec.get("val_fraction", VAL_FRACTION)),
                                          int(spec.get("seed", 0)))
    train, val = data.subset(train_idx), data.subset(val_idx)
    runs: list[ScoutRun] = []  # the last is this task's (a memory re-plan restarts the scout)

    def fit(model_: nn.Module, _data: ImageDataset, *, optimizer: torch.optim.Optimizer, batch_size: int,
            seed: int, max_steps: int | None = None, regularizer: Callable[[nn.Module], torch.Tensor] | None = None,
            after_step: Callable[[], None] | None = None, **_: Any) -> TrainStats:
        # the task's `epochs` (and progress bar) give way to the scout's own budget
        run = train_scout(model_, train, val, optimizer=optimizer, epochs=epochs, patience=patience,
                          batch_size=batch_size, seed=seed, max_steps=max_steps, regularizer=regularizer,
                          after_step=after_step)
        runs.append(run)
        return run.stats

    def report() -> dict[str, np.ndarray]:
        run = runs[-1]
        out = {sq_key(n): v for n, v in squared_displacement(to_numpy_state(model), weights,
                                                              scored_names(weights)).items()}
        work = {"epochs": run.epochs, "steps": run.steps, "stopped": int(run.stopped), "best_epoch": run.best_epoch}
        out.update({work_key(k): np.array([v], dtype=np.float32) for k, v in work.items()})
        return out

    # extra_memory_bytes stays 0: validation is a no-grad forward at the training batch, and
    # the displacement is computed after training, outside the measured training peak
    return LocalHooks(fit=fit, upload_delta=False, upload_values="fp32", aux=report)
