#!/usr/bin/env bash
# Two builds of the engine in one run, so a restructuring can show it did not get slower: the NBD
# rows (bench/nbd-vs-nbdkit.sh) and the replication rows (bench/replication.sh), each run for the
# old engine and then the new one, back to back, on the same machine state. Prints both tables.
#   bench/compare-engines.sh OLD_ENGINE NEW_ENGINE [SIZE_MIB=256] [RUNTIME=5]
# BENCHES (default "nbd-vs-nbdkit replication") picks the scripts; their own variables pass through.
# Build the old one from a worktree of the older commit:
#   git worktree add /tmp/old <commit> && (cd /tmp/old && cargo build --release -p storage-engine)
set -euo pipefail
cd "$(dirname "$0")/.."
OLD=${1:?old engine binary}; NEW=${2:?new engine binary}
SIZE_MIB=${3:-256}; RUNTIME=${4:-5}
for bench in ${BENCHES:-nbd-vs-nbdkit replication}; do
  for which in old new; do
    bin=$OLD; [ "$which" = new ] && bin=$NEW
    echo "### $bench, $which engine ($bin)"
    TANDEM_ENGINE=$bin "bench/$bench.sh" "$SIZE_MIB" "$RUNTIME"
  done
done
