"""Fixtures for the pruning and memory-budget tests: fixed seeds, two CPU threads."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _seeded() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(min(threads, 2))
    torch.manual_seed(0)
    np.random.seed(0)
    yield
    torch.set_num_threads(threads)
