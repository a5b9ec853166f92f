"""Memory sizes: parsing and printing them (one unit: MiB = 2^20 bytes, every prefix
binary), the working-set record an estimate returns, and the error a plan raises.
Torch-free, so the planner that uses them can be tested with made-up estimates."""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["MIB", "BudgetExceeded", "MemoryEstimate", "format_size", "parse_size"]

MIB = 2**20  # the unit of memory_budget_mb, of --memory-budget's "MB", of every report


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


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(i?)(b?)\s*$", re.IGNORECASE)
_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}


def parse_size(text: str | int) -> int:
    """Parse a human memory size into bytes. One unit everywhere: every prefix is binary.

    ``"256MB"``, ``"256MiB"``, ``"256M"`` and ``"256m"`` are all 256·2^20 bytes (MiB), the
    unit of the federation's ``memory_budget_mb``; ``"1.5GB"`` is 1.5·2^30, ``"512k"`` 512·2^10.
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
    return int(float(number) * 1024**power)


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
