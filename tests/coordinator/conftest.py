"""The coordinator tests run single-threaded torch (fixtures: tests/federation_fixtures.py)."""

import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread: None) -> None:
    pass
