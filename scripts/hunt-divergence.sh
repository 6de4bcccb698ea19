#!/usr/bin/env bash
# Reproducer of a fixed safety defect (docs/reliability.md "Found and fixed: an async pair diverged
# when its journal overflowed under writes"): an async pair on a 256 MiB volume, fio bursts of 4 KiB
# random writes at QD16 (3 s), then, once the primary reads Synced, the two data files compared;
# between bursts the secondary is SIGKILLed, 64 MiB are written, and it restarts. The 32 MiB journal
# overflows under these bursts, so the primary resyncs from its table while writes go on. Exits 1 at
# the first difference, printing the differing blocks and keeping the work dir; 0 after ITER clean
# rounds. Engines before 599b7d2 diverged within one to three rounds.
#   TANDEM_ENGINE=target/release/tandem-engine scripts/hunt-divergence.sh
# ITER (default 20), QD (default 16), PA_ARGS (extra flags for the primary, e.g. "--journal-size 1G").
set -uo pipefail
cd "$(dirname "$0")/.."
SIZE_MIB=256
. bench/common.sh
bench_nodes
E=${TANDEM_ENGINE:-target/release/tandem-engine}
W=$(mktemp -d "${TMPDIR:-/var/tmp}/tandem-divergence.XXXXXX")
echo "work dir: $W"
kept=
trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null; [ -n "$kept" ] || rm -rf "$W"' EXIT
echo bench > "$W/tok"; TOK=(--token-file "$W/tok")
for n in pa sa; do dd if=/dev/zero of="$W/$n.img" bs=1M count=$SIZE_MIB oflag=direct status=none; done
serve sa 11972 11672 --role secondary --peer 127.0.0.1:11671; SA=$PID
# shellcheck disable=SC2086
serve pa 11971 11671 --peer 127.0.0.1:11672 ${PA_ARGS:-}
sleep 1; wait_synced 127.0.0.1:11671
differs() { # what: compares the replicas; on a difference reports it and exits 1
  cmp -s "$W/pa.img" "$W/sa.img" && return 0
  echo "round $i: the replicas differ $1 (primary: pending $(js 127.0.0.1:11671 pending_blocks), $(js 127.0.0.1:11671 pair_state))"
  python3 - "$W/pa.img" "$W/sa.img" <<'PY'
import sys
a, b = open(sys.argv[1], "rb").read(), open(sys.argv[2], "rb").read()
bad = [i // 4096 for i in range(0, len(a), 4096) if a[i:i + 4096] != b[i:i + 4096]]
print("differing 4 KiB blocks (%d): %s" % (len(bad), bad[:20]))
PY
  kept=1
  echo "kept: $W (pa.log, sa.log, the images)"
  exit 1
}
for i in $(seq "${ITER:-20}"); do
  "${NODE_A[@]}" fio --name=b --ioengine=nbd --uri=nbd://127.0.0.1:11971/b --rw=randwrite --bs=4k \
    --iodepth="${QD:-16}" --size=${SIZE_MIB}M --time_based --runtime=3 --ramp_time=1 --norandommap \
    --randrepeat=0 >/dev/null 2>&1
  wait_synced 127.0.0.1:11671
  differs "after a burst of writes"
  kill -9 "$SA"; wait "$SA" 2>/dev/null
  "${NODE_A[@]}" fio --name=d --ioengine=nbd --uri=nbd://127.0.0.1:11971/b --rw=randwrite --bs=4k \
    --iodepth=16 --size=64M --offset=0 --io_size=64M --randrepeat=0 >/dev/null 2>&1
  serve sa 11972 11672 --role secondary --peer 127.0.0.1:11671; SA=$PID
  sleep 0.2; wait_synced 127.0.0.1:11671
  differs "after the secondary's restart"
  echo "round $i: identical"
done
