"""Central training and evaluation helpers shared by the agent, the coordinator and benches.

Hooks keep pruning methods out of this loop: `regularizer(model) -> loss term` is added to
the loss, and `after_step()` runs after every optimiser step (e.g. re-apply a mask).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from models.datasets import ImageDataset
from models.transforms import random_crop_flip, to_tensor

__all__ = ["EvalStats", "TrainStats", "evaluate", "iterate_batches", "train_epochs"]


@dataclass(frozen=True)
class TrainStats:
    loss: float
    accuracy: float
    samples: int
    steps: int
    seconds: float


@dataclass(frozen=True)
class EvalStats:
    loss: float
    accuracy: float
    samples: int


def iterate_batches(
    data: ImageDataset, batch_size: int, *, shuffle: bool = False, seed: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield normalised (B, C, H, W) float batches and int64 labels."""
    order = np.random.default_rng(seed).permutation(len(data)) if shuffle else np.arange(len(data))
    for start in range(0, len(data), batch_size):
        idx = order[start : start + batch_size]
        yield to_tensor(data.images[idx], data.name, data.mean, data.std), torch.from_numpy(data.labels[idx])


def train_epochs(
    model: nn.Module,
    data: ImageDataset,
    *,
    optimizer: torch.optim.Optimizer,
    epochs: int = 1,
    batch_size: int = 64,
    augment: bool = False,
    seed: int = 0,
    progress: bool = False,
    regularizer: Callable[[nn.Module], torch.Tensor] | None = None,
    after_step: Callable[[], None] | None = None,
    max_steps: int | None = None,
    clip_grad_norm: float | None = None,
) -> TrainStats:
    """Train for `epochs` passes (or `max_steps` steps); returns mean loss/accuracy.
    `clip_grad_norm` cuts each step's gradient to that L2 norm (over all parameters)."""
    model.train()
    generator = torch.Generator().manual_seed(seed)
    loss_sum, correct, seen, steps = 0.0, 0, 0, 0
    start = time.perf_counter()
    total = epochs * ((len(data) + batch_size - 1) // batch_size)
    bar = _progress_bar(total, progress)
    for epoch in range(epochs):
        for x, y in iterate_batches(data, batch_size, shuffle=True, seed=seed * 1000 + epoch):
            if augment:
                x = random_crop_flip(x, generator=generator)
            logits = model(x)
            loss = nn.functional.cross_entropy(logits, y)
            total_loss = loss + regularizer(model) if regularizer else loss
            optimizer.zero_grad(set_to_none=True)
            total_loss.backward()
            if clip_grad_norm is not None:
                # an optimizer that holds gradients of its own (KeptSGD) clips those
                clip = getattr(optimizer, "clip_grad_norm_", None)
                if clip is not None:
                    clip(clip_grad_norm)
                else:
                    nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
            optimizer.step()
            if after_step:
                after_step()
            loss_sum += loss.item() * len(y)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
            steps += 1
            bar.update(1)
            if max_steps is not None and steps >= max_steps:
                break
        if max_steps is not None and steps >= max_steps:
            break
    bar.close()
    return TrainStats(loss_sum / max(seen, 1), correct / max(seen, 1), seen, steps, time.perf_counter() - start)


@torch.no_grad()
def evaluate(model: nn.Module, data: ImageDataset, *, batch_size: int = 1000) -> EvalStats:
    model.eval()
    loss_sum, correct = 0.0, 0
    for x, y in iterate_batches(data, batch_size):
        logits = model(x)
        loss_sum += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
    n = max(len(data), 1)
    return EvalStats(loss_sum / n, correct / n, len(data))


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, enabled: bool) -> _NoBar:
    if not enabled:
        return _NoBar()
    from tqdm import tqdm  # lazy: devices without tqdm still train

    return tqdm(total=total, unit="step", leave=False)  # type: ignore[return-value]
