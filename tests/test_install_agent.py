"""deploy/install-agent.sh against a temporary root (PREFIX), without pip or system changes
(FEDSLIM_SKIP_PIP, FEDSLIM_SKIP_SYSTEM), enrolling for real with a one-time token against a
real coordinator process; the unit checked with `systemd-analyze verify`.

Mutations these kill: MemoryMax not following the budget, credentials readable by others,
a config that the agent's policy reader refuses (or a secret in it), a second run that
enrolls again or overwrites the owner's edits, 32-bit ARM installing anyway, unvalidated
input written into TOML, an unknown directive in the unit.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomllib

from edge_agent.policy import Policy, parse_window, policy_from_config
from tests.helpers import Cluster

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "deploy" / "install-agent.sh"


def install(prefix: Path, *args: str, token: str | None = None, arch: str = "x86_64") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDSLIM_")}
    env.update(PREFIX=str(prefix), FEDSLIM_SKIP_PIP="1", FEDSLIM_SKIP_SYSTEM="1", FEDSLIM_ARCH=arch,
               FEDSLIM_AGENT_CMD=f"{sys.executable} -m edge_agent.cli", PYTHONPATH=str(REPO))
    if token is not None:
        env["FEDSLIM_ENROLLMENT_TOKEN"] = token
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=120)


def unit_values(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line and line[0] != "#")


def mib(text: str) -> int:
    assert text.endswith(("M", "MB")), text
    return int(text.rstrip("MB"))


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    c.start_coordinator()
    yield c
    c.stop()


def test_install_enrolls_once_with_a_one_time_token(cluster: Cluster, tmp_path: Path) -> None:
    root = tmp_path / "root"
    token = cluster.http.post("/v1/enrollment-tokens", json={"expires_in_s": 600, "name": "pi"}).json()["token"]
    flags = ["--url", cluster.url, "--data", "/srv/photos", "--memory-budget", "256MB", "--name", "pi-kitchen",
             "--min-battery", "50", "--train-window", "22:00-06:00", "--max-cpu-temp", "75"]

    done = install(root, *flags, token=token)

    assert done.returncode == 0, done.stderr + done.stdout
    # credentials: the agent's token, 0600 in a 0700 directory
    identity = root / "var/lib/fedslim/identity.json"
    assert stat.S_IMODE(identity.stat().st_mode) == 0o600
    assert stat.S_IMODE(identity.parent.stat().st_mode) == 0o700
    agent_token = json.loads(identity.read_text())["agent_token"]
    poll = cluster.http.get("/v1/tasks", params={"wait": 0}, headers={"Authorization": f"Bearer {agent_token}"})
    assert poll.status_code == 204
    # the config: no secret, what the agent reads, the policy it will obey
    config_text = (root / "etc/fedslim/agent.toml").read_text()
    assert token not in config_text and agent_token not in config_text
    config = tomllib.loads(config_text)
    assert config["url"] == cluster.url and config["data"] == "/srv/photos" and config["memory_budget"] == "256MB"
    assert policy_from_config(config) == Policy(min_battery_pct=50, window=parse_window("22:00-06:00"),
                                                max_cpu_temp_c=75)
    # the unit: restart, memory limit from the budget (above the agent's own limit)
    unit = unit_values(root / "etc/systemd/system/fedslim-agent.service")
    assert unit["Restart"] == "always" and unit["ExecStart"].endswith("run --config /etc/fedslim/agent.toml")
    assert mib(config["memory_limit"]) == 256 + 384 and mib(unit["MemoryMax"]) == 704

    # Act again: an idempotent second run keeps the owner's edit and does not enroll again
    (root / "etc/fedslim/agent.toml").write_text(config_text.replace("min_battery = 50", "min_battery = 80"))
    again = install(root, *flags, token=token)  # the token is spent: enrolling would fail

    assert again.returncode == 0, again.stderr
    assert "already enrolled" in again.stdout and "keeping /etc/fedslim/agent.toml" in again.stdout
    assert "min_battery = 80" in (root / "etc/fedslim/agent.toml").read_text()
    tokens = cluster.http.get("/v1/enrollment-tokens").json()
    assert [t["status"] for t in tokens] == ["used"]
    assert len([a for a in cluster.http.get("/v1/agents").json() if a["name"] == "pi-kitchen"]) == 1


@pytest.mark.parametrize(("budget", "memory_max"), [("256MB", 704), ("1GB", 1548), ("2048MiB", 2675)])
def test_memory_max_follows_the_budget(tmp_path: Path, budget: str, memory_max: int) -> None:
    done = install(tmp_path, "--url", "http://coordinator:8080", "--memory-budget", budget)
    assert done.returncode == 0, done.stderr
    assert mib(unit_values(tmp_path / "etc/systemd/system/fedslim-agent.service")["MemoryMax"]) == memory_max
    assert "not enrolled" in done.stdout  # no token: installed, told how to enroll


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze missing (scripts/setup.sh installs the systemd package as root)")
def test_the_unit_verifies(tmp_path: Path) -> None:
    """`systemd-analyze verify` (offline: no systemd needed as PID 1) on the installed unit,
    its ExecStart pointed at a stand-in executable inside the temporary root."""
    root = tmp_path / "root"
    assert install(root, "--url", "http://coordinator:8080").returncode == 0
    stub = root / "opt/fedslim/.venv/bin/fedslim-agent"
    stub.parent.mkdir(parents=True)
    stub.write_text("#!/bin/sh\n")
    stub.chmod(0o755)
    unit = tmp_path / "fedslim-agent.service"
    unit.write_text((root / "etc/systemd/system/fedslim-agent.service").read_text()
                    .replace("/opt/fedslim", str(root / "opt/fedslim")))

    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)

    assert done.returncode == 0 and done.stderr.strip() == "", done.stderr  # warnings (unknown keys) fail too


def test_32_bit_arm_is_told_what_works(tmp_path: Path) -> None:
    done = install(tmp_path / "root", "--url", "http://coordinator:8080", arch="armv7l")
    assert done.returncode == 3
    assert "32-bit ARM" in done.stderr and "operator CLI" in done.stderr and "64-bit Raspberry Pi OS" in done.stderr
    assert not (tmp_path / "root").exists()  # nothing installed


@pytest.mark.parametrize(("flags", "needle"), [
    (["--url", 'http://x"; touch /tmp/pwned; "'], "--url"),  # would break out of the TOML string
    (["--url", "ftp://coordinator"], "--url"),
    (["--url", "http://c:8080", "--data", 'relative/"path'], "--data"),
    (["--url", "http://c:8080", "--memory-budget", "lots"], "--memory-budget"),
    (["--url", "http://c:8080", "--memory-budget", "1MB"], "at least 16MB"),
    (["--url", "http://c:8080", "--min-battery", "101"], "--min-battery"),
    (["--url", "http://c:8080", "--train-window", "25:00-06:00"], "--train-window"),
    ([], "--url is required"),
])
def test_bad_input_installs_nothing(tmp_path: Path, flags: list[str], needle: str) -> None:
    done = install(tmp_path / "root", *flags)
    assert done.returncode == 2 and needle in done.stderr, done.stderr
    assert not (tmp_path / "root").exists()


def test_infer_only_installs_no_service(tmp_path: Path) -> None:
    done = install(tmp_path, "--url", "http://coordinator:8080", "--infer-only")
    assert done.returncode == 0 and "fedslim-agent infer" in done.stdout
    assert not (tmp_path / "etc/systemd/system/fedslim-agent.service").exists()

