#!/usr/bin/env bash
# Build (and cache) an arm64 Debian bookworm disk image with systemd, with the edgeward agent
# installed by scripts/install-board.sh exactly as a user would on a fresh board.
#
# Two cached layers, each keyed by its inputs:
#   base-<key>/   debootstrap + kernel + systemd      (slow under emulation: ~15-20 min, rarely changes)
#   image-<key>/  disk.img, vmlinuz, initrd.img, signing key of the agent layer (~2-4 min)
# Prints the image folder on its last line. Needs root and Debian's qemu/debootstrap packages
# (installed with apt when missing).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${EDGEWARD_BOARD_CACHE:-/var/cache/edgeward-board}
SUITE=bookworm
MIRROR=${EDGEWARD_DEBIAN_MIRROR:-http://deb.debian.org/debian}
BASE_INCLUDE="python3,python3-venv,python3-pip,ca-certificates,openssl"
BASE_PACKAGES="linux-image-arm64 systemd-sysv udev kmod iproute2 ifupdown isc-dhcp-client procps"
HOST_PACKAGES="qemu-user-static binfmt-support debootstrap qemu-system-arm qemu-utils ipxe-qemu e2fsprogs openssl"

say() { printf 'board-image: %s\n' "$*" >&2; }
die() { printf 'board-image: error: %s\n' "$*" >&2; exit 1; }
stamp() { date +%s; }

[ "$(id -u)" = 0 ] || die "run as root: debootstrap, chroot and binfmt need it (sudo $0)"
missing=()
for p in $HOST_PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  command -v apt-get >/dev/null || die "missing packages: ${missing[*]} (and no apt-get to install them)"
  say "installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || die "apt-get could not install: ${missing[*]}"
fi

# arm64 binaries in a chroot run through qemu-user via binfmt_misc
if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
  mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc 2>/dev/null || die "cannot mount binfmt_misc (is this container privileged?)"
fi
update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || die "binfmt for qemu-aarch64 is not registered"

MOUNTS=()
cleanup() {
  local i
  for (( i=${#MOUNTS[@]}-1; i>=0; i-- )); do umount -l "${MOUNTS[$i]}" 2>/dev/null || true; done
}
trap cleanup EXIT
chroot_mounts() {  # chroot_mounts ROOTFS: the pseudo file systems a chroot needs
  local r=$1
  for m in proc sys dev dev/pts; do mkdir -p "$r/$m"; done
  mount -t proc proc "$r/proc" && MOUNTS+=("$r/proc")
  mount -t sysfs sysfs "$r/sys" && MOUNTS+=("$r/sys")
  mount --bind /dev "$r/dev" && MOUNTS+=("$r/dev")
  mount --bind /dev/pts "$r/dev/pts" && MOUNTS+=("$r/dev/pts")
}
chroot_unmount() { cleanup; MOUNTS=(); }
network_into() {  # resolver, CA certificates and pip settings of the host, so apt and pip work inside
  local r=$1
  cp -L /etc/resolv.conf "$r/etc/resolv.conf"
  if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    mkdir -p "$r/usr/local/share/ca-certificates"
    cp /usr/local/share/ca-certificates/*.crt "$r/usr/local/share/ca-certificates/"
    chroot "$r" update-ca-certificates >/dev/null 2>&1 || true
  fi
  [ -f /etc/pip.conf ] && cp /etc/pip.conf "$r/etc/pip.conf" || true
}

# ------------------------------------------------------------------ layer 1: base system
base_key=$(printf '%s\n' "base-v1" "$SUITE" "$MIRROR" "$BASE_INCLUDE" "$BASE_PACKAGES" | sha256sum | cut -c1-16)
BASE=$CACHE/base-$base_key
if [ ! -f "$BASE/done" ]; then
  rm -rf "$BASE"; mkdir -p "$BASE"
  t0=$(stamp)
  say "building the base system in $BASE (debootstrap + kernel under emulation; 15-20 min, cached)"
  debootstrap --arch=arm64 --foreign --variant=minbase --include="$BASE_INCLUDE" "$SUITE" "$BASE/rootfs" "$MIRROR" \
    >"$BASE/debootstrap.log" 2>&1 || { tail -20 "$BASE/debootstrap.log" >&2; die "debootstrap (first stage) failed"; }
  chroot "$BASE/rootfs" /debootstrap/debootstrap --second-stage >>"$BASE/debootstrap.log" 2>&1 \
    || { tail -20 "$BASE/debootstrap.log" >&2; die "debootstrap (second stage) failed"; }
  t1=$(stamp)
  chroot_mounts "$BASE/rootfs"
  network_into "$BASE/rootfs"
  echo "deb $MIRROR $SUITE main" > "$BASE/rootfs/etc/apt/sources.list"
  chroot "$BASE/rootfs" apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive chroot "$BASE/rootfs" apt-get install -y -qq --no-install-recommends $BASE_PACKAGES \
    >"$BASE/packages.log" 2>&1 || { tail -20 "$BASE/packages.log" >&2; die "installing the kernel and systemd failed"; }
  chroot "$BASE/rootfs" apt-get clean
  chroot_unmount
  echo "edgeward-board" > "$BASE/rootfs/etc/hostname"
  printf '127.0.0.1 localhost\n127.0.1.1 edgeward-board\n' > "$BASE/rootfs/etc/hosts"
  echo "/dev/vda / ext4 defaults,errors=remount-ro 0 1" > "$BASE/rootfs/etc/fstab"
  mkdir -p "$BASE/rootfs/etc/network"
  printf 'auto lo\niface lo inet loopback\nauto eth0\niface eth0 inet dhcp\n' > "$BASE/rootfs/etc/network/interfaces"
  # no login prompt on the serial console: it would swallow the boot log we keep for debugging
  ln -sf /dev/null "$BASE/rootfs/etc/systemd/system/serial-getty@ttyAMA0.service"
  t2=$(stamp)
  printf 'debootstrap_s=%s\nkernel_and_systemd_s=%s\n' $((t1 - t0)) $((t2 - t1)) > "$BASE/timings"
  touch "$BASE/done"
  say "base system ready ($((t2 - t0)) s)"
fi

# ------------------------------------------------------------------ layer 2: the agent, installed as a user would
SOURCES=(pyproject.toml README.md LICENSE agent converters systemd scripts/install-board.sh)
src_key=$(cd "$HERE" && find "${SOURCES[@]}" -type f -not -name '*.pyc' -print0 | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16)
image_key=$(printf '%s\n' "image-v1" "$base_key" "$src_key" | sha256sum | cut -c1-16)
IMAGE=$CACHE/image-$image_key
if [ ! -f "$IMAGE/done" ]; then
  rm -rf "$IMAGE"; mkdir -p "$IMAGE"
  t0=$(stamp)
  say "installing the agent into a copy of the base system ($IMAGE)"
  ROOTFS=$IMAGE/rootfs
  cp -a "$BASE/rootfs" "$ROOTFS"
  mkdir -p "$ROOTFS/opt/edgeward/src"
  (cd "$HERE" && tar -cf - --exclude='__pycache__' "${SOURCES[@]}") | tar -xf - -C "$ROOTFS/opt/edgeward/src"
  # the signing key pair of this image: boards trust the public half
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
  chroot_unmount
  rm -f "$ROOTFS/etc/resolv.conf"; ln -s /run/resolvconf/resolv.conf "$ROOTFS/etc/resolv.conf" 2>/dev/null || true
  t1=$(stamp)
  cp "$ROOTFS"/boot/vmlinuz-* "$IMAGE/vmlinuz"
  cp "$ROOTFS"/boot/initrd.img-* "$IMAGE/initrd.img"
  size_mb=$(( $(du -sm "$ROOTFS" | cut -f1) + 1024 ))
  mkfs.ext4 -q -F -L edgeward-root -d "$ROOTFS" "$IMAGE/disk.img" "${size_mb}M"
  rm -rf "$ROOTFS"
  t2=$(stamp)
  cp "$BASE/timings" "$IMAGE/timings"
  printf 'install_board_s=%s\nmkfs_s=%s\n' $((t1 - t0)) $((t2 - t1)) >> "$IMAGE/timings"
  touch "$IMAGE/done"
  say "image ready ($((t2 - t0)) s): $IMAGE/disk.img"
fi
echo "$IMAGE"
