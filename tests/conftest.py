"""Suite-wide test plumbing.

`@pytest.mark.isolated` runs a test in a fresh interpreter: process-level measurements
(peak RSS against a memory budget) are meaningless after hundreds of other tests have
shaped the allocator's heap.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

_CHILD = "FEDSLIM_ISOLATED_CHILD"

# in-process federation fixtures (coordinator, make_agent, start_federation); a throwaway
# PostgreSQL server and the both_databases marker (database_url)
pytest_plugins = ["tests.federation_fixtures", "tests.pg"]


def _run_isolated(item: pytest.Item) -> None:
    root = Path(str(item.config.rootpath))
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", item.nodeid],
        cwd=root, env={**os.environ, _CHILD: "1"}, capture_output=True, text=True, timeout=600,
    )
    if done.returncode != 0:
        raise AssertionError(f"isolated run of {item.nodeid} failed:\n{done.stdout[-4000:]}{done.stderr[-2000:]}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get(_CHILD):
        return
    for item in items:
        if item.get_closest_marker("isolated") is not None:
            item.runtest = (lambda it=item: _run_isolated(it))  # type: ignore[method-assign]
