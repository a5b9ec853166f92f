"""Memory sizes: parsing them (one unit: MiB = 2^20 bytes, every prefix binary) and the
error a plan raises. The working-set record and its printing live with the estimate in
`models.memory` (the coordinator estimates levels with it too) and are re-exported here."""

from __future__ import annotations

import re

from models.memory import MemoryEstimate, format_size

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
