#!/usr/bin/env bash
# Install the agent on a device (Raspberry Pi OS / Jetson Linux / Debian):
#   sudo bash deploy/install-agent.sh URL ENROLLMENT_TOKEN [MEMORY_BUDGET]
# Inference-only devices: pip install ".[agent-infer]" instead (onnxruntime + numpy).
set -euo pipefail
url=${1:?coordinator URL}; token=${2:?enrollment token}; budget=${3:-256MB}
repo=$(cd "$(dirname "$0")/.." && pwd)
id fedslim >/dev/null 2>&1 || useradd --system --home /var/lib/fedslim fedslim
install -d -o fedslim /var/lib/fedslim /etc/fedslim /opt/fedslim
python3 -m venv /opt/fedslim/.venv
/opt/fedslim/.venv/bin/pip install -c "$repo/constraints.txt" torch==2.13.0
/opt/fedslim/.venv/bin/pip install -c "$repo/constraints.txt" "$repo[agent]"
printf 'FEDSLIM_URL=%s\nFEDSLIM_MEMORY_BUDGET=%s\n' "$url" "$budget" > /etc/fedslim/agent.env
sudo -u fedslim /opt/fedslim/.venv/bin/fedslim-agent enroll --url "$url" --enrollment-token "$token" \
  --state-dir /var/lib/fedslim --memory-budget "$budget"
install -m 644 "$repo/deploy/fedslim-agent.service" /etc/systemd/system/
systemctl daemon-reload && systemctl enable --now fedslim-agent
