"""The layers and their one-way imports (docs/architecture.md), as tests that fail on an
upward import anywhere — lazy imports inside functions included:

    models, sparse_kernels  <  pruning  <  strategies  <  coordinator, edge_agent  <  sim, bench

sparse_kernels imports numpy only (never models); edge_agent imports nothing of the
coordinator but `coordinator.protocol`; the coordinator never imports edge_agent.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OURS = ("models", "sparse_kernels", "pruning", "strategies", "coordinator", "edge_agent", "sim", "bench")
_BASE = {"models", "sparse_kernels"}
# package → the packages of ours it may import (besides itself)
ALLOWED: dict[str, set[str]] = {
    "sparse_kernels": set(),
    "models": {"sparse_kernels"},
    "pruning": _BASE,
    "strategies": _BASE | {"pruning"},
    "coordinator": _BASE | {"pruning", "strategies"},
    "edge_agent": _BASE | {"pruning", "strategies", "coordinator.protocol"},
    "sim": _BASE | {"pruning", "strategies", "coordinator", "edge_agent"},
    "bench": _BASE | {"pruning", "strategies", "coordinator", "edge_agent", "sim"},
}


def imported_modules(source: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import statement of `source`, at any depth."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
            # `from coordinator import protocol` imports the module coordinator.protocol
            out += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names
                    if node.module in OURS]
    return out


def _allowed(package: str, module: str) -> bool:
    top = module.split(".")[0]
    if top not in OURS or top == package:
        return True
    rules = ALLOWED[package]
    if top in rules:
        return True
    # "coordinator.protocol" allows that module and the package it sits in, nothing else
    return any(module == r or r.startswith(module + ".") for r in rules)


def upward_imports(package: str, source: str) -> list[str]:
    bad = []
    for line, module in imported_modules(source):
        if not _allowed(package, module):
            bad.append(f"line {line}: {module}")
    return bad


@pytest.mark.parametrize("package", OURS)
def test_no_upward_import(package: str) -> None:
    files = sorted((REPO / package).rglob("*.py"))
    assert files, f"{package}/ has no modules"
    found = {str(f.relative_to(REPO)): upward_imports(package, f.read_text()) for f in files}
    assert {f: bad for f, bad in found.items() if bad} == {}


@pytest.mark.parametrize(("package", "source", "bad"), [
    # an agent module reaching into the service: upward (edge_agent may import only protocol)
    ("edge_agent", "from coordinator.service import CoordinatorService", True),
    ("edge_agent", "def f():\n    from coordinator.store import Store", True),  # lazy: still upward
    ("edge_agent", "from coordinator import service", True),
    ("edge_agent", "from coordinator.protocol import Task", False),
    ("edge_agent", "from coordinator import protocol", False),
    # the algorithm layer never imports the processes above it
    ("strategies", "import edge_agent.local", True),
    ("strategies", "from coordinator.protocol import Task", True),
    ("pruning", "from strategies.base import Weights", True),
    ("sparse_kernels", "from models.state import Weights", True),
    ("coordinator", "from edge_agent.agent import EdgeAgent", True),
    ("coordinator", "from strategies import build_strategy", False),
    ("models", "import torch\nfrom sparse_kernels.types import Weights", False),
])
def test_the_checker_fails_on_an_upward_import(package: str, source: str, bad: bool) -> None:
    assert bool(upward_imports(package, source)) is bad


def test_sparse_kernels_imports_numpy_only() -> None:
    code = ("import sys, sparse_kernels, sparse_kernels.fuzz, sparse_kernels.npz;"
            f"print(','.join(m for m in {OURS + ('torch', 'atheris')!r} if m != 'sparse_kernels' and m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_an_agent_process_imports_no_server_module() -> None:
    code = (
        "import sys, edge_agent.agent, edge_agent.local, edge_agent.cli, edge_agent.client, edge_agent.export;"
        "bad = sorted(m for m in sys.modules if (m.startswith('coordinator.') and m != 'coordinator.protocol')"
        " or m.split('.')[0] in ('fastapi', 'starlette', 'sqlalchemy', 'uvicorn', 'pydantic_settings', 'sim', 'bench'));"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


@pytest.mark.parametrize("package", ["sparse_kernels", "pruning", "strategies", "edge_agent.export", "pruning.export"])
def test_public_surface(package: str) -> None:
    import importlib

    module = importlib.import_module(package)
    for name in module.__all__:
        assert hasattr(module, name), f"{package}.{name}"
