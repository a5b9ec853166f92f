"""The device policy (edge_agent/policy.py): readings from fake /sys trees laid out as the
kernel does (sysfs-class-power, sysfs-class-thermal), pure decisions, the config table, and
a real EdgeAgent whose policy says no declining through the real app.

Mutations these kill: mains detection ignoring `online` or a charging battery, a device
without a battery treated as on battery, the hottest non-CPU zone used (Jetson's PMIC-Die),
millidegrees not divided, a window that does not wrap midnight, `>` for `>=` at the limit,
an absent reading refusing instead of being skipped, unknown config keys accepted, the agent
training (or staying silent) when its policy says no.
"""

from __future__ import annotations

import threading
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from edge_agent.agent import AgentState, EdgeAgent
from edge_agent.client import CoordinatorClient
from edge_agent.policy import (
    Conditions,
    Policy,
    PolicyError,
    decide,
    parse_window,
    policy_from_config,
    read_conditions,
)
from models import make_synthetic
from tests.federation_fixtures import small_federation
from tests.helpers import ADMIN, ENROLL, wait_for


def fake_sys(root: Path, supplies: dict[str, dict[str, str]] | None = None,
             zones: list[tuple[str, int | str]] | None = None) -> Path:
    """A /sys tree: power_supply/<name>/<attr> files and thermal/thermal_zoneN/{type,temp}."""
    for name, attrs in (supplies or {}).items():
        d = root / "class" / "power_supply" / name
        d.mkdir(parents=True)
        for key, value in attrs.items():
            (d / key).write_text(value + "\n")
    for i, (kind, milli) in enumerate(zones or []):
        d = root / "class" / "thermal" / f"thermal_zone{i}"
        d.mkdir(parents=True)
        (d / "type").write_text(kind + "\n")
        (d / "temp").write_text(f"{milli}\n")
    (root / "class").mkdir(parents=True, exist_ok=True)
    return root


BATTERY = {"type": "Battery", "capacity": "35", "status": "Discharging"}


@pytest.mark.parametrize(("supplies", "on_mains", "battery"), [
    # laptop/phone on the charger: AC online
    ({"AC": {"type": "Mains", "online": "1"}, "BAT0": BATTERY}, True, 35.0),
    # charger unplugged: AC offline, battery discharging
    ({"AC": {"type": "Mains", "online": "0"}, "BAT0": BATTERY}, False, 35.0),
    # USB-C charger (phones, Pi 5 UPS hats)
    ({"usb": {"type": "USB", "online": "1"}, "battery": BATTERY}, True, 35.0),
    # only a battery that says Charging (no charger entry of its own)
    ({"battery": {**BATTERY, "status": "Charging"}}, True, 35.0),
    # a mouse's battery (scope Device) is not the device's: no battery of its own -> external power
    ({"hid-mouse": {**BATTERY, "scope": "Device", "capacity": "5"}}, True, None),
    # a Raspberry Pi: an empty power_supply directory
    ({}, None, None),
])
def test_power_readings(tmp_path: Path, supplies: dict[str, dict[str, str]], on_mains: bool | None,
                        battery: float | None) -> None:
    root = fake_sys(tmp_path, supplies)
    if not supplies:
        (root / "class" / "power_supply").mkdir(parents=True)
    cond = read_conditions(root)
    assert (cond.on_mains, cond.battery_pct) == (on_mains, battery)


@pytest.mark.parametrize(("zones", "temp"), [
    ([("cpu-thermal", 48312)], 48.312),                          # Raspberry Pi, millidegrees
    ([("CPU-therm", 51500), ("PMIC-Die", 100000)], 51.5),        # Jetson: the PMIC zone is not the CPU
    ([("x86_pkg_temp", 61000), ("acpitz", 27800)], 61.0),
    ([("acpitz", 27800), ("iwlwifi_1", "garbage")], 27.8),       # no CPU-named zone: all readable ones
    ([], None),                                                  # a VM: no zones at all
])
def test_cpu_temperature_readings(tmp_path: Path, zones: list[tuple[str, int | str]], temp: float | None) -> None:
    assert read_conditions(fake_sys(tmp_path, zones=zones)).cpu_temp_c == temp


def test_an_absent_sysfs_reads_as_nothing(tmp_path: Path) -> None:
    assert read_conditions(tmp_path / "nowhere") == Conditions()


NOON = datetime(2026, 12, 1, 12, 0)
NIGHT = datetime(2026, 12, 1, 23, 30)
EARLY = datetime(2026, 12, 2, 5, 59)


@pytest.mark.parametrize(("policy", "cond", "now", "ok", "why"), [
    (Policy(), Conditions(on_mains=False, battery_pct=1), NOON, True, ""),                      # no rules
    (Policy(min_battery_pct=50), Conditions(on_mains=True, battery_pct=10), NOON, True, ""),    # mains: any charge
    (Policy(min_battery_pct=50), Conditions(on_mains=False, battery_pct=49), NOON, False, "below 50 %"),
    (Policy(min_battery_pct=50), Conditions(on_mains=False, battery_pct=50), NOON, True, ""),   # at N: allowed
    (Policy(mains_only=True), Conditions(on_mains=False, battery_pct=100), NOON, False, "mains only"),
    (Policy(mains_only=True), Conditions(), NOON, True, ""),                 # nothing reported: skipped
    (Policy(max_cpu_temp_c=70), Conditions(cpu_temp_c=70.0), NOON, False, "70 °C limit"),    # at the limit: no
    (Policy(max_cpu_temp_c=70), Conditions(cpu_temp_c=69.9), NOON, True, ""),
    (Policy(max_cpu_temp_c=70), Conditions(), NOON, True, ""),               # no thermal zone: skipped
    (Policy(window=parse_window("22:00-06:00")), Conditions(), NIGHT, True, ""),   # wraps midnight
    (Policy(window=parse_window("22:00-06:00")), Conditions(), EARLY, True, ""),
    (Policy(window=parse_window("22:00-06:00")), Conditions(), NOON, False, "outside the training window"),
    (Policy(window=parse_window("09:00-17:00")), Conditions(), NOON, True, ""),
    (Policy(window=parse_window("09:00-12:00")), Conditions(), NOON, False, "09:00-12:00"),   # end exclusive
])
def test_decisions(policy: Policy, cond: Conditions, now: datetime, ok: bool, why: str) -> None:
    decision = decide(policy, cond, now)
    assert decision.ok is ok and why in decision.reason


def test_skipped_checks_are_named() -> None:
    decision = decide(Policy(mains_only=True, max_cpu_temp_c=80), Conditions(), NOON)
    assert decision.ok and len(decision.skipped) == 2 and "CPU temperature" in decision.skipped[1]


def test_policy_from_config() -> None:
    policy = policy_from_config({"url": "http://c:8080", "policy": {
        "min_battery_pct": 40, "window": "22:00-06:00", "max_cpu_temp_c": 75, "retry_after_s": 120}})
    assert policy == Policy(min_battery_pct=40.0, window=parse_window("22:00-06:00"), max_cpu_temp_c=75.0,
                            retry_after_s=120.0)
    assert policy_from_config({}) == Policy() and not Policy().active
    # a flat agent.toml (keys are the run flags' names; the others are not the policy's)
    flat = {"url": "http://c:8080", "memory_budget": "256MB", "min_battery": 40, "train_window": "22:00-06:00",
            "max_cpu_temp": 75, "not_now_retry": 120, "mains_only": False}
    assert policy_from_config(flat) == policy


@pytest.mark.parametrize(("table", "needle"), [
    ({"min_battery": 50}, "unknown key(s) min_battery"),   # a typo must not silently mean "always"
    ({"min_battery_pct": 150}, "min_battery_pct = 150"),
    ({"min_battery_pct": True}, "min_battery_pct"),
    ({"max_cpu_temp_c": "hot"}, "max_cpu_temp_c"),
    ({"window": "22-06"}, "HH:MM-HH:MM"),
    ({"window": "08:00-08:00"}, "empty"),
    ({"mains_only": "yes"}, "true or false"),
])
def test_bad_config_is_named(table: dict[str, Any], needle: str) -> None:
    with pytest.raises(PolicyError) as err:
        policy_from_config({"policy": table})
    assert needle in str(err.value)


def test_an_agent_whose_policy_says_no_declines_and_the_other_trains(
        coordinator: TestClient, tmp_path: Path, one_thread: None) -> None:
    """Two real agents on the real app; one on battery at 12 % with a 50 % floor. It never
    trains: it declines round 1 ("not now"), the round closes on the other's update, and
    round 2 samples only the other. Kills: the policy check skipped, or a silent skip (the
    round would wait out its 60 s deadline with one straggler)."""
    data = make_synthetic(400, seed=0)
    low = fake_sys(tmp_path / "sys-low", {"BAT0": {**BATTERY, "capacity": "12"}})

    def agent(i: int, policy: Policy | None) -> tuple[EdgeAgent, str]:
        client = CoordinatorClient(coordinator, max_tries=2, backoff_s=0.01)
        agent_id = client.enroll(ENROLL, name=f"agent-{i}").agent_id
        return EdgeAgent(client, data.subset(np.arange(i * 200, (i + 1) * 200)), AgentState(tmp_path / f"agent-{i}"),
                         policy=policy), agent_id

    (phone, phone_id), (pi, pi_id) = agent(0, Policy(min_battery_pct=50, sysfs=low, retry_after_s=600)), agent(1, None)
    fid = coordinator.post("/v1/federations", json=small_federation(rounds=2, clients_per_round=2, min_clients=1),
                           headers=ADMIN).json()["id"]
    coordinator.post(f"/v1/federations/{fid}/start", headers=ADMIN)
    threads = [threading.Thread(target=a.run, kwargs={"max_tasks": n, "idle_exit_s": 8, "poll_s": 1}, daemon=True)
               for a, n in ((phone, 1), (pi, 2))]
    for t in threads:
        t.start()

    done = wait_for(lambda: (f := coordinator.get(f"/v1/federations/{fid}", headers=ADMIN).json())["status"]
                    == "completed" and f, 40, what="the federation to complete")
    for t in threads:
        t.join(15)

    metrics = coordinator.get(f"/v1/federations/{fid}/rounds", headers=ADMIN).json()
    assert done["current_round"] == 2
    assert metrics[0]["declined"] == [{"agent": phone_id, "needed_bytes": None}]
    assert [[a["agent"] for a in m["agents"]] for m in metrics] == [[pi_id]] * 2
    assert metrics[1]["declined"] == [] and metrics[1]["stragglers"] == 0  # round 2 did not sample the phone
    assert all(m["seconds"] < 30 for m in metrics)  # nobody waited out the deadline
