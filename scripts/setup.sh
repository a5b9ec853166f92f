#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: Fashion-MNIST and PostgreSQL (Debian packages),
# chromium for the dashboard's browser test, a virtual env in .venv, pinned dependencies
# (constraints.txt; torch first, so no CUDA build is pulled; psycopg comes with the dev extra).
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages: Fashion-MNIST (the default data) and PostgreSQL (the tests run the store
# on a throwaway server of their own, tests/pg.py; nothing is configured or kept running).
DATA_DIR=${FEDSLIM_FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}
need_data=0
if [ ! -f "$DATA_DIR/t10k-labels-idx1-ubyte.gz" ] && [ ! -f "$DATA_DIR/t10k-labels-idx1-ubyte" ]; then
  need_data=1
fi
need_pg=1
if command -v initdb >/dev/null || compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
  need_pg=0
fi
packages=()
[ "$need_data" = 1 ] && packages+=(dataset-fashion-mnist)
[ "$need_pg" = 1 ] && packages+=(postgresql)
if [ "${#packages[@]}" -gt 0 ]; then
  echo "==> installing Debian packages: ${packages[*]}"
  if [ "$(id -u)" = 0 ]; then
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${packages[@]}"
  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    sudo apt-get update -q && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${packages[@]}"
  elif [ "$need_data" = 1 ]; then
    echo "Fashion-MNIST is missing and this user cannot install packages. Run as root:" >&2
    echo "  apt-get update && apt-get install -y ${packages[*]}" >&2
    echo "or set FEDSLIM_FASHION_MNIST_DIR to a directory holding the IDX files." >&2
    exit 1
  else
    echo "warning: PostgreSQL is not installed and this user cannot install it; its tests will skip" >&2
    echo "  (as root: apt-get install -y postgresql)" >&2
  fi
fi
# initdb refuses to run as root: as root the tests start PostgreSQL as `postgres` (the
# Debian package creates that user; a hand-installed server may lack it)
if [ "$(id -u)" = 0 ] && ! id -u postgres >/dev/null 2>&1; then
  useradd --system --home-dir /var/lib/postgresql --shell /usr/sbin/nologin postgres
fi

# The dashboard's browser test (tests/coordinator/test_dashboard_browser.py) drives Debian's
# chromium with its matching chromedriver; without them (no root) that test skips, saying why.
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    echo "==> installing chromium + chromium-driver (Debian) for the dashboard's browser test"
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver
  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    sudo apt-get update -q && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver
  else
    echo "note: chromium/chromium-driver missing and this user cannot install them; the dashboard's" >&2
    echo "browser test will skip. As root: apt-get install -y chromium chromium-driver" >&2
  fi
fi

# tests/test_install_agent.py checks the device unit with `systemd-analyze verify` (offline:
# the package's tools only, nothing is started); without root that test skips, saying why.
if ! command -v systemd-analyze >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    echo "==> installing systemd (systemd-analyze) for the device unit's check"
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends systemd
  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    sudo apt-get update -q && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends systemd
  else
    echo "note: systemd-analyze missing; the device unit's check will skip. As root: apt-get install -y systemd" >&2
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
