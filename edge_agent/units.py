"""Memory sizes as people write them, and as Linux reports them for this process. Imports
nothing but the standard library, so the torch-free inference path (`fedslim-agent infer
--memory-limit`) can use it."""

from __future__ import annotations

import re

__all__ = ["MIB", "parse_size", "proc_status_bytes"]

MIB = 2**20  # the unit of memory_budget_mb, of --memory-budget's "MB", of every report

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


def proc_status_bytes(field: str) -> int | None:
    """A size field of /proc/self/status (VmRSS, VmHWM, ...) in bytes; None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
