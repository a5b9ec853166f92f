"""When a device may train: on mains power or with enough battery, inside a time window,
below a CPU temperature limit.

Two halves, as elsewhere: `read_conditions(sysfs)` reads what the device says about itself
(Linux: /sys/class/power_supply and /sys/class/thermal; anything absent is None, so a Pi
without a battery counts as on mains and a VM without thermal zones has no temperature),
and `decide(policy, conditions, now)` is a pure function of the two. A check whose reading
is absent is skipped and named in `Decision.skipped`, never a refusal: a policy must not
stop a device that cannot report.

Torch-free (the agent's CLI imports it before deciding whether to load torch).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from datetime import time as clock
from pathlib import Path
from typing import Any

__all__ = ["Conditions", "Decision", "Policy", "PolicyError", "decide", "parse_window", "policy_from_config",
           "read_conditions"]

# power_supply `type`s that are a wall or a charger (kernel ABI: sysfs-class-power)
_EXTERNAL = frozenset({"Mains", "USB", "USB_C", "USB_PD", "USB_DCP", "USB_CDP", "USB_ACA", "Wireless"})
# thermal zone `type`s that measure the CPU/SoC: Raspberry Pi "cpu-thermal", x86 "x86_pkg_temp",
# Jetson "CPU-therm"/"cpu-thermal", Rockchip "soc-thermal". Other zones (a PMIC, a Wi-Fi chip,
# Jetson's PMIC-Die that reads a constant 100 °C) would stop training for the wrong reason.
_CPU_ZONE_WORDS = ("cpu", "soc", "pkg", "core")
_MAX_SYSFS_READ = 256  # a sysfs attribute is one short line


class PolicyError(ValueError):
    """A policy setting that cannot be obeyed (named, with the value)."""


@dataclass(frozen=True)
class Policy:
    """What the device owner allows. Every field None/False means "always train"."""

    min_battery_pct: float | None = None  # on battery, train only at or above this charge
    mains_only: bool = False  # never train on battery
    window: tuple[clock, clock] | None = None  # local [start, end); end < start wraps midnight
    max_cpu_temp_c: float | None = None  # train only while the CPU is cooler than this
    sysfs: Path = Path("/sys")  # where power_supply/ and thermal/ live (a fake tree in tests)
    retry_after_s: float = 300.0  # what the agent asks the coordinator to wait after a "no"

    @property
    def active(self) -> bool:
        return (self.min_battery_pct is not None or self.mains_only or self.window is not None
                or self.max_cpu_temp_c is not None)


@dataclass(frozen=True)
class Conditions:
    """The device as read now. None: the device does not report it."""

    on_mains: bool | None = None
    battery_pct: float | None = None
    cpu_temp_c: float | None = None


@dataclass(frozen=True)
class Decision:
    ok: bool
    reason: str  # why not (empty when ok)
    skipped: tuple[str, ...] = field(default=())  # checks that had nothing to read


def decide(policy: Policy, cond: Conditions, now: datetime) -> Decision:
    """May the device train at local time `now`? The first rule that says no gives the reason."""
    skipped: list[str] = []
    if policy.window is not None and not _in_window(policy.window, now.time()):
        start, end = policy.window
        return Decision(False, f"outside the training window {start:%H:%M}-{end:%H:%M} (now {now:%H:%M})")
    if policy.mains_only or policy.min_battery_pct is not None:
        if cond.on_mains is None and cond.battery_pct is None:
            skipped.append("power (no power supply reported: treated as mains)")
        elif not cond.on_mains:
            if policy.mains_only:
                return Decision(False, f"on battery ({_pct(cond.battery_pct)}) and the policy is mains only")
            assert policy.min_battery_pct is not None
            if cond.battery_pct is None:
                skipped.append("battery level (not reported)")
            elif cond.battery_pct < policy.min_battery_pct:
                return Decision(False, f"on battery at {_pct(cond.battery_pct)}, below {policy.min_battery_pct:g} %")
    if policy.max_cpu_temp_c is not None:
        if cond.cpu_temp_c is None:
            skipped.append("CPU temperature (no thermal zone)")
        elif cond.cpu_temp_c >= policy.max_cpu_temp_c:
            return Decision(False, f"CPU at {cond.cpu_temp_c:.1f} °C, at or above the {policy.max_cpu_temp_c:g} °C limit")
    return Decision(True, "", tuple(skipped))


def _in_window(window: tuple[clock, clock], t: clock) -> bool:
    start, end = window
    return start <= t < end if start <= end else (t >= start or t < end)


def _pct(value: float | None) -> str:
    return "unknown charge" if value is None else f"{value:g} %"


# ----------------------------------------------------------------------------- reading /sys
def read_conditions(sysfs: Path = Path("/sys")) -> Conditions:
    """Power and CPU temperature from `sysfs`/class/... (Linux); what is absent is None."""
    on_mains, battery = _power(sysfs / "class" / "power_supply")
    return Conditions(on_mains=on_mains, battery_pct=battery, cpu_temp_c=_cpu_temp(sysfs / "class" / "thermal"))


def _attr(path: Path) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read(_MAX_SYSFS_READ).decode("ascii", "replace").strip()
    except OSError:
        return None


def _number(text: str | None) -> float | None:
    try:
        value = float(text) if text is not None else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


def _power(root: Path) -> tuple[bool | None, float | None]:
    """(on external power, lowest battery charge %). (None, None) when nothing is reported;
    a device with no battery of its own is on external power. A battery that says Charging
    or Full is on a charger even where the charger has no entry of its own (many phones)."""
    try:
        supplies = sorted(root.iterdir())
    except OSError:
        return None, None
    external: bool | None = None
    charges: list[float] = []
    batteries = 0
    for supply in supplies:
        kind = _attr(supply / "type")
        if kind in _EXTERNAL:
            online = _attr(supply / "online") == "1"
            external = bool(external) or online
        elif kind == "Battery":
            if _attr(supply / "scope") == "Device":  # a mouse's or a pen's battery, not ours
                continue
            batteries += 1
            capacity = _number(_attr(supply / "capacity"))
            if capacity is not None:
                charges.append(min(max(capacity, 0.0), 100.0))
            if _attr(supply / "status") in ("Charging", "Full"):
                external = True
            elif external is None:
                external = False
    if batteries == 0:  # no battery of its own: whatever runs it is external power
        return (True if supplies else None), None
    return external, (min(charges) if charges else None)


def _cpu_temp(root: Path) -> float | None:
    """The hottest CPU/SoC zone in °C (sysfs reports millidegrees); all zones if none is named
    like a CPU; None without zones."""
    try:
        zones = sorted(p for p in root.iterdir() if p.name.startswith("thermal_zone"))
    except OSError:
        return None
    readings: list[tuple[bool, float]] = []
    for zone in zones:
        milli = _number(_attr(zone / "temp"))
        if milli is None:
            continue
        kind = (_attr(zone / "type") or "").lower()
        readings.append((any(w in kind for w in _CPU_ZONE_WORDS), milli / 1000.0))
    cpu = [t for is_cpu, t in readings if is_cpu] or [t for _, t in readings]
    return max(cpu) if cpu else None


# ----------------------------------------------------------------------------- configuration
_WINDOW = re.compile(r"(\d\d:\d\d)\s*-\s*(\d\d:\d\d)")


def parse_window(text: str) -> tuple[clock, clock]:
    """'22:00-06:30' -> (22:00, 06:30); equal ends would mean never, and are refused."""
    m = _WINDOW.fullmatch(text.strip())
    try:
        if m is None:
            raise ValueError(text)
        start, end = clock.fromisoformat(m.group(1)), clock.fromisoformat(m.group(2))
    except ValueError:
        raise PolicyError(f"training window {text!r}: expected HH:MM-HH:MM, e.g. 22:00-06:00") from None
    if start == end:
        raise PolicyError(f"training window {text!r} is empty")
    return start, end


_KEYS = {"min_battery_pct", "mains_only", "window", "max_cpu_temp_c", "sysfs", "retry_after_s"}
# the same settings under the names of `fedslim-agent run`'s flags, as a flat agent.toml
# (whose keys are the run flags' names, `fedslim-agent run --config`) spells them
_FLAGS = {"min_battery": "min_battery_pct", "mains_only": "mains_only", "train_window": "window",
          "max_cpu_temp": "max_cpu_temp_c", "sysfs": "sysfs", "not_now_retry": "retry_after_s"}


def policy_from_config(config: Mapping[str, Any]) -> Policy:
    """The device policy from the agent's parsed TOML config: a `[policy]` table, e.g.

        [policy]
        min_battery_pct = 50      # on battery, train at 50 % or more
        mains_only = false
        window = "22:00-06:00"    # local time; wraps midnight
        max_cpu_temp_c = 70
        retry_after_s = 300       # ask the coordinator to wait this long after a "no"

    or, without one, the flat run-flag keys (`min_battery`, `mains_only`, `train_window`,
    `max_cpu_temp`, `sysfs`, `not_now_retry`; other keys are other flags and are ignored).
    Unknown keys in a [policy] table and out-of-range values raise PolicyError naming them."""
    if "policy" in config:
        table = config["policy"]
        if not isinstance(table, Mapping):
            raise PolicyError("[policy] must be a table")
        unknown = set(table) - _KEYS
        if unknown:
            raise PolicyError(f"[policy]: unknown key(s) {', '.join(sorted(unknown))}; "
                              f"known: {', '.join(sorted(_KEYS))}")
    else:
        table = {_FLAGS[k]: v for k, v in config.items() if k in _FLAGS and v is not None}
    window = table.get("window")
    if window is not None and not isinstance(window, str):
        raise PolicyError("[policy] window: expected a string like \"22:00-06:00\"")
    mains_only = table.get("mains_only", False)
    if not isinstance(mains_only, bool):
        raise PolicyError("[policy] mains_only: expected true or false")
    return Policy(
        min_battery_pct=_bounded(table, "min_battery_pct", 0, 100),
        mains_only=mains_only,
        window=parse_window(window) if window else None,
        max_cpu_temp_c=_bounded(table, "max_cpu_temp_c", 0, 150),
        sysfs=Path(str(table.get("sysfs", "/sys"))),
        retry_after_s=_bounded(table, "retry_after_s", 1, 86400) or 300.0,
    )


def _bounded(table: Mapping[str, Any], key: str, low: float, high: float) -> float | None:
    value = table.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise PolicyError(f"[policy] {key} = {value!r}: expected a number in [{low:g}, {high:g}]")
    return float(value)
