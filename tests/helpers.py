"""The suite's shared constants and helpers: test modules import them from here
(`from tests.helpers import ...`; conftest files cannot be imported under
--import-mode=importlib).

- `ADMIN`, `ENROLL`: the dev-mode admin header and enrollment token of the in-process
  coordinator (`CoordinatorSettings(dev_mode=True)`);
- `wait_for`: poll a condition until it holds, or fail the test;
- `free_port`, `Cluster`: a real uvicorn coordinator and agent processes on loopback.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import httpx

__all__ = ["ADMIN", "ENROLL", "PROCESS_ADMIN_TOKEN", "PROCESS_ENROLL_TOKEN", "Cluster", "free_port", "wait_for"]

ADMIN = {"Authorization": "Bearer dev-admin-token"}
ENROLL = "dev-enroll-token"
# real processes run outside dev mode: tokens that pass the settings' validators
PROCESS_ADMIN_TOKEN = "test-admin-token-0123456789"
PROCESS_ENROLL_TOKEN = "test-enroll-token-0123456789"

T = TypeVar("T")


def wait_for(cond: Callable[[], T], timeout: float = 30, *, interval: float = 0.05, what: str = "condition",
             ignore: tuple[type[BaseException], ...] = (), details: Callable[[], str] | None = None) -> T:
    """Poll `cond()` until it returns something truthy and return that; exceptions in
    `ignore` count as "not yet". Fails the test after `timeout` seconds."""
    end = time.monotonic() + timeout
    while True:
        try:
            value = cond()
            if value:
                return value
        except ignore:
            pass
        if time.monotonic() >= end:
            raise AssertionError(f"timed out waiting for {what}" + (f"\n{details()}" if details else ""))
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Cluster:
    """A uvicorn coordinator (from this checkout) and agent processes, logs in `root`."""

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "FEDSLIM_ADMIN_TOKEN": PROCESS_ADMIN_TOKEN,
                    "FEDSLIM_ENROLLMENT_TOKEN": PROCESS_ENROLL_TOKEN, "PYTHONUNBUFFERED": "1"}
        self.coordinator: subprocess.Popen | None = None
        self.agents: list[subprocess.Popen] = []
        self.http = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {PROCESS_ADMIN_TOKEN}"},
                                 timeout=30)

    def start_coordinator(self) -> None:
        log = open(self.root / "coordinator.log", "a")  # noqa: SIM115 (the process owns it)
        self.coordinator = subprocess.Popen(
            [sys.executable, "-m", "coordinator.cli", "serve", "--port", str(self.port),
             "--data-dir", str(self.root / "coord"), "--torch-threads", "1"],
            env={**self.env, "FEDSLIM_TICK_S": "0.05"}, stdout=log, stderr=subprocess.STDOUT)
        log.close()

        def healthy() -> bool:
            assert self.coordinator is not None and self.coordinator.poll() is None, self.logs()
            return self.http.get("/v1/health").status_code == 200

        wait_for(healthy, 60, interval=0.1, what="the coordinator to start", ignore=(httpx.TransportError,))

    def agent_args(self, i: int, n: int, *, idle_exit_s: float = 60) -> list[str]:
        """`fedslim-agent run` arguments for agent i of n on synthetic data."""
        return ["run", "--url", self.url, "--state-dir", str(self.root / f"agent-{i}"), "--name", f"agent-{i}",
                "--dataset", "synthetic", "--partition", "iid", "--client-index", str(i), "--num-clients", str(n),
                "--threads", "1", "--poll", "2", "--idle-exit", str(idle_exit_s)]

    def start_agent(self, i: int, n: int, *, command: Sequence[str] | None = None, cwd: Path | None = None,
                    env: dict[str, str] | None = None, idle_exit_s: float = 60,
                    extra: Sequence[str] = ()) -> subprocess.Popen:
        """Start agent i of n: `python -m edge_agent.cli` from this checkout, or `command`
        (which receives the agent's arguments, then `extra`) in `cwd` with `env`."""
        log = open(self.root / f"agent-{i}.log", "a")  # noqa: SIM115
        cmd = [*(command or [sys.executable, "-m", "edge_agent.cli"]), *self.agent_args(i, n, idle_exit_s=idle_exit_s),
               *extra]
        proc = subprocess.Popen(cmd, env=env or self.env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.agents.append(proc)
        return proc

    def logs(self) -> str:
        return "\n".join(p.name + ":\n" + p.read_text()[-1500:] for p in self.root.glob("*.log"))

    def wait(self, cond: Callable[[], T], what: str, timeout: float = 120) -> T:
        return wait_for(cond, timeout, interval=0.2, what=what, ignore=(httpx.TransportError,), details=self.logs)

    def stop(self) -> None:
        for p in [*self.agents, self.coordinator]:
            if p is not None and p.poll() is None:
                p.terminate()
        for p in [*self.agents, self.coordinator]:
            if p is not None:
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
        self.http.close()
