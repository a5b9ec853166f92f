"""The operator CLI (`fedslim-coordinator create/list/.../watch/token`) as a user runs it: a
subprocess against a real coordinator process on loopback. Failures are one line on
stderr with a nonzero exit, never a traceback."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import PROCESS_ADMIN_TOKEN, Cluster, free_port


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """The CLI's environment: no FEDSLIM_* from the caller, a token file of its own."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FEDSLIM_")}
    return {**clean, "FEDSLIM_CONFIG": str(tmp_path / "cli.json"), "PYTHONUNBUFFERED": "1"}


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    c.start_coordinator()
    yield c
    c.stop()


def cli(env: dict[str, str], *args: str, stdin: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "coordinator.cli", *args], env=env, input=stdin,
                          capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(done: subprocess.CompletedProcess, *needles: str) -> None:
    assert done.returncode != 0 and done.stdout == ""
    assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("fedslim-coordinator: ")
    for needle in needles:
        assert needle in done.stderr, done.stderr


@pytest.mark.parametrize("args", [
    ["create"],                   # the example: used to print an httpx traceback
    ["list"],
    ["watch", "abc123"],
    ["token", "set", "--stdin"],  # set tries the token on the coordinator first
])
def test_no_server_is_one_line_not_a_traceback(env: dict[str, str], args: list[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    done = cli(env, *args, "--url", url, stdin="some-token\n")
    assert_one_line_error(done, f"cannot reach the coordinator at {url}", "Connection refused")


def test_federation_lifecycle_over_rest(cluster: Cluster, env: dict[str, str], tmp_path: Path) -> None:
    env = {**env, "FEDSLIM_URL": cluster.url, "FEDSLIM_ADMIN_TOKEN": PROCESS_ADMIN_TOKEN}
    config = tmp_path / "fed.json"
    config.write_text(json.dumps({"name": "from-cli", "model": "lenet5", "rounds": 3,
                                  "data": {"dataset": "synthetic"}}))

    created = cli(env, "create", str(config))
    assert created.returncode == 0, created.stderr
    fid = json.loads(created.stdout)["id"]
    assert cluster.http.get(f"/v1/federations/{fid}").json()["config"]["name"] == "from-cli"  # the server has it

    listed = json.loads(cli(env, "list").stdout)
    assert [f["id"] for f in listed] == [fid]
    # each action reaches the server: what the CLI prints is what the API says afterwards
    for action, status in [("start", "running"), ("pause", "paused"), ("resume", "running"), ("stop", "stopped")]:
        done = cli(env, action, fid)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["status"] == status
        assert cluster.http.get(f"/v1/federations/{fid}").json()["status"] == status
    assert json.loads(cli(env, "metrics", fid).stdout) == []
    assert json.loads(cli(env, "live", fid).stdout)["round"] is None

    # refusals are one line with the server's reason
    assert_one_line_error(cli(env, "start", fid), "409")  # a stopped federation stays stopped
    assert_one_line_error(cli(env, "get", "ffff"), "404")
    assert_one_line_error(cli({**env, "FEDSLIM_ADMIN_TOKEN": "wrong-token-123"}, "list"), "401")
    config.write_text(json.dumps({"rounds": 0}))
    assert_one_line_error(cli(env, "create", str(config)), "422", "rounds")
    config.write_text("{not json")
    assert_one_line_error(cli(env, "create", str(config)), "not JSON")


def test_token_set_show_clear(cluster: Cluster, env: dict[str, str], tmp_path: Path) -> None:
    # a wrong token is refused by the coordinator and not saved
    assert_one_line_error(cli(env, "token", "set", "--stdin", "--url", cluster.url, stdin="wrong-token-123\n"), "401")
    assert not (tmp_path / "cli.json").exists()

    done = cli(env, "token", "set", "--stdin", "--url", cluster.url, stdin=PROCESS_ADMIN_TOKEN + "\n")
    assert done.returncode == 0, done.stderr
    saved = tmp_path / "cli.json"
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    assert json.loads(saved.read_text()) == {"url": cluster.url, "token": PROCESS_ADMIN_TOKEN}

    # with no flag and no env var, the saved URL and token are used
    assert cli(env, "list").returncode == 0
    shown = cli(env, "token", "show").stdout
    assert cluster.url in shown and PROCESS_ADMIN_TOKEN not in shown and str(saved) in shown
    # the env var wins over the file
    assert_one_line_error(cli({**env, "FEDSLIM_ADMIN_TOKEN": "wrong-token-123"}, "list"), "401")

    assert cli(env, "token", "clear").returncode == 0 and not saved.exists()
    assert_one_line_error(cli(env, "list", "--url", cluster.url), "401")  # back to the dev placeholder

    generated = {cli(env, "token", "generate").stdout.strip() for _ in range(2)}
    assert len(generated) == 2 and all(len(t) >= 40 for t in generated)


def test_watch_follows_the_round_in_flight_to_the_end(cluster: Cluster, env: dict[str, str]) -> None:
    env = {**env, "FEDSLIM_URL": cluster.url, "FEDSLIM_ADMIN_TOKEN": PROCESS_ADMIN_TOKEN}
    for i in range(2):
        cluster.start_agent(i, 2)
    cluster.wait(lambda: len(cluster.http.get("/v1/agents").json()) == 2, "enrollment")
    fid = cluster.http.post("/v1/federations", json={
        "model": "lenet5", "rounds": 2, "clients_per_round": 2, "min_clients": 2, "round_deadline_s": 60,
        "data": {"dataset": "synthetic", "eval_samples": 200},
        "training": {"batch_size": 32, "lr": 0.05, "max_steps": 4}}).json()["id"]

    # not started yet: watch waits (and --timeout ends it with status 3)
    waited = cli(env, "watch", fid, "--timeout", "1", "--interval", "0.2")
    assert waited.returncode == 3 and "gave up after 1 s: 0/2 rounds done; created" in waited.stdout, waited

    # one watcher on a pipe (plain lines), one on a forced terminal (rich's progress bar)
    plain = subprocess.Popen([sys.executable, "-m", "coordinator.cli", "watch", fid, "--interval", "0.2"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rich = subprocess.Popen([sys.executable, "-m", "coordinator.cli", "watch", fid, "--interval", "0.2"],
                            env={**env, "TTY_COMPATIBLE": "1", "TTY_INTERACTIVE": "1", "COLUMNS": "120"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert cluster.http.post(f"/v1/federations/{fid}/start").status_code == 200
        out, err = plain.communicate(timeout=120)
        rich_out, rich_err = rich.communicate(timeout=30)
    finally:
        for p in (plain, rich):
            p.kill() if p.poll() is None else None

    assert plain.returncode == 0, err
    lines = out.splitlines()
    assert any(line.startswith("round 1/2 (attempt 1): 0/2 updates") for line in lines), out
    assert any(line.startswith("round 2/2 (attempt 1):") for line in lines), out
    assert lines[-1].startswith(f"federation {fid} completed after 2/2 rounds, accuracy "), out
    assert rich.returncode == 0, rich_err
    assert "round 2/2" in rich_out and "━" in rich_out and f"federation {fid} completed" in rich_out
    final_frame = rich_out.rsplit("\x1b[2K", 1)[-1]  # the last redraw: both bars full and closed
    assert final_frame.count("2/2") >= 2 and final_frame.count("closed") == 2, final_frame
