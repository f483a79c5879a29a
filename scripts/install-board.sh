#!/usr/bin/env bash
# Install, update or remove the edgeward agent on a board (Raspberry Pi OS, Jetson Ubuntu).
# Unattended and idempotent: safe in first-boot scripts and cloud-init, safe to run again.
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: install-board.sh [options]            install or update the agent
       install-board.sh --uninstall [--purge] remove it (the model store stays unless --purge)

  --device-id ID      this board's id in MQTT topics (default: the host name)
  --broker URL        mqtt://HOST:PORT or mqtts://HOST:PORT (default: mqtt://localhost:1883)
  --trust-key FILE    public key whose signed bundles this board accepts (repeatable; required
                      the first time)
  --budget-mb N       RAM budget for the agent (default: 256); MemoryHigh/MemoryMax follow it
  --source SPEC       what to pip-install: a checkout, a wheel or a PyPI spec (default: this checkout)
  --python PY         interpreter for the venv (default: python3, >= 3.10)
  --onnxruntime SPEC  the onnxruntime build to install instead of PyPI's CPU one: a pip requirement
                      or a wheel (e.g. JetPack's onnxruntime_gpu-...-linux_aarch64.whl for CUDA and
                      TensorRT); remembered, so later updates keep it
  --reconfigure       rewrite /etc/edgeward/agent.yaml from these flags (default: keep an existing one)
  --no-start          install and enable, but do not (re)start the service now
  --root DIR          install into DIR instead of / (throwaway trees for tests and staging)
  --uninstall         remove the service, venv and configuration
  --purge             with --uninstall: remove the model store too
USAGE
}

say() { printf 'install-board: %s\n' "$*"; }
die() { printf 'install-board: error: %s\n' "$*" >&2; exit 1; }

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ROOT="" DEVICE_ID="" BROKER="mqtt://localhost:1883" BUDGET_MB=256 SOURCE="$HERE" PY=python3
UNINSTALL=0 PURGE=0 NO_START=0 RECONFIGURE=0 ORT_SPEC=""
TRUST_KEYS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --device-id) DEVICE_ID=${2:?--device-id needs a value}; shift 2 ;;
    --broker) BROKER=${2:?--broker needs a URL}; shift 2 ;;
    --trust-key) TRUST_KEYS+=("${2:?--trust-key needs a file}"); shift 2 ;;
    --budget-mb) BUDGET_MB=${2:?--budget-mb needs a number}; shift 2 ;;
    --source) SOURCE=${2:?--source needs a value}; shift 2 ;;
    --python) PY=${2:?--python needs a value}; shift 2 ;;
    --onnxruntime) ORT_SPEC=${2:?--onnxruntime needs a pip requirement or a wheel}; shift 2 ;;
    --root) ROOT=$(realpath -m "${2:?--root needs a folder}"); shift 2 ;;
    --reconfigure) RECONFIGURE=1; shift ;;
    --no-start) NO_START=1; shift ;;
    --uninstall) UNINSTALL=1; shift ;;
    --purge) PURGE=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown option $1" ;;
  esac
done

[ -n "$ROOT" ] || [ "$(id -u)" = 0 ] || die "run as root (sudo $0 ...), or use --root DIR for a throwaway tree"
[[ "$BUDGET_MB" =~ ^[0-9]+$ ]] && [ "$BUDGET_MB" -ge 16 ] || die "--budget-mb must be a whole number >= 16, got '$BUDGET_MB'"
case "$BROKER" in mqtt://?*|mqtts://?*) ;; *) die "--broker must look like mqtt://HOST:PORT, got '$BROKER'" ;; esac

UNIT=edgeward-agent.service
PREFIX=$ROOT/opt/edgeward
VENV=$PREFIX/venv
ETC=$ROOT/etc/edgeward
UNIT_DIR=$ROOT/etc/systemd/system
DROPIN=$UNIT_DIR/$UNIT.d
STATE=$ROOT/var/lib/edgeward
live_systemd() { [ -z "$ROOT" ] && [ -d /run/systemd/system ]; }
systemctl_offline() { systemctl --root="${ROOT:-/}" "$@" >/dev/null 2>&1; }

if [ "$UNINSTALL" = 1 ]; then
  if live_systemd; then
    systemctl disable --now "$UNIT" >/dev/null 2>&1 || true
  else
    systemctl_offline disable "$UNIT" || rm -f "$UNIT_DIR/multi-user.target.wants/$UNIT"
  fi
  rm -rf "$UNIT_DIR/$UNIT" "$DROPIN" "$PREFIX" "$ETC"
  live_systemd && systemctl daemon-reload
  if [ "$PURGE" = 1 ]; then
    rm -rf "$STATE" "$ROOT/var/lib/private/edgeward"
    say "removed the agent, its configuration and its model store"
  else
    say "removed the agent and its configuration; the model store in ${STATE} stays (--purge removes it)"
  fi
  exit 0
fi

# --- python and the venv (device extras only) ------------------------------------
command -v "$PY" >/dev/null 2>&1 || die "$PY not found: apt-get install -y python3 python3-venv"
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || die "python >= 3.10 is needed, $PY is $("$PY" --version 2>&1)"
if ! "$PY" -c 'import ensurepip, venv' >/dev/null 2>&1; then
  if [ -z "$ROOT" ] && command -v apt-get >/dev/null 2>&1; then
    say "installing python3-venv"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
  else
    die "the python venv module is missing: apt-get install -y python3-venv"
  fi
fi
mkdir -p "$PREFIX"
[ -x "$VENV/bin/python" ] || { say "creating $VENV"; "$PY" -m venv "$VENV"; }
# the board's own onnxruntime build, given once and kept for every later update: PyPI's CPU
# `onnxruntime` installed beside onnxruntime-gpu would overwrite the GPU build's files
ORT_FILE=$PREFIX/onnxruntime-requirements  # that build, and numpy<2 where it needed it; one a line
ORT_REQS=()
if [ -n "$ORT_SPEC" ]; then
  ORT_REQS=("$ORT_SPEC")
elif [ -f "$ORT_FILE" ]; then
  mapfile -t ORT_REQS < "$ORT_FILE"
fi
log=$PREFIX/install.log
if [ ${#ORT_REQS[@]} = 0 ]; then
  say "installing edgeward[device] from $SOURCE"
  install_cmd=(-m pip install --upgrade "$SOURCE[device]")
else
  say "installing edgeward[device-base] from $SOURCE, and onnxruntime from ${ORT_REQS[0]}"
  install_cmd=(-m pip install --upgrade "$SOURCE[device-base]" "${ORT_REQS[@]}")
fi
if ! { "$VENV/bin/python" -m pip install --upgrade pip &&
       { [ ${#ORT_REQS[@]} = 0 ] || "$VENV/bin/python" -m pip uninstall -y onnxruntime onnxruntime-gpu; } &&
       "$VENV/bin/python" "${install_cmd[@]}"; } >"$log" 2>&1; then
  tail -n 30 "$log" >&2; die "pip failed; the whole log is in $log"
fi
"$VENV/bin/edgeward" --version >/dev/null || die "the installed edgeward does not run; see $log"
ort_check() { "$VENV/bin/python" -c 'import onnxruntime as o; print(o.__version__, "with", ", ".join(o.get_available_providers()))' 2>&1; }
numpy2() { "$VENV/bin/python" -c 'import sys, numpy; sys.exit(int(numpy.__version__.split(".")[0]) < 2)' 2>/dev/null; }
if [ ${#ORT_REQS[@]} != 0 ]; then
  # builds before onnxruntime 1.19 (JetPack 6 has 1.17) were compiled against numpy 1 and fail to
  # import beside numpy 2, though their metadata lets pip choose it
  broken() { die "onnxruntime from ${ORT_REQS[0]} does not import (${ort##*$'\n'}): check that it is built for this board's Python and CPU"; }
  ort=$(ort_check) || {
    numpy2 || broken
    say "onnxruntime from ${ORT_REQS[0]} was built for numpy 1: installing numpy<2 beside it"
    "$VENV/bin/python" -m pip install 'numpy<2' >>"$log" 2>&1 || die "pip could not install numpy<2; the whole log is in $log"
    ORT_REQS+=("numpy<2")
    ort=$(ort_check) || broken
  }
  printf '%s\n' "${ORT_REQS[@]}" > "$ORT_FILE"
  say "onnxruntime $ort"
fi

# --- configuration and trust -----------------------------------------------------
mkdir -p "$ETC/trusted"
chmod 0755 "$ETC" "$ETC/trusted"
for key in "${TRUST_KEYS[@]}"; do
  [ -f "$key" ] || die "--trust-key $key: no such file"
  grep -q "BEGIN PUBLIC KEY" "$key" || die "--trust-key $key is not a PEM public key (use the .pub from 'edgeward keys gen')"
  install -m 0644 "$key" "$ETC/trusted/$(basename "$key")"
done
keys=$(find "$ETC/trusted" -maxdepth 1 -name '*.pub' -printf '/etc/edgeward/trusted/%f\n' | sort | paste -sd, - | sed 's/,/, /g')
[ -n "$keys" ] || die "no trusted key: pass --trust-key FILE (the .pub from 'edgeward keys gen')"
if [ ! -f "$ETC/agent.yaml" ] || [ "$RECONFIGURE" = 1 ]; then
  id=${DEVICE_ID:-$(cat "$ROOT/etc/hostname" 2>/dev/null || hostname)}
  id=${id%%.*}
  [[ "$id" =~ ^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$ ]] || die "device id '$id' may hold only letters, digits, '_', '.', '-'"
  tmp=$(mktemp "$ETC/.agent.yaml.XXXXXX")
  sed -e "s#@DEVICE_ID@#$id#" -e "s#@BROKER@#$BROKER#" -e "s#@BUDGET_MB@#$BUDGET_MB#" -e "s#@TRUST_KEYS@#$keys#" \
    "$HERE/systemd/agent.yaml.in" > "$tmp"
  chmod 0644 "$tmp"
  mv -f "$tmp" "$ETC/agent.yaml"
  say "wrote /etc/edgeward/agent.yaml (device $id, broker $BROKER, budget ${BUDGET_MB} MB)"
else
  say "kept the existing /etc/edgeward/agent.yaml (--reconfigure rewrites it)"
  BUDGET_MB=$("$VENV/bin/python" -c 'import sys, yaml; print((yaml.safe_load(open(sys.argv[1])) or {}).get("memory", {}).get("budget_mb", 256))' "$ETC/agent.yaml")
fi
"$VENV/bin/python" - "$ETC/agent.yaml" <<'PY' || die "/etc/edgeward/agent.yaml does not validate (see above)"
import sys
from agent.config import load_config
from agent.errors import ConfigError
try:
    load_config(sys.argv[1], check_files=False)
except ConfigError as exc:
    sys.exit(f"install-board: error: {exc}")
PY

# --- the unit, its memory limits, enabled ----------------------------------------
mkdir -p "$UNIT_DIR" "$DROPIN"
install -m 0644 "$HERE/systemd/$UNIT" "$UNIT_DIR/$UNIT"
high=$(( BUDGET_MB + (BUDGET_MB / 4 > 64 ? BUDGET_MB / 4 : 64) ))
max=$(( BUDGET_MB + (BUDGET_MB / 2 > 128 ? BUDGET_MB / 2 : 128) ))
cat > "$DROPIN/10-memory.conf" <<CONF
# Written by install-board.sh from memory.budget_mb = $BUDGET_MB: the kernel's limits sit above
# the agent's own budget (MemoryHigh throttles, MemoryMax is the OOM line).
[Service]
MemoryHigh=${high}M
MemoryMax=${max}M
CONF
chmod 0644 "$DROPIN/10-memory.conf"
if live_systemd; then
  systemctl daemon-reload
  systemctl enable "$UNIT" >/dev/null 2>&1
  if [ "$NO_START" = 0 ]; then
    systemctl restart "$UNIT"
    say "started $UNIT (journalctl -u edgeward-agent -f to follow it)"
  fi
else
  if ! systemctl_offline enable "$UNIT"; then
    mkdir -p "$UNIT_DIR/multi-user.target.wants"
    ln -sf "/etc/systemd/system/$UNIT" "$UNIT_DIR/multi-user.target.wants/$UNIT"
  fi
  say "enabled $UNIT; it starts on the next boot"
fi
say "done: MemoryHigh=${high}M MemoryMax=${max}M; check with 'edgeward agent check --config /etc/edgeward/agent.yaml' and 'edgeward agent status --config /etc/edgeward/agent.yaml'"
