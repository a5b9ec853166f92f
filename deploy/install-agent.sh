#!/usr/bin/env bash
# Install the fedslim agent on a device: 64-bit Raspberry Pi OS, Jetson Linux (aarch64) or
# x86_64 Debian/Ubuntu. Run from a checkout of this repository, as root:
#
#   sudo FEDSLIM_ENROLLMENT_TOKEN=... bash deploy/install-agent.sh --url https://coord:8443 \
#        --data /srv/photos --memory-budget 256MB [--min-battery 50] [--train-window 22:00-06:00] \
#        [--max-cpu-temp 75] [--mains-only] [--name pi-kitchen] [--infer-only] [--force-config]
#
# (the old form `install-agent.sh URL ENROLLMENT_TOKEN [MEMORY_BUDGET]` still works). It creates
#   /opt/fedslim/.venv            the `agent` extra (torch CPU, ONNX Runtime), or `agent-infer`
#   /etc/fedslim/agent.toml       coordinator URL, data path, budget, device policy (no secrets)
#   /var/lib/fedslim/identity.json the agent's credentials after enrollment, mode 0600
#   /etc/systemd/system/fedslim-agent.service  Restart=always, MemoryMax from the budget
# and is safe to run again: the venv is updated, an existing agent.toml is kept (unless
# --force-config), an enrolled device is not enrolled again.
#
# The enrollment token (one-time: `fedslim-coordinator enroll-token create --expires 24h`)
# comes from FEDSLIM_ENROLLMENT_TOKEN or --enrollment-token-file, not the command line, so it
# does not show in `ps`. Without one the device is installed but not enrolled.
#
# For tests and packaging: PREFIX=/tmp/root installs under that root (paths inside the files
# stay the final ones, as with DESTDIR); FEDSLIM_SKIP_PIP=1 makes no venv; FEDSLIM_SKIP_SYSTEM=1
# creates no user, changes no owner and runs no systemctl; FEDSLIM_AGENT_CMD replaces the
# venv's fedslim-agent for enrollment; FEDSLIM_ARCH replaces `uname -m`.
set -euo pipefail

die() { echo "install-agent: $*" >&2; exit 2; }
usage() { sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

PREFIX=${PREFIX:-}
PREFIX=${PREFIX%/}
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=/opt/fedslim/.venv
config=/etc/fedslim/agent.toml
state=/var/lib/fedslim
unit=/etc/systemd/system/fedslim-agent.service

url="" data="" budget=256MB name=$(hostname 2>/dev/null || echo agent) infer_only=0 force_config=0
min_battery="" train_window="" max_cpu_temp="" mains_only=0
token=${FEDSLIM_ENROLLMENT_TOKEN:-}
if [ $# -ge 1 ] && [ "${1#--}" = "$1" ]; then  # the old positional form
  url=$1; token=${2:-$token}; budget=${3:-$budget}; shift $(( $# < 3 ? $# : 3 ))
fi
while [ $# -gt 0 ]; do
  case $1 in
    --url) url=${2:?}; shift 2 ;;
    --data) data=${2:?}; shift 2 ;;
    --memory-budget) budget=${2:?}; shift 2 ;;
    --name) name=${2:?}; shift 2 ;;
    --min-battery) min_battery=${2:?}; shift 2 ;;
    --train-window) train_window=${2:?}; shift 2 ;;
    --max-cpu-temp) max_cpu_temp=${2:?}; shift 2 ;;
    --mains-only) mains_only=1; shift ;;
    --infer-only) infer_only=1; shift ;;
    --force-config) force_config=1; shift ;;
    --enrollment-token-file) token=$(tr -d '[:space:]' < "${2:?}"); shift 2 ;;
    -h|--help) usage 0 ;;
    *) echo "install-agent: unknown argument $1" >&2; usage 2 ;;
  esac
done

# ---------------------------------------------------------------- what this device is
arch=${FEDSLIM_ARCH:-$(uname -m)}
case $arch in
  aarch64|arm64|x86_64|amd64) ;;
  armv6l|armv7l|armhf|arm)
    cat >&2 <<EOF
install-agent: this is 32-bit ARM ($arch). PyTorch and ONNX Runtime publish no wheels for it,
so the agent can neither train nor run inference here.
What works on 32-bit ARM: the operator CLI (fedslim-coordinator list/agents/enroll-token, over
REST: pip install httpx and this package without extras), and reaching a coordinator from any
HTTP client. To run the agent, install 64-bit Raspberry Pi OS (Pi 3, 4, 5, Zero 2 W and
CM3/CM4/CM5 are 64-bit capable) and run this script again.
EOF
    exit 3 ;;
  *) echo "install-agent: unsupported architecture $arch (supported: aarch64, x86_64)" >&2; exit 3 ;;
esac

# ---------------------------------------------------------------- validate before touching anything
[ -n "$url" ] || die "--url is required (the coordinator, e.g. https://coordinator:8443)"
url_re='^https?://[][A-Za-z0-9.:_-]+(/[A-Za-z0-9._~/-]*)?$'  # host, [IPv6], port, plain path
[[ $url =~ $url_re ]] || die "--url $url: expected http(s)://HOST[:PORT][/path]"
[[ $name =~ ^[A-Za-z0-9._-]{1,100}$ ]] || die "--name $name: letters, digits, . _ - (at most 100)"
# strings written into TOML: no quotes, backslashes or control characters to escape
if [ -n "$data" ]; then
  [[ $data =~ ^/[^\"\\[:cntrl:]]*$ ]] || die "--data $data: an absolute path without quotes or backslashes"
fi
[[ $budget =~ ^([0-9]+)([KMGT]?)(i?B)?$ ]] || die "--memory-budget $budget: e.g. 256MB, 1GB (binary units)"
num=${BASH_REMATCH[1]} unit_letter=${BASH_REMATCH[2]:-}
case $unit_letter in
  "") budget_mib=$(( num / 1048576 )) ;; K) budget_mib=$(( num / 1024 )) ;;
  M) budget_mib=$num ;; G) budget_mib=$(( num * 1024 )) ;; T) budget_mib=$(( num * 1048576 )) ;;
esac
[ "$budget_mib" -ge 16 ] || die "--memory-budget $budget: at least 16MB"
if [ -n "$min_battery" ]; then
  [[ $min_battery =~ ^[0-9]{1,3}$ ]] && [ "$min_battery" -le 100 ] || die "--min-battery $min_battery: a percentage 0-100"
fi
if [ -n "$max_cpu_temp" ]; then
  [[ $max_cpu_temp =~ ^[0-9]{1,3}$ ]] && [ "$max_cpu_temp" -le 150 ] || die "--max-cpu-temp $max_cpu_temp: degrees C, 0-150"
fi
if [ -n "$train_window" ]; then
  [[ $train_window =~ ^([01][0-9]|2[0-3]):[0-5][0-9]-([01][0-9]|2[0-3]):[0-5][0-9]$ ]] \
    || die "--train-window $train_window: HH:MM-HH:MM (local time; may wrap midnight)"
fi
python=${PYTHON:-python3}
if [ "${FEDSLIM_SKIP_PIP:-0}" != 1 ]; then
  "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null \
    || die "$python is missing or older than 3.10 (apt-get install python3 python3-venv)"
fi

# The agent process may use the training budget plus what torch, the model and ONNX Runtime
# hold at rest (~300 MB RSS on aarch64 with torch 2.x); the agent is told that limit
# (memory_limit: it plans training within what is left of it), and systemd's MemoryMax sits
# 10 % above, so the agent's own plan binds before the kernel's OOM killer does.
overhead_mib=${FEDSLIM_OVERHEAD_MB:-384}
limit_mib=$(( budget_mib + overhead_mib ))
memory_max_mib=$(( limit_mib + limit_mib / 10 ))

root() { printf '%s%s' "$PREFIX" "$1"; }
system=1; [ "${FEDSLIM_SKIP_SYSTEM:-0}" = 1 ] && system=0

# ---------------------------------------------------------------- user, directories
if [ "$system" = 1 ] && ! id fedslim >/dev/null 2>&1; then
  useradd --system --home-dir "$state" --shell /usr/sbin/nologin fedslim
fi
install -d -m 0755 "$(root /etc/fedslim)" "$(root /opt/fedslim)" "$(root /etc/systemd/system)"
install -d -m 0700 "$(root "$state")"  # the credentials live here
[ "$system" = 1 ] && chown fedslim: "$(root "$state")"

# ---------------------------------------------------------------- the venv
extra=agent; [ "$infer_only" = 1 ] && extra=agent-infer
if [ "${FEDSLIM_SKIP_PIP:-0}" != 1 ]; then
  [ -x "$(root $venv)/bin/python" ] || "$python" -m venv "$(root $venv)"
  pip=("$(root $venv)/bin/python" -m pip install -q --disable-pip-version-check -c "$repo/constraints.txt")
  if [ "$extra" = agent ]; then  # the CPU build (no CUDA wheels); Jetson's CUDA torch: set FEDSLIM_TORCH_INDEX
    "${pip[@]}" --index-url "${FEDSLIM_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}" torch
  fi
  "${pip[@]}" "$repo[$extra]"
fi

# ---------------------------------------------------------------- the config (no secrets: 0644)
if [ "$infer_only" = 1 ]; then
  echo "inference only: $(root $venv)/bin/fedslim-agent infer --model model.onnx INPUT (no service is installed)"
  exit 0
fi
cfg=$(root $config)
if [ -e "$cfg" ] && [ "$force_config" = 0 ]; then
  echo "keeping $config (edit it, or run again with --force-config)"
else
  tmp=$(mktemp "$cfg.XXXXXX")
  {
    echo "# fedslim agent (written by deploy/install-agent.sh; keys are \`fedslim-agent run\` flags)"
    echo "url = \"$url\""
    echo "state_dir = \"$state\""
    [ -n "$data" ] && echo "data = \"$data\""
    echo "memory_budget = \"${budget_mib}MB\""
    echo "memory_limit = \"${limit_mib}MB\"  # the whole process; systemd's MemoryMax is ${memory_max_mib}M"
    echo "# device policy: when it says no, the agent declines (\"not now\") and another device is sampled"
    [ -n "$min_battery" ] && echo "min_battery = $min_battery  # on battery, train at or above this %"
    [ "$mains_only" = 1 ] && echo "mains_only = true"
    [ -n "$train_window" ] && echo "train_window = \"$train_window\"  # local time"
    [ -n "$max_cpu_temp" ] && echo "max_cpu_temp = $max_cpu_temp  # degrees C, from /sys/class/thermal"
    true
  } > "$tmp"
  chmod 0644 "$tmp" && mv "$tmp" "$cfg"
  echo "wrote $config"
fi

# ---------------------------------------------------------------- the unit
sed -e "s|@VENV@|$venv|g" -e "s|@CONFIG@|$config|g" -e "s|@STATE@|$state|g" \
    -e "s|@MEMORY_MAX@|${memory_max_mib}M|g" "$repo/deploy/fedslim-agent.service" > "$(root $unit).tmp"
chmod 0644 "$(root $unit).tmp" && mv "$(root $unit).tmp" "$(root $unit)"
echo "wrote $unit (MemoryMax=${memory_max_mib}M)"

# ---------------------------------------------------------------- enrollment (credentials 0600)
if [ -f "$(root "$state")/identity.json" ]; then
  echo "already enrolled (identity in $state); rotate with \`fedslim-coordinator rotate AGENT_ID\`"
elif [ -n "$token" ]; then
  agent_cmd=${FEDSLIM_AGENT_CMD:-$(root $venv)/bin/fedslim-agent}
  as_agent=(); [ "$system" = 1 ] && as_agent=(runuser -u fedslim --)
  # shellcheck disable=SC2086  # FEDSLIM_AGENT_CMD may be a command with arguments
  (umask 077 && FEDSLIM_ENROLLMENT_TOKEN=$token "${as_agent[@]}" $agent_cmd enroll --url "$url" \
     --state-dir "$(root "$state")" --name "$name" --memory-budget "${budget_mib}MB")
else
  echo "not enrolled: FEDSLIM_ENROLLMENT_TOKEN=... $(root $venv)/bin/fedslim-agent enroll --url $url --state-dir $state"
fi

if [ "$system" = 1 ]; then
  systemctl daemon-reload
  systemctl enable fedslim-agent
  systemctl restart fedslim-agent
  echo "started: journalctl -u fedslim-agent -f"
fi
