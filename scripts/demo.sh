#!/usr/bin/env bash
# The main job: set up, then run a local federation (coordinator + agent processes on
# Fashion-MNIST), prune, export to ONNX and print the results table. Extra flags go to
# fedslim-demo (see `.venv/bin/fedslim-demo --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/fedslim-demo --out runs/demo "$@"
