#!/usr/bin/env bash
# Boot the emulated arm64 board (scripts/board-image.sh) under qemu-system-aarch64 and check,
# from the host and through MQTT only, that the agent behaves as a real systemd service:
# READY and birth, telemetry, a signed deploy with the host's result, an over-budget refusal,
# MemoryMax in force, a watchdog restart of a wedged agent, and a clean stop.
# Prints a summary table; exits non-zero when any check fails. Needs root.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
say() { printf 'board-test: %s\n' "$*" >&2; }
die() { printf 'board-test: error: %s\n' "$*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root (it builds the image with debootstrap and chroot): sudo $0"
LOGS=${EDGEWARD_BOARD_LOGS:-$HERE/board-test-logs}
BUDGET_MB=200

source "$HERE/scripts/bootstrap.sh"      # the host venv: converter, fleet client, mosquitto
cd "$HERE"
t0=$(date +%s)
IMAGE=$(bash "$HERE/scripts/board-image.sh" | tail -n 1)
t_image=$(( $(date +%s) - t0 ))
command -v qemu-system-aarch64 >/dev/null || die "qemu-system-aarch64 is missing: apt-get install -y qemu-system-arm"

WORK=$(mktemp -d /tmp/edgeward-board-test.XXXXXX)
QEMU_PID="" BROKER_PID=""
cleanup() {
  [ -n "$QEMU_PID" ] && kill "$QEMU_PID" 2>/dev/null && wait "$QEMU_PID" 2>/dev/null || true
  [ -n "$BROKER_PID" ] && kill "$BROKER_PID" 2>/dev/null && wait "$BROKER_PID" 2>/dev/null || true
  mkdir -p "$LOGS"
  cp "$WORK"/*.log "$LOGS/" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# a private broker on the host's loopback; the guest reaches it at 10.0.2.2
PORT=$(.venv/bin/python -c 'from agent.devbroker import free_port; print(free_port())')
printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\nset_tcp_nodelay true\nlog_dest stderr\n' \
  "$PORT" > "$WORK/mosquitto.conf"
"$(command -v mosquitto || echo /usr/sbin/mosquitto)" -c "$WORK/mosquitto.conf" 2>"$WORK/mosquitto.log" & BROKER_PID=$!

# a run copy of the image with this run's broker address and the test helper
cp --sparse=always "$IMAGE/disk.img" "$WORK/run.img"
sed -e "s#url: mqtt://10.0.2.2:1883#url: mqtt://10.0.2.2:$PORT#" -e "s#interval_s: 10#interval_s: 5#" \
  > "$WORK/agent.yaml" < <(debugfs -R "cat /etc/edgeward/agent.yaml" "$WORK/run.img" 2>/dev/null)
grep -q "mqtt://10.0.2.2:$PORT" "$WORK/agent.yaml" || die "could not read /etc/edgeward/agent.yaml from the image"
sed "s/@PORT@/$PORT/" scripts/board/edgeward-boardtest.service > "$WORK/edgeward-boardtest.service"
cp scripts/board/boardtest-helper.py "$WORK/helper.py"
chmod 0644 "$WORK"/agent.yaml "$WORK"/edgeward-boardtest.service "$WORK"/helper.py
debugfs -w -f - "$WORK/run.img" >/dev/null 2>"$WORK/debugfs.log" <<CMDS
rm /etc/edgeward/agent.yaml
write $WORK/agent.yaml /etc/edgeward/agent.yaml
write $WORK/helper.py /usr/local/lib/edgeward-boardtest.py
write $WORK/edgeward-boardtest.service /etc/systemd/system/edgeward-boardtest.service
symlink /etc/systemd/system/multi-user.target.wants/edgeward-boardtest.service /etc/systemd/system/edgeward-boardtest.service
CMDS

say "booting the board (software emulation; the first boot takes a minute or two)"
qemu-system-aarch64 -machine virt -cpu cortex-a72 -smp 2 -m 2048 -display none -monitor none \
  -kernel "$IMAGE/vmlinuz" -initrd "$IMAGE/initrd.img" \
  -append "root=/dev/vda rw console=ttyAMA0 net.ifnames=0" \
  -drive "file=$WORK/run.img,format=raw,if=virtio" \
  -netdev user,id=n0 -device virtio-net-pci,netdev=n0 \
  -serial "file:$WORK/console.log" & QEMU_PID=$!

rc=0
.venv/bin/python scripts/board_checks.py --broker "mqtt://127.0.0.1:$PORT" --device board-01 \
  --image-dir "$IMAGE" --budget-mb "$BUDGET_MB" | tee "$WORK/checks.log" || rc=$?
printf '\nimage: %s (%s s this run)\n' "$IMAGE" "$t_image"
cat "$IMAGE/timings"
say "logs (console, broker, checks) in $LOGS"
exit $rc
