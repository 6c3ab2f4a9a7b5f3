#!/usr/bin/env bash
# Prepares this machine to host the sandbox and the Molecule scenarios:
# docker engine running, systemd-capable Debian base images built from Debian
# packages (no image registry is reachable). Idempotent; a re-run takes seconds.
set -euo pipefail

MIRROR=${CBK_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${CBK_DEBIAN_SECURITY_MIRROR:-http://security.debian.org/debian-security}
# Images of an older build (before the security suite) lack this label and are rebuilt.
IMAGE_LABEL=cbk.apt-suites=release-updates-security
MIN_FREE_GB=${CBK_MIN_FREE_GB:-6}
declare -A SUITES=([12]=bookworm [13]=trixie)

die() { echo "bootstrap: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root (docker engine and debootstrap need it)"

free_gb=$(df -P --block-size=1G /var/lib | awk 'NR==2 {print $4}')
[ "$free_gb" -ge "$MIN_FREE_GB" ] || die "only ${free_gb} GiB free under /var/lib, need ${MIN_FREE_GB} GiB"

# ssh: Ansible's connection to servers (production.example, and the e2e-rabbitmq scenario).
if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null || ! command -v ssh >/dev/null; then
  echo "bootstrap: installing docker.io, debootstrap and the ssh client"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io debootstrap openssh-client >/dev/null
fi

# There is no init system on these machines: start the daemon detached.
if ! docker info >/dev/null 2>&1; then
  echo "bootstrap: starting dockerd"
  # Pid files left by a machine image taken while docker ran name another process now: dockerd
  # then waits for a containerd that never answers ("timeout waiting for containerd to start").
  pgrep -x containerd >/dev/null || rm -f /var/run/docker/containerd/containerd.pid
  pgrep -x dockerd >/dev/null || rm -f /var/run/docker.pid
  setsid dockerd >/var/log/dockerd.log 2>&1 </dev/null &
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || die "dockerd did not start, see /var/log/dockerd.log"
fi

build_image() {
  local version=$1 suite=${SUITES[$1]} image=cbk/debian:$1 rootfs
  [ "$(docker image inspect --format '{{ index .Config.Labels "cbk.apt-suites" }}' "$image" 2>/dev/null)" = "${IMAGE_LABEL#*=}" ] &&
    return 0
  echo "bootstrap: building $image from $suite with debootstrap"
  rootfs=$(mktemp -d /var/tmp/cbk-rootfs-XXXX)
  debootstrap --variant=minbase \
    --include=python3,python3-apt,systemd,systemd-sysv,sudo,iproute2,procps,ca-certificates \
    "$suite" "$rootfs" "$MIRROR" >/dev/null
  # Up to date with the -updates and -security suites, as the base role keeps every host.
  printf 'deb %s %s main\ndeb %s %s-updates main\ndeb %s %s-security main\n' \
    "$MIRROR" "$suite" "$MIRROR" "$suite" "$SECURITY_MIRROR" "$suite" >"$rootfs/etc/apt/sources.list"
  chroot "$rootfs" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive chroot "$rootfs" apt-get upgrade -y -qq >/dev/null 2>&1 ||
    die "upgrading $image from $suite-security failed"
  # The machine's private CA must be trusted inside for outbound TLS (pip).
  cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/" 2>/dev/null || true
  chroot "$rootfs" update-ca-certificates >/dev/null
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  # An old mtime makes the first `apt update_cache` with cache_valid_time refresh.
  touch -d @0 "$rootfs/var/lib/apt/lists"
  tar -C "$rootfs" -c . | docker import --change 'CMD ["/lib/systemd/systemd"]' --change "LABEL $IMAGE_LABEL" - "$image" >/dev/null
  rm -rf "$rootfs"
}

# Both suites build in parallel: the download, not the CPU, is the limit.
pids=()
for version in "${!SUITES[@]}"; do build_image "$version" & pids+=($!); done
for pid in "${pids[@]}"; do wait "$pid" || die "building a base image failed"; done
echo "bootstrap: docker ready, images: $(docker images --format '{{.Repository}}:{{.Tag}}' cbk/debian | sort | tr '\n' ' ')"
