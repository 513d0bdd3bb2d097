#!/usr/bin/env bash
# Installs, from Debian's packages, the host tools Cairn's tests (and with
# --bench, its benchmarks) use, when any is missing. Needs root and apt-get;
# .ci/run calls it. Without these the tests that need them are skipped and
# e2e/test.sh lists them, with the reason, in its summary.
#
#   sudo e2e/deps.sh            # what the tests need
#   sudo e2e/deps.sh --bench    # and what cairn-bench needs
set -euo pipefail

# tool:package, and why.
tests=(
  losetup:util-linux     # loop devices over the agent's FUSE files
  blkid:util-linux       # the CSI node plugin: is the device formatted?
  fsfreeze:util-linux    # a crash-consistent filesystem snapshot
  mkfs.ext4:e2fsprogs    # ext4 volumes
  e2fsck:e2fsprogs       # every filesystem checked after a crash or a move
  resize2fs:e2fsprogs    # ext4 grown to its device (NodeExpandVolume)
  mkfs.xfs:xfsprogs      # xfs volumes
  xfs_growfs:xfsprogs    # xfs grown to its device
  fusermount3:fuse3      # FUSE mounts (the agent's frontend)
  ip:iproute2            # one network namespace per host or site
  tc:iproute2            # bandwidth caps on veth links (tbf)
)
bench=(
  fio:fio                # I/O through a volume vs a plain loop device
  rsync:rsync            # the copy baseline
  iperf3:iperf3          # the link's raw rate
)

want=("${tests[@]}")
if [[ "${1:-}" == "--bench" ]]; then
  want+=("${bench[@]}")
elif [[ $# -gt 0 ]]; then
  echo "usage: $0 [--bench]" >&2
  exit 2
fi

missing=()
for entry in "${want[@]}"; do
  tool=${entry%%:*}
  package=${entry#*:}
  if ! PATH="$PATH:/usr/sbin:/sbin" command -v "$tool" >/dev/null; then
    missing+=("$package")
  fi
done
if [[ ${#missing[@]} -eq 0 ]]; then
  exit 0
fi
# One name each, in order.
mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
  echo "missing host tools; install as root: apt-get install -y ${missing[*]}" >&2
  exit 1
fi
echo "installing Debian packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
