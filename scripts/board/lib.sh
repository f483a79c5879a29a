# Shared by scripts/board-image.sh and scripts/arm64-smoke.sh: host tools, binfmt, chroot plumbing,
# and the cached arm64 userland. Source it; it defines functions and a few variables only.

CACHE=${EDGEWARD_BOARD_CACHE:-/var/cache/edgeward-board}
SUITE=bookworm
MIRROR=${EDGEWARD_DEBIAN_MIRROR:-http://deb.debian.org/debian}
USERLAND_INCLUDE="python3,python3-venv,python3-pip,ca-certificates,openssl"
HOST_PACKAGES="qemu-user-static binfmt-support debootstrap qemu-system-arm qemu-utils ipxe-qemu e2fsprogs openssl"
MOUNTS=()

say() { printf '%s: %s\n' "${LOG_NAME:-board}" "$*" >&2; }
die() { printf '%s: error: %s\n' "${LOG_NAME:-board}" "$*" >&2; exit 1; }

need_root() { [ "$(id -u)" = 0 ] || die "run as root: debootstrap, chroot and binfmt need it (sudo $0)"; }

host_packages() {  # install Debian's qemu/debootstrap tools when missing
  local missing=() p
  for p in $HOST_PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  command -v apt-get >/dev/null || die "missing packages: ${missing[*]} (and no apt-get to install them)"
  say "installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || die "apt-get could not install: ${missing[*]}"
}

enable_binfmt() {  # arm64 binaries in a chroot run through qemu-user
  if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc 2>/dev/null \
      || die "cannot mount binfmt_misc (is this container privileged?)"
  fi
  update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
  [ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || die "binfmt for qemu-aarch64 is not registered"
}

unmount_all() {
  local i
  for (( i=${#MOUNTS[@]}-1; i>=0; i-- )); do umount -l "${MOUNTS[$i]}" 2>/dev/null || true; done
  MOUNTS=()
}

chroot_mounts() {  # chroot_mounts ROOTFS: the pseudo file systems a chroot needs
  local r=$1 m
  for m in proc sys dev dev/pts; do mkdir -p "$r/$m"; done
  mount -t proc proc "$r/proc" && MOUNTS+=("$r/proc")
  mount -t sysfs sysfs "$r/sys" && MOUNTS+=("$r/sys")
  mount --bind /dev "$r/dev" && MOUNTS+=("$r/dev")
  mount --bind /dev/pts "$r/dev/pts" && MOUNTS+=("$r/dev/pts")
}

network_into() {  # the host's resolver, CA certificates and pip settings, so apt and pip work inside
  local r=$1
  cp -L /etc/resolv.conf "$r/etc/resolv.conf"
  if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    mkdir -p "$r/usr/local/share/ca-certificates"
    cp /usr/local/share/ca-certificates/*.crt "$r/usr/local/share/ca-certificates/"
    chroot "$r" update-ca-certificates >/dev/null 2>&1 || true
  fi
  if [ -f /etc/pip.conf ]; then cp /etc/pip.conf "$r/etc/pip.conf"; fi
}

userland() {  # userland: print the cached arm64 Debian userland folder (debootstrap minbase + python), building it once
  local key dir t0
  key=$(printf '%s\n' "userland-v1" "$SUITE" "$MIRROR" "$USERLAND_INCLUDE" | sha256sum | cut -c1-16)
  dir=$CACHE/userland-$key
  if [ ! -f "$dir/done" ]; then
    rm -rf "$dir"; mkdir -p "$dir"
    t0=$(date +%s)
    say "building an arm64 Debian $SUITE userland in $dir (debootstrap under emulation: ~5 min, cached)"
    debootstrap --arch=arm64 --foreign --variant=minbase --include="$USERLAND_INCLUDE" "$SUITE" "$dir/rootfs" "$MIRROR" \
      >"$dir/debootstrap.log" 2>&1 || { tail -20 "$dir/debootstrap.log" >&2; die "debootstrap (first stage) failed"; }
    chroot "$dir/rootfs" /debootstrap/debootstrap --second-stage >>"$dir/debootstrap.log" 2>&1 \
      || { tail -20 "$dir/debootstrap.log" >&2; die "debootstrap (second stage) failed"; }
    echo "deb $MIRROR $SUITE main" > "$dir/rootfs/etc/apt/sources.list"
    printf 'debootstrap_s=%s\n' $(( $(date +%s) - t0 )) > "$dir/timings"
    touch "$dir/done"
  fi
  echo "$dir"
}

source_key() {  # a hash of everything pip installs from this checkout
  (cd "$1" && find pyproject.toml README.md LICENSE agent converters systemd scripts/install-board.sh \
     -type f -not -name '*.pyc' -print0 | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16)
}

copy_source() {  # copy_source CHECKOUT DEST: what pip needs to install edgeward, nothing else
  mkdir -p "$2"
  (cd "$1" && tar -cf - --exclude='__pycache__' pyproject.toml README.md LICENSE agent converters systemd \
     scripts/install-board.sh) | tar -xf - -C "$2"
}
