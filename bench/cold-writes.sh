#!/usr/bin/env bash
# Scattered 4k writes to cold extents: the cost of the write-intent log. Each random write over a
# large sparse volume lands in a 1 MiB extent no recent write touched, so the pair logs the extent
# and waits for an fdatasync of intent.log before the data write (repl/intent_log.rs); an unpaired
# engine writes the same file with no log. Both in one run, fio's nbd engine, a row per
# (connections x queue depth), pair/unpaired the ratio.
#   bench/cold-writes.sh [SIZE=4T] [WRITES=32768]
# Each cell issues WRITES writes in all (a count, not a time: a fast engine's scattered writes in a
# sparse file reserve filesystem metadata per dirty page, and an unbounded run filled this machine's
# disk). CELLS (default "1 1;1 16;16 1"): "connections depth" pairs. PIN as in bench/common.sh.
# PREALLOC=1 allocates the three data files first (fallocate: SIZE of disk each) instead of leaving
# them sparse, to show what the filesystem's block allocation adds to an intent sync.
# Compare two builds with bench/compare-engines.sh (BENCHES=cold-writes).
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${1:-4T}
WRITES=${2:-32768}
CELLS=${CELLS:-1 1;1 16;16 1}
. bench/common.sh
bench_nodes
bench_setup
echo bench > "$W/tok"
TOK=(--token-file "$W/tok")
# bench/common.sh's serve takes the size in MiB.
SIZE_MIB=$(python3 -c "
import sys; s = sys.argv[1]; u = {'M': 1, 'G': 1 << 10, 'T': 1 << 20}
print(int(s[:-1]) * u[s[-1]] if s[-1] in u else int(s) >> 20)" "$SIZE")
for n in solo p s; do
  if [ -n "${PREALLOC:-}" ]; then fallocate -l "${SIZE_MIB}M" "$W/$n.img"; else truncate -s "${SIZE_MIB}M" "$W/$n.img"; fi
done
serve solo 10990 9690
serve s 10992 9692 --role secondary --peer 127.0.0.1:9691
serve p 10991 9691 --peer 127.0.0.1:9692
sleep 1; wait_synced 127.0.0.1:9691

cell() { # port jobs depth -> "IOPS p99_us"
  "${NODE_A[@]}" fio --name=c --ioengine=nbd --uri="nbd://127.0.0.1:$1/b" --rw=randwrite --bs=4k \
      --iodepth="$3" --numjobs="$2" --size="${SIZE_MIB}M" --io_size="$((WRITES * 4 / $2))k" \
      --norandommap --randrepeat=0 --group_reporting --output-format=json 2>/dev/null |
    python3 -c 'import json,sys
t=sys.stdin.read(); w=json.loads(t[t.index("{"):])["jobs"][0]["write"]
if not w.get("total_ios") or "percentile" not in w["clat_ns"]:
    sys.exit("fio completed no write (see the engines logs)")
print("%.0f %.0f" % (w["iops"], w["clat_ns"]["percentile"]["99.000000"] / 1000))'
}

echo "### Scattered 4k writes to cold extents, ${SIZE} $([ -n "${PREALLOC:-}" ] && echo preallocated || echo sparse) volume ($WRITES writes per cell)"
echo
echo "| connections x depth | unpaired IOPS | async pair IOPS | pair/unpaired | p99 unpaired | p99 pair | CPU busy: unpaired | pair |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|"
IFS=';' read -ra cells <<<"$CELLS"
for c in "${cells[@]}"; do
  read -r jobs depth <<<"$c"
  # Each cell starts with nothing dirty: an intent fdatasync on ext4 (data=ordered) commits the
  # journal, which first writes back every newly allocated dirty block, the last cell's too.
  sync
  t0=$(bench_ticks); out=$(cell 10990 "$jobs" "$depth"); bu=$(bench_busy "$t0" "$(bench_ticks)")
  read -r u up <<<"$out"
  sync
  t0=$(bench_ticks); out=$(cell 10991 "$jobs" "$depth"); ba=$(bench_busy "$t0" "$(bench_ticks)")
  read -r a ap <<<"$out"
  wait_synced 127.0.0.1:9691 # the next cell starts with no backlog
  python3 -c "import sys
u, a = float(sys.argv[3]), float(sys.argv[4])
print('| %s x %s | %.0f | %.0f | %.2fx | %s us | %s us | %s | %s |' % (*sys.argv[1:3], u, a, a / max(u, 1), *sys.argv[5:]))" \
    "$jobs" "$depth" "$u" "$a" "$up" "$ap" "$bu" "$ba"
done
