#!/usr/bin/env bash
# Every bench/*.sh at a tiny size, so the scripts keep working (issue 17: no benchmark gates CI,
# their numbers are too noisy; this checks only that each runs to its table). Uses the debug
# builds the test suite has made; a script's failure fails this one. ~1 minute on 2 cores.
#   scripts/bench-smoke.sh
set -euo pipefail
cd "$(dirname "$0")/.."
# scripts/test.sh names the binaries its `cargo test --workspace` built (TANDEM_ENGINE_BIN,
# TANDEM_CSI_BIN); run alone, this builds them.
if [ -z "${TANDEM_ENGINE_BIN:-}" ] || [ -z "${TANDEM_CSI_BIN:-}" ]; then
  cargo build -q -p storage-engine --bin tandem-engine
  cargo build -q -p csi-node --bin tandem-csi
fi
T=${CARGO_TARGET_DIR:-$PWD/target}/debug
export TANDEM_ENGINE=${TANDEM_ENGINE_BIN:-$T/tandem-engine} TANDEM_CSI=${TANDEM_CSI_BIN:-$T/tandem-csi} RAMP=0 REPS=1
LOG=$(mktemp /var/tmp/tandem-bench-smoke.XXXXXX)
trap 'rm -f "$LOG"' EXIT

smoke() { # name command...
  local t0=$SECONDS
  if ! "$@" >"$LOG" 2>&1; then
    echo "bench-smoke: $1 failed:" >&2
    cat "$LOG" >&2
    exit 1
  fi
  # A table row (or the idle-connections line) is what a run is for.
  if ! grep -q '^| ' "$LOG"; then
    echo "bench-smoke: $1 printed no table:" >&2
    cat "$LOG" >&2
    exit 1
  fi
  echo "bench-smoke: $1 ok ($((SECONDS - t0)) s)"
}

# One small and one large job per transport: every code path of the script, not every cell.
JOBS="randwrite 4k 1;read 1m 4" smoke bench/nbd-vs-nbdkit.sh 16 200ms
RESYNC_MIB=4 smoke bench/replication.sh 16 200ms
BENCHES=nbd-vs-nbdkit JOBS="randread 4k 1" TRANSPORTS=unix \
  smoke bench/compare-engines.sh "$TANDEM_ENGINE" "$TANDEM_ENGINE" 16 200ms
REGION_MIB=16 PENDING_MIB=4 smoke bench/large-volume.sh 64M 200ms
LOCAL_MIB=4 smoke bench/takeover.sh "0 4M" 1 200
REPS=1 RESYNC_MIB=4 smoke bench/resync.sh "$TANDEM_ENGINE" "$TANDEM_ENGINE" 16
SCATTER=1 BACKLOGS=64 smoke bench/large-volume.sh "64M 1G" 200ms
smoke bench/idle-connections.sh 100
CELLS="1 4" smoke bench/cold-writes.sh 1G 256
# vs-qsd reads query-block-jobs' "actively-synced" (QEMU 8.2 on; Debian 12's own qemu-utils is 7.2).
qsd_version=$(qemu-storage-daemon --version 2>/dev/null | sed -n 's/.*version \([0-9]*\)\.\([0-9]*\).*/\1 \2/p' | head -1)
if [ -n "$qsd_version" ] && [ "${qsd_version% *}" -gt 8 -o "$qsd_version" = "8 2" ]; then
  JOBS="randwrite 4k 1;write 1m 4" smoke bench/vs-qsd.sh 16 200ms
else
  echo "bench-smoke: bench/vs-qsd.sh skipped (needs qemu-storage-daemon 8.2 or later; found: ${qsd_version:-none})"
fi
if [ "$(id -u)" -eq 0 ] && [ -e /dev/fuse ] && losetup -f >/dev/null 2>&1; then
  smoke bench/csi-attach.sh 16 200ms
else
  echo "bench-smoke: bench/csi-attach.sh skipped (needs root, /dev/fuse and a free loop device)"
fi
