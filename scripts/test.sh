#!/usr/bin/env bash
# Set up, then the gates: ruff, mypy, and the test suite (unit + real-process integration).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "==> ruff"; .venv/bin/ruff check models sparse_kernels pruning strategies coordinator edge_agent sim bench tests docs
echo "==> mypy"; .venv/bin/mypy
echo "==> pytest"; exec .venv/bin/python -m pytest -q "$@"
