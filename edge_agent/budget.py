"""The memory budget of local training: estimate it, measure it, plan within it.

The budget covers the *training working set*: what local training adds on top of the
agent's idle process (interpreter, libraries, loaded data). That working set is

    parameters + gradients + optimizer state + saved activations + input batch + workspace

where saved activations are the tensors autograd keeps for backward, counted exactly with
`torch.autograd.graph.saved_tensors_hooks` on one forward pass at the planned batch size.
That pass runs on the ``meta`` device, so estimating costs no real memory (a device with a
256 MB budget must be able to plan without first spending 400 MB); the counts equal those of
a real CPU pass (a test checks this against the real pass).

`PeakMemoryMeter` measures the same quantity for real: the peak rise of this process's
resident set over its baseline while a block runs. `plan_training` picks the largest batch
that fits, freezes leading layers when no batch does, and raises `BudgetExceeded` saying
what would fit when nothing does.

The allocator matters as much as the model. glibc raises its mmap threshold dynamically,
so after the first freed activation buffers, activations of the next step are carved from
the heap, which fragments and is not returned to the OS: RSS then peaks ~40% above the
live tensors (resnet20, batch 64). `configure_allocator()` fixes the threshold (64 KiB),
so every activation-sized buffer is mmapped and unmapped when freed and RSS tracks the
live working set that the estimate counts. The agent calls it once at start-up; the
estimate (and the budget guarantee) assume it.
"""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import gc
import math
import re
import sys
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

__all__ = [
    "OPTIMIZER_STATE_SLOTS",
    "BudgetExceeded",
    "MemoryEstimate",
    "OptimizerName",
    "PeakMemoryMeter",
    "TrainingPlan",
    "configure_allocator",
    "estimate_training_memory",
    "format_size",
    "freeze_units",
    "parse_size",
    "plan_training",
    "trim_heap",
]

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

# glibc mallopt parameter numbers (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


class BudgetExceeded(RuntimeError):
    """Local training does not fit the memory budget, whatever the plan.

    Attributes say what the smallest working set found was, so callers (the agent CLI, the
    API layer) can report it without parsing the message.
    """

    def __init__(self, message: str, *, budget_bytes: int, needed_bytes: int, batch_size: int,
                 frozen: tuple[str, ...]) -> None:
        super().__init__(message)
        self.budget_bytes = budget_bytes
        self.needed_bytes = needed_bytes
        self.batch_size = batch_size
        self.frozen = frozen


# --------------------------------------------------------------------------- sizes

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(i?)(b?)\s*$", re.IGNORECASE)
_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}


def parse_size(text: str | int) -> int:
    """Parse a human memory size into bytes.

    ``"256MB"`` and ``"1.5GB"`` are decimal (10^6, 10^9); ``"1.5GiB"`` is binary (2^30);
    a bare letter (``"512k"``, ``"256m"``) is binary too, as in Docker and the JVM.
    Plain numbers (``"1024"``, ``"1024B"``, an int) are bytes. Raises ValueError on anything
    else (negative numbers, unknown units, empty strings).
    """
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"memory size must be >= 0, got {text}")
        return text
    if not isinstance(text, str):
        raise ValueError(f"memory size must be a string such as '256MB', got {text!r}")
    match = _SIZE_RE.match(text)
    if not match:
        raise ValueError(
            f"cannot parse memory size {text!r}; use e.g. '256MB', '1.5GiB', '512k' or a byte count"
        )
    number, prefix, binary, byte_suffix = match.groups()
    power = _POWERS[prefix.lower()]
    if binary and not prefix:
        raise ValueError(f"cannot parse memory size {text!r}: 'i' needs a prefix such as KiB")
    # "MB" is decimal; "MiB" and a bare "M" are binary.
    base = 1000 if (prefix and byte_suffix and not binary) else 1024
    return int(float(number) * base**power)


def format_size(n_bytes: float) -> str:
    """Bytes as a short decimal string: ``310 MB``, ``1.2 GB``, ``850 kB``."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n_bytes) >= scale:
            value = n_bytes / scale
            return f"{value:.1f} {unit}" if value < 10 else f"{value:.0f} {unit}"
    return f"{int(n_bytes)} B"


# --------------------------------------------------------------------------- estimate


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

    @property
    def total(self) -> int:
        return (self.params_bytes + self.grads_bytes + self.optimizer_bytes
                + self.activations_bytes + self.input_bytes + self.workspace_bytes)

    def describe(self) -> str:
        """One line for logs and error messages."""
        parts = (("params", self.params_bytes), ("grads", self.grads_bytes),
                 ("optimizer", self.optimizer_bytes), ("activations", self.activations_bytes),
                 ("input", self.input_bytes), ("workspace", self.workspace_bytes))
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


# --------------------------------------------------------------------------- measure


def _read_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def configure_allocator(*, mmap_threshold: int = 64 * 1024) -> bool:
    """Make this process's RSS track its live tensors (glibc only; see the module doc).

    Fixes glibc's mmap threshold at `mmap_threshold` bytes (disabling its dynamic growth)
    and trims the heap top beyond 128 KiB. Costs a page-fault per large allocation (within
    run-to-run noise for resnet20 training on CPU). Returns False where it cannot apply
    (not glibc), in which case measured peaks can exceed estimates by ~40%.
    """
    libc = _libc()
    if libc is None:
        return False
    ok = libc.mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)) == 1
    ok = libc.mallopt(_M_TRIM_THRESHOLD, 128 * 1024) == 1 and ok
    return ok


def trim_heap() -> None:
    """Return free heap pages to the OS (glibc `malloc_trim(0)`); a no-op elsewhere."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def _reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0); False when not possible."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _read_status_kb("VmHWM") is not None


class PeakMemoryMeter:
    """Measure the peak rise of this process's RSS over its baseline while a block runs.

    >>> with PeakMemoryMeter() as meter:
    ...     train_one_round()
    >>> meter.baseline_bytes, meter.peak_rise_bytes

    On Linux the kernel's high-water mark is exact: entering writes "5" to
    /proc/self/clear_refs (VmHWM := VmRSS) and leaving reads VmHWM. Elsewhere, or when
    /proc is not writable, a thread samples RSS with psutil every `interval` seconds, which
    can miss short spikes. `method` says which was used ("vmhwm" or "sampling").
    The baseline is taken after `gc.collect()` and `trim_heap()`, so that neither garbage
    nor free heap pages count as baseline (free pages reused in the block would hide rise).
    """

    def __init__(self, *, interval: float = 0.001, force_sampling: bool = False) -> None:
        self.interval = interval
        self.force_sampling = force_sampling
        self.method: str = ""
        self.baseline_bytes = 0
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def peak_rise_bytes(self) -> int:
        return max(0, self.peak_bytes - self.baseline_bytes)

    def __enter__(self) -> PeakMemoryMeter:
        gc.collect()
        trim_heap()
        if not self.force_sampling and _reset_hwm():
            self.method = "vmhwm"
            self.baseline_bytes = _read_status_kb("VmRSS") or 0
            self.peak_bytes = self.baseline_bytes
            return self
        import psutil  # lazy: only the fallback needs it

        process = psutil.Process()
        self.method = "sampling"
        self.baseline_bytes = process.memory_info().rss
        self.peak_bytes = self.baseline_bytes
        self._stop.clear()

        def sample() -> None:
            while not self._stop.is_set():
                self.peak_bytes = max(self.peak_bytes, process.memory_info().rss)
                self._stop.wait(self.interval)

        self._thread = threading.Thread(target=sample, name="peak-memory-meter", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.method == "vmhwm":
            self.peak_bytes = max(self.peak_bytes, _read_status_kb("VmHWM") or 0)
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            import psutil

            self.peak_bytes = max(self.peak_bytes, psutil.Process().memory_info().rss)


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class TrainingPlan:
    """How to train within a budget: batch size, frozen parameter names, and the estimate."""

    batch_size: int
    frozen: tuple[str, ...]
    estimate: MemoryEstimate

    def trainable(self, model: nn.Module) -> set[str]:
        return {n for n, _ in model.named_parameters() if n not in set(self.frozen)}

    def apply(self, model: nn.Module) -> None:
        """Set requires_grad=False on the frozen parameters (build the optimizer after this,
        over `p for p in model.parameters() if p.requires_grad`)."""
        frozen = set(self.frozen)
        for name, p in model.named_parameters():
            p.requires_grad_(name not in frozen)


def freeze_units(model: nn.Module, input_shape: Sequence[int]) -> list[tuple[str, tuple[str, ...]]]:
    """Freezable units: modules that own parameters, in forward execution order, each with
    the full names of its parameters. Freezing "the first k layers" freezes the first k."""
    saved = _count_saved(model, input_shape, 1, None, "meta")
    units = []
    for module_name in saved.order:
        module = model.get_submodule(module_name)
        prefix = f"{module_name}." if module_name else ""
        names = tuple(prefix + n for n, _ in module.named_parameters(recurse=False))
        units.append((module_name, names))
    return units


def plan_training(
    model: nn.Module,
    input_shape: Sequence[int],
    budget_bytes: int,
    *,
    batch_sizes: Iterable[int] = (128, 64, 32, 16, 8, 4),
    preferred_batch: int = 64,
    optimizer: OptimizerName = "sgd_momentum",
    allow_freeze: bool = True,
) -> TrainingPlan:
    """Plan one agent's local training within `budget_bytes` of working set.

    1. The largest batch ≤ `preferred_batch` (from `batch_sizes`) whose estimate fits.
    2. If none fits even at the smallest batch, freeze the fewest leading layers (in forward
       order; they get no gradients, no optimizer state and save no activations) that make
       the smallest batch fit, then take the largest batch that fits with that freeze.
       At least the last layer stays trainable. Fewer frozen layers win over a bigger batch.
    3. Otherwise raise `BudgetExceeded` naming the smallest working set found.
    """
    candidates = sorted({b for b in batch_sizes if b <= preferred_batch}, reverse=True)
    if not candidates:
        candidates = [min(batch_sizes)]

    def estimate(batch: int, frozen: tuple[str, ...]) -> MemoryEstimate:
        trainable = None if not frozen else {n for n, _ in model.named_parameters()} - set(frozen)
        return estimate_training_memory(model, input_shape, batch, optimizer=optimizer, trainable=trainable)

    def largest_fit(frozen: tuple[str, ...]) -> TrainingPlan | None:
        for batch in candidates:
            est = estimate(batch, frozen)
            if est.total <= budget_bytes:
                return TrainingPlan(batch, frozen, est)
        return None

    plan = largest_fit(())
    if plan is not None:
        return plan
    smallest = candidates[-1]
    dense_need = estimate(smallest, ())
    units = freeze_units(model, input_shape)

    def frozen_prefix(k: int) -> tuple[str, ...]:
        return tuple(n for _, names in units[:k] for n in names)

    best_k, best_est = 0, dense_need
    if allow_freeze and len(units) > 1:
        # Memory falls (weakly) as more leading units freeze: binary-search the fewest.
        lo, hi = 1, len(units) - 1
        most = estimate(smallest, frozen_prefix(hi))
        best_k, best_est = hi, most
        if most.total <= budget_bytes:
            while lo < hi:
                mid = (lo + hi) // 2
                if estimate(smallest, frozen_prefix(mid)).total <= budget_bytes:
                    hi = mid
                else:
                    lo = mid + 1
            plan = largest_fit(frozen_prefix(lo))
            if plan is not None:
                return plan
    if best_k:
        trainable_units = ", ".join(name for name, _ in units[best_k:]) or "none"
        detail = (f"needs {format_size(best_est.total)} at batch {smallest} with all layers "
                  f"frozen but {trainable_units} ({format_size(dense_need.total)} with none frozen)")
    else:
        detail = f"needs {format_size(dense_need.total)} at batch {smallest}"
    raise BudgetExceeded(
        f"local training does not fit the memory budget: {detail}; budget "
        f"{format_size(budget_bytes)}. It would fit with a budget of at least "
        f"{format_size(best_est.total)}, or a smaller (structured-pruned) model. "
        f"Smallest working set: {best_est.describe()}",
        budget_bytes=budget_bytes,
        needed_bytes=best_est.total,
        batch_size=smallest,
        frozen=frozen_prefix(best_k),
    )
