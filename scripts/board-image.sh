#!/usr/bin/env bash
# Build (and cache) an arm64 Debian bookworm disk image with systemd, with the edgeward agent
# installed by scripts/install-board.sh exactly as a user would on a fresh board.
#
# Cached layers, each keyed by its inputs (folder names carry the key):
#   userland-<key>/  debootstrap minbase + python (shared with scripts/arm64-smoke.sh)
#   base-<key>/      + kernel, systemd, networking  (slow under emulation: ~20-30 min, rarely changes)
#   image-<key>/     disk.img, vmlinuz, initrd.img and the image's signing key pair (~3-5 min)
# Prints the image folder on its last line. Needs root; installs Debian's qemu/debootstrap
# packages with apt when they are missing.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LOG_NAME=board-image
source "$HERE/scripts/board/lib.sh"
BASE_PACKAGES="linux-image-arm64 systemd-sysv udev kmod iproute2 ifupdown isc-dhcp-client procps"

need_root
host_packages
enable_binfmt
trap unmount_all EXIT

# ------------------------------------------------------------------ base system: userland + kernel + systemd
base_key=$(printf '%s\n' "base-v1" "$SUITE" "$MIRROR" "$USERLAND_INCLUDE" "$BASE_PACKAGES" | sha256sum | cut -c1-16)
BASE=$CACHE/base-$base_key
if [ ! -f "$BASE/done" ]; then
  UL=$(userland)
  rm -rf "$BASE"; mkdir -p "$BASE"
  t0=$(date +%s)
  say "adding the kernel and systemd to the userland in $BASE (initramfs under emulation: ~20 min, cached)"
  cp -a "$UL/rootfs" "$BASE/rootfs"
  chroot_mounts "$BASE/rootfs"
  network_into "$BASE/rootfs"
  chroot "$BASE/rootfs" apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive chroot "$BASE/rootfs" apt-get install -y -qq --no-install-recommends $BASE_PACKAGES \
    >"$BASE/packages.log" 2>&1 || { tail -20 "$BASE/packages.log" >&2; die "installing the kernel and systemd failed"; }
  chroot "$BASE/rootfs" apt-get clean
  unmount_all
  echo "edgeward-board" > "$BASE/rootfs/etc/hostname"
  printf '127.0.0.1 localhost\n127.0.1.1 edgeward-board\n' > "$BASE/rootfs/etc/hosts"
  echo "/dev/vda / ext4 defaults,errors=remount-ro 0 1" > "$BASE/rootfs/etc/fstab"
  mkdir -p "$BASE/rootfs/etc/network"
  printf 'auto lo\niface lo inet loopback\nauto eth0\niface eth0 inet dhcp\n' > "$BASE/rootfs/etc/network/interfaces"
  # no login prompt on the serial console: it would swallow the boot log kept for debugging
  ln -sf /dev/null "$BASE/rootfs/etc/systemd/system/serial-getty@ttyAMA0.service"
  cp "$UL/timings" "$BASE/timings"
  printf 'kernel_and_systemd_s=%s\n' $(( $(date +%s) - t0 )) >> "$BASE/timings"
  touch "$BASE/done"
  say "base system ready ($(( $(date +%s) - t0 )) s)"
fi

# ------------------------------------------------------------------ the agent, installed as a user would
image_key=$(printf '%s\n' "image-v1" "$base_key" "$(source_key "$HERE")" | sha256sum | cut -c1-16)
IMAGE=$CACHE/image-$image_key
if [ ! -f "$IMAGE/done" ]; then
  rm -rf "$IMAGE"; mkdir -p "$IMAGE"
  t0=$(date +%s)
  say "installing the agent with install-board.sh into a copy of the base system ($IMAGE)"
  ROOTFS=$IMAGE/rootfs
  cp -a "$BASE/rootfs" "$ROOTFS"
  copy_source "$HERE" "$ROOTFS/opt/edgeward/src"
  # the image's signing key pair: the board trusts the public half, board-test.sh signs with the private one
  openssl genpkey -algorithm ed25519 -out "$IMAGE/signing.key" 2>/dev/null
  openssl pkey -in "$IMAGE/signing.key" -pubout -out "$IMAGE/signing.pub" 2>/dev/null
  chmod 0600 "$IMAGE/signing.key"
  chroot_mounts "$ROOTFS"
  network_into "$ROOTFS"
  cp "$IMAGE/signing.pub" "$ROOTFS/tmp/signing.pub"
  chroot "$ROOTFS" /opt/edgeward/src/scripts/install-board.sh --no-start --device-id board-01 \
      --broker mqtt://10.0.2.2:1883 --trust-key /tmp/signing.pub --budget-mb 200 --source /opt/edgeward/src \
      >"$IMAGE/install-board.log" 2>&1 || { tail -30 "$IMAGE/install-board.log" >&2; die "install-board.sh failed in the arm64 root"; }
  rm -f "$ROOTFS/tmp/signing.pub"
  unmount_all
  t1=$(date +%s)
  cp "$ROOTFS"/boot/vmlinuz-* "$IMAGE/vmlinuz"
  cp "$ROOTFS"/boot/initrd.img-* "$IMAGE/initrd.img"
  size_mb=$(( $(du -sm "$ROOTFS" | cut -f1) + 1024 ))
  mkfs.ext4 -q -F -L edgeward-root -d "$ROOTFS" "$IMAGE/disk.img" "${size_mb}M" >/dev/null
  rm -rf "$ROOTFS"
  cp "$BASE/timings" "$IMAGE/timings"
  printf 'install_board_s=%s\nmkfs_s=%s\n' $((t1 - t0)) $(( $(date +%s) - t1 )) >> "$IMAGE/timings"
  touch "$IMAGE/done"
  say "image ready ($(( $(date +%s) - t0 )) s): $IMAGE/disk.img"
fi
echo "$IMAGE"
