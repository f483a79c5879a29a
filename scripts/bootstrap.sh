#!/usr/bin/env bash
# Prepares this checkout for the demo and the tests, on a fresh Debian / Raspberry Pi OS machine:
#   - mosquitto (installed with apt when missing and we are root; otherwise says what to run)
#   - .venv with edgeward[device,host,torch,tensorflow,dev,test-models] (re-installed when pyproject.toml changes)
# Sourced by scripts/demo.sh and scripts/test.sh; safe to run again.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

say() { printf 'edgeward: %s\n' "$*" >&2; }
PY=${PYTHON:-python3}

if ! command -v "$PY" >/dev/null 2>&1; then
  say "python3 is missing: run 'sudo apt-get install -y python3 python3-venv' and try again"; exit 1
fi
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
  say "python 3.10 or newer is needed, found $("$PY" --version 2>&1)"; exit 1
fi

as_root_apt() {  # as_root_apt PACKAGE...: install with apt if we can, else explain
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing $* with apt-get"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
  else
    say "missing: $*. Run 'sudo apt-get install -y $*' and try again"; exit 1
  fi
}

if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
  as_root_apt mosquitto
fi

if [ ! -x .venv/bin/python ]; then
  say "creating .venv"
  if ! "$PY" -m venv .venv >/dev/null 2>&1; then
    rm -rf .venv
    as_root_apt python3-venv
    "$PY" -m venv .venv
  fi
fi

stamp=.venv/.edgeward-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  say "installing edgeward[device,host,torch,tensorflow,dev,test-models] into .venv (first run takes a few minutes)"
  log=.venv/install.log
  if ! { .venv/bin/python -m pip install --upgrade pip &&
         .venv/bin/python -m pip install -e ".[device,host,torch,tensorflow,dev,test-models]"; } >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    say "installing failed; the whole log is in $log"; exit 1
  fi
  echo "$want" > "$stamp"
fi
