#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: Fashion-MNIST (Debian package), a virtual env in
# .venv, pinned dependencies (constraints.txt; torch first, so no CUDA build is pulled).
set -euo pipefail
cd "$(dirname "$0")/.."

DATA_DIR=${FEDSLIM_FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}
if [ ! -f "$DATA_DIR/t10k-labels-idx1-ubyte.gz" ] && [ ! -f "$DATA_DIR/t10k-labels-idx1-ubyte" ]; then
  echo "==> installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
  if [ "$(id -u)" = 0 ]; then
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist
  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    sudo apt-get update -q && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist
  else
    echo "Fashion-MNIST is missing and this user cannot install packages. Run as root:" >&2
    echo "  apt-get update && apt-get install -y dataset-fashion-mnist" >&2
    echo "or set FEDSLIM_FASHION_MNIST_DIR to a directory holding the IDX files." >&2
    exit 1
  fi
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv"
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.fedslim-installed
want=$(cat constraints.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "==> installing pinned dependencies (first run takes a few minutes)"
  .venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt torch==2.13.0
  .venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[dev,sim]"
  echo "$want" > "$stamp"
fi
# Flower for bench.compare and its test: its own venv (flwr's pins conflict with ours; see
# the `# sim:` block of constraints.txt). Idempotent: a stamp holds what it was made with.
.venv/bin/python -m bench.flower_peer --setup >/dev/null
