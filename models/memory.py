"""Estimate the training working set of one step without spending it: saved activations
counted exactly with `torch.autograd.graph.saved_tensors_hooks` on one forward pass on
the ``meta`` device, plus parameters, gradients, optimizer state, input and workspace."""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

__all__ = ["OPTIMIZER_STATE_SLOTS", "MemoryEstimate", "OptimizerName", "estimate_training_memory", "format_size",
           "freeze_units"]

OptimizerName = Literal["sgd", "sgd_momentum", "adam"]

# Per trainable parameter, how many parameter-sized state tensors the optimizer keeps:
# SGD none, SGD with momentum one buffer, Adam exp_avg and exp_avg_sq.
OPTIMIZER_STATE_SLOTS: dict[str, int] = {"sgd": 0, "sgd_momentum": 1, "adam": 2}

# Backward holds, besides the saved activations, the gradients flowing through the layer it
# is at; while most activations are still saved this is about one largest activation
# (measured on resnet20/32, vgg11_bn, fedavg_cnn: estimate within 8% of the VmHWM rise).
_BACKWARD_TRANSIENTS = 1
# A layer's forward holds its input and output and a scratch buffer about the output's
# size (im2col/matmul): what a frozen prefix costs although it saves nothing for backward.
_FORWARD_TRANSIENTS = 2
# The optimiser step and matmul kernels hold a temporary the size of the largest weight,
# and the allocator keeps about 1 MiB of slack (bench.memory: a 1.2-4 MB excess that did
# not grow with the batch, on fedavg_cnn dense and structured).
_STEP_SLACK_BYTES = 1 << 20

def format_size(n_bytes: float) -> str:
    """Bytes as a short binary string: ``310 MiB``, ``1.2 GiB``, ``850 KiB``."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n_bytes) >= scale:
            value = n_bytes / scale
            return f"{value:.1f} {unit}" if value < 10 else f"{value:.0f} {unit}"
    return f"{int(n_bytes)} B"


@dataclass(frozen=True)
class MemoryEstimate:
    """The training working set of one step, in bytes, by component."""

    batch_size: int
    params_bytes: int  # every parameter and buffer (frozen ones too: they are in memory)
    grads_bytes: int  # one gradient per trainable parameter
    optimizer_bytes: int  # optimizer state of trainable parameters
    activations_bytes: int  # tensors saved for backward, de-duplicated by storage
    input_bytes: int  # the float input batch (B, C, H, W)
    # transients: backward's gradient of a layer's output, or a forward layer's input,
    # output and scratch (frozen layers too), plus the optimiser's temporary and slack
    workspace_bytes: int
    # what the strategy's training hooks add (masks, FedDIP's masked weight copies,
    # FedTiny's gradient top-k buffers): `LocalHooks.extra_memory_bytes`
    hooks_bytes: int = 0

    @property
    def total(self) -> int:
        return (self.params_bytes + self.grads_bytes + self.optimizer_bytes
                + self.activations_bytes + self.input_bytes + self.workspace_bytes + self.hooks_bytes)

    def describe(self) -> str:
        """One line for logs and error messages."""
        parts = (("params", self.params_bytes), ("grads", self.grads_bytes),
                 ("optimizer", self.optimizer_bytes), ("activations", self.activations_bytes),
                 ("input", self.input_bytes), ("workspace", self.workspace_bytes), ("hooks", self.hooks_bytes))
        inner = ", ".join(f"{name} {format_size(v)}" for name, v in parts)
        return f"{format_size(self.total)} at batch {self.batch_size} ({inner})"


def _working_copy(model: nn.Module, trainable: set[str] | None, device: torch.device | str) -> nn.Module:
    """A copy of `model` on `device` with requires_grad set from `trainable`, so the count
    neither touches the caller's BN statistics nor (on "meta") allocates memory."""
    memo: dict[int, object] = {}
    for name, p in model.named_parameters():
        requires = p.requires_grad if trainable is None else name in trainable
        data = torch.empty_like(p, device=device) if str(device) == "meta" else p.detach().to(device, copy=True)
        memo[id(p)] = nn.Parameter(data, requires_grad=requires)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device=device) if str(device) == "meta" else b.to(device, copy=True)
    return copy.deepcopy(model, memo)


@dataclass(frozen=True)
class _SavedTensors:
    total_bytes: int
    largest_bytes: int
    forward_transient_bytes: int  # largest output (and scratch, where it is not saved)
    order: tuple[str, ...]  # parameterised leaf modules in execution order


def _count_saved(model: nn.Module, input_shape: Sequence[int], batch_size: int,
                 trainable: set[str] | None, device: torch.device | str) -> _SavedTensors:
    """Run one forward pass (+ loss) and sum the bytes autograd saves for backward."""
    work = _working_copy(model, trainable, device)
    work.train()
    param_storages = {p.untyped_storage()._cdata for p in work.parameters()}
    x = torch.zeros((batch_size, *input_shape), device=device)
    excluded = param_storages | {x.untyped_storage()._cdata}
    saved: dict[int, int] = {}  # storage id → bytes

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in excluded:
            saved[key] = storage.nbytes()
        return t

    order: list[str] = []
    outputs: list[torch.Tensor] = []  # every leaf module's output, held so storage ids stay unique
    handles = []

    def record_output(_m: nn.Module, _a: object, out: object) -> None:
        if isinstance(out, torch.Tensor):
            outputs.append(out)

    for name, module in work.named_modules():
        if any(True for _ in module.parameters(recurse=False)):
            handles.append(module.register_forward_pre_hook(
                lambda _m, _a, name=name: order.append(name) if name not in order else None))
        if not any(True for _ in module.children()):
            handles.append(module.register_forward_hook(record_output))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = work(x)
            if out.dim() == 2:  # classification logits: the loss saves its softmax too
                target = torch.zeros(batch_size, dtype=torch.long, device=device)
                loss = nn.functional.cross_entropy(out, target)
                del loss
        del out  # storages stay alive (and ids unique) until here
    finally:
        for h in handles:
            h.remove()
    # An output autograd keeps is already counted once; one it drops (a frozen prefix)
    # still exists next to its scratch while the layer runs.
    transient = max((o.numel() * o.element_size() * (1 if o.untyped_storage()._cdata in saved else _FORWARD_TRANSIENTS)
                     for o in outputs), default=0)
    outputs.clear()
    return _SavedTensors(sum(saved.values()), max(saved.values(), default=0), transient, tuple(order))


def estimate_training_memory(
    model: nn.Module,
    input_shape: Sequence[int],
    batch_size: int,
    *,
    optimizer: OptimizerName = "sgd_momentum",
    trainable: set[str] | None = None,
    device: torch.device | str = "meta",
) -> MemoryEstimate:
    """Estimate the training working set of `model` for one step at `batch_size`.

    input_shape: one sample's (C, H, W). trainable: names (as in `named_parameters`) of the
    parameters that get gradients and optimizer state; None means all that require grad.
    Frozen parameters still count as parameters, and since autograd saves nothing for a
    frozen prefix of the network, freezing leading layers also removes their activations.
    device: "meta" (default) counts without allocating; "cpu" counts on a real pass over a
    copy (the oracle the tests compare the meta count with). The first meta pass in a
    process imports torch's decompositions (a one-off rise of a few MB, 1–3 s): plan at
    start-up, before the idle baseline is taken.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if optimizer not in OPTIMIZER_STATE_SLOTS:
        raise ValueError(f"unknown optimizer {optimizer!r}; valid: {', '.join(OPTIMIZER_STATE_SLOTS)}")
    named = dict(model.named_parameters())
    if trainable is not None:
        unknown = set(trainable) - set(named)
        if unknown:
            raise ValueError(f"unknown parameter names in trainable: {sorted(unknown)[:5]}")
    train_names = {n for n, p in named.items() if (p.requires_grad if trainable is None else n in trainable)}
    params_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    params_bytes += sum(b.numel() * b.element_size() for b in model.buffers())
    grads_bytes = sum(named[n].numel() * named[n].element_size() for n in train_names)
    saved = _count_saved(model, input_shape, batch_size, trainable, device)
    input_bytes = batch_size * math.prod(input_shape) * 4  # float32 batch
    return MemoryEstimate(
        batch_size=batch_size,
        params_bytes=params_bytes,
        grads_bytes=grads_bytes,
        optimizer_bytes=OPTIMIZER_STATE_SLOTS[optimizer] * grads_bytes,
        activations_bytes=saved.total_bytes,
        input_bytes=input_bytes,
        workspace_bytes=(max(_BACKWARD_TRANSIENTS * max(saved.largest_bytes, input_bytes),
                             saved.forward_transient_bytes)
                         + max((named[n].numel() * named[n].element_size() for n in train_names), default=0)
                         + _STEP_SLACK_BYTES),
    )


def freeze_units(model: nn.Module, input_shape: Sequence[int], *,
                 device: torch.device | str = "meta") -> list[tuple[str, tuple[str, ...]]]:
    """Freezable units: modules that own parameters, in forward execution order, each with
    the full names of its parameters. Freezing "the first k layers" freezes the first k."""
    saved = _count_saved(model, input_shape, 1, None, device)
    units = []
    for module_name in saved.order:
        module = model.get_submodule(module_name)
        prefix = f"{module_name}." if module_name else ""
        names = tuple(prefix + n for n, _ in module.named_parameters(recurse=False))
        units.append((module_name, names))
    return units
