"""deploy/compose.yaml names only what exists: its commands parse with the real CLIs, its
FEDSLIM_* variables are settings the code reads, its images install extras and entry
points that pyproject.toml declares, and its services point at each other correctly.

No container runtime here: this is the check that keeps the file from rotting as flags
and settings are renamed.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import tomllib
import yaml
from sqlalchemy.engine import make_url

from coordinator import cli as coordinator_cli
from coordinator.settings import CoordinatorSettings
from edge_agent import cli as agent_cli

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
AGENTS = sorted(name for name, s in SERVICES.items() if "Dockerfile.agent" in s.get("build", {}).get("dockerfile", ""))
# compose's ${VAR}, ${VAR:?message}, ${VAR:-default}
_INTERPOLATION = re.compile(r"\$\{(\w+)(?::?[?\-][^}]*)?\}")


def _dockerfile(service: str) -> str:
    return (ROOT / "deploy" / Path(SERVICES[service]["build"]["dockerfile"]).name).read_text()


def _json_instruction(dockerfile: str, instruction: str) -> list[str]:
    (line,) = re.findall(rf"^{instruction} (\[.*\])$", dockerfile, flags=re.M)
    return list(yaml.safe_load(line))  # a JSON array is YAML too


def _coordinator_argv(monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> Any:
    """Parse `argv` with the real `fedslim-coordinator` parser; return the parsed args."""
    seen: list[Any] = []
    monkeypatch.setattr(coordinator_cli, "_serve", lambda args: seen.append(args) or 0)
    assert coordinator_cli.main(argv) == 0
    return seen[0]


def test_services_and_volumes_are_declared() -> None:
    assert {"postgres", "coordinator"} <= set(SERVICES) and len(AGENTS) >= 2
    declared = set(COMPOSE.get("volumes", {}))
    for name, service in SERVICES.items():
        for dep in service.get("depends_on", {}):
            assert dep in SERVICES, (name, dep)
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert source.startswith("/") or source in declared, (name, volume)
        if "build" in service:
            assert (ROOT / "deploy" / Path(service["build"]["dockerfile"]).name).is_file()


def test_coordinator_command_parses_and_its_variables_are_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    svc = SERVICES["coordinator"]
    command = svc["command"]
    assert command[0] in PYPROJECT["project"]["scripts"]
    args = _coordinator_argv(monkeypatch, command[1:])
    # every FEDSLIM_* name, in compose and in the image, is a field CoordinatorSettings reads
    image_env = re.findall(r"\b(FEDSLIM_\w+)=", _dockerfile("coordinator"))
    fields = set(CoordinatorSettings.model_fields)
    for var in [*svc["environment"], *image_env]:
        assert var.startswith("FEDSLIM_") and var.removeprefix("FEDSLIM_").lower() in fields, var
    # the published port is the one it serves on
    (published,) = svc["ports"]
    assert published.rsplit(":", 1)[1] == str(args.port)


def test_database_url_points_at_the_postgres_service_with_an_installed_driver() -> None:
    env, pg = SERVICES["coordinator"]["environment"], SERVICES["postgres"]["environment"]
    url = make_url(_INTERPOLATION.sub(lambda m: f"X{m.group(1)}", env["FEDSLIM_DATABASE_URL"]))
    assert url.host == "postgres" and url.port == 5432
    assert url.username == pg["POSTGRES_USER"] and url.database == pg["POSTGRES_DB"]
    # same secret on both sides
    assert _INTERPOLATION.findall(pg["POSTGRES_PASSWORD"]) == [url.password.removeprefix("X")]
    # the driver in the URL is installed by an extra the image installs
    driver = url.drivername.split("+")[1]
    (extras,) = re.findall(r'pip install [^\n]*"\.\[([\w,-]+)\]"', _dockerfile("coordinator"))
    declared = PYPROJECT["project"]["optional-dependencies"]
    assert all(e in declared for e in extras.split(","))
    assert any(dep.startswith(driver) for e in extras.split(",") for dep in declared[e]), (driver, extras)


@pytest.mark.parametrize("service", AGENTS)
def test_agent_command_parses_and_points_at_the_coordinator(service: str, monkeypatch: pytest.MonkeyPatch) -> None:
    svc = SERVICES[service]
    entry = _json_instruction(_dockerfile(service), "ENTRYPOINT")
    assert entry[0] in PYPROJECT["project"]["scripts"]
    seen: list[Any] = []
    monkeypatch.setattr(agent_cli, "_run", lambda args: seen.append(args) or 0)
    assert agent_cli.main(svc["command"]) == 0, shlex.join(svc["command"])
    (args,) = seen
    coordinator_port = _coordinator_argv(monkeypatch, SERVICES["coordinator"]["command"][1:]).port
    assert args.url == f"http://coordinator:{coordinator_port}"
    assert args.num_clients == len(AGENTS) and 0 <= args.client_index < args.num_clients
    from edge_agent.budget import parse_size

    assert parse_size(args.memory_budget) > 0
    # the one variable an agent reads, and its state on a volume of its own
    assert set(svc["environment"]) == {"FEDSLIM_ENROLLMENT_TOKEN"}
    assert f"{service}-state:{args.state_dir}" in svc["volumes"]


def test_agents_take_distinct_shards() -> None:
    indexes = [c[c.index("--client-index") + 1] for c in (SERVICES[a]["command"] for a in AGENTS)]
    assert sorted(indexes) == [str(i) for i in range(len(AGENTS))]
