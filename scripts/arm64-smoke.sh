#!/usr/bin/env bash
# The fast arm64 check that CI runs on every commit: the agent, installed with the device extras
# (aarch64 wheels from PyPI) into an arm64 Debian userland, runs under qemu-user and, driven from
# the host over MQTT, verifies, self-tests and serves a signed bundle made on the host with the
# host's result, then takes a deploy and stops cleanly. Proves the device path on arm64;
# scripts/board-test.sh proves the systemd service on a full emulated board. Needs root.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LOG_NAME=arm64-smoke
source "$HERE/scripts/board/lib.sh"
need_root
host_packages
enable_binfmt
(source "$HERE/scripts/bootstrap.sh")  # the host venv (converter, fleet client) and mosquitto
cd "$HERE"

t0=$(date +%s)
UL=$(userland)
ENV_DIR=$CACHE/smoke-$(basename "$UL" | cut -d- -f2)-$(source_key "$HERE")
if [ ! -f "$ENV_DIR/done" ]; then
  rm -rf "$ENV_DIR"; mkdir -p "$ENV_DIR"
  say "installing edgeward[device] into a copy of the arm64 userland ($ENV_DIR)"
  cp -a "$UL/rootfs" "$ENV_DIR/rootfs"
  copy_source "$HERE" "$ENV_DIR/rootfs/opt/edgeward/src"
  trap unmount_all EXIT
  chroot_mounts "$ENV_DIR/rootfs"
  network_into "$ENV_DIR/rootfs"
  if ! { chroot "$ENV_DIR/rootfs" python3 -m venv /opt/edgeward/venv &&
         chroot "$ENV_DIR/rootfs" /opt/edgeward/venv/bin/python -m pip install --upgrade pip &&
         chroot "$ENV_DIR/rootfs" /opt/edgeward/venv/bin/python -m pip install "/opt/edgeward/src[device]"; } \
       >"$ENV_DIR/pip.log" 2>&1; then
    tail -30 "$ENV_DIR/pip.log" >&2; die "pip install in the arm64 userland failed (log: $ENV_DIR/pip.log)"
  fi
  unmount_all
  touch "$ENV_DIR/done"
fi
t1=$(date +%s)
say "arm64 environment ready ($((t1 - t0)) s)"
.venv/bin/python scripts/board/arm64_smoke.py --rootfs "$ENV_DIR/rootfs"
say "done in $(( $(date +%s) - t0 )) s"
