"""sparse_kernels is numpy-only: no torch, no coordinator/edge_agent/models."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_import_pulls_in_numpy_only() -> None:
    code = (
        "import sys, sparse_kernels, sparse_kernels.fuzz;"
        "bad = [m for m in ('torch', 'coordinator', 'edge_agent', 'models', 'atheris')"
        " if m in sys.modules]; print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_public_surface() -> None:
    import sparse_kernels

    for name in sparse_kernels.__all__:
        assert hasattr(sparse_kernels, name), name
