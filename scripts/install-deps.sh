#!/usr/bin/env bash
# Installs what the tests and benchmarks need on a fresh Debian 12 machine. Idempotent and quick when done.
set -euo pipefail
need=()
for pair in nbdinfo:libnbd-bin nbdkit:nbdkit qemu-io:qemu-utils fio:fio fusermount3:fuse3 \
            mkfs.ext4:e2fsprogs mkfs.xfs:xfsprogs losetup:mount ip:iproute2 python3:python3 \
            promtool:prometheus; do
  cmd=${pair%%:*}; pkg=${pair#*:}
  command -v "$cmd" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "install-deps: missing packages ${need[*]} and not root; run: sudo apt-get install ${need[*]}" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
# --- extra installers (chart tooling etc.) go below this line ---
