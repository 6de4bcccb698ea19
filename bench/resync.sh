#!/usr/bin/env bash
# Resync after a secondary outage, two engine builds alternating in one run (the machine is shared
# and noisy, so old and new are measured back to back):
#   bench/resync.sh OLD_ENGINE NEW_ENGINE [SIZE_MIB=512]
# RESYNC_MIB (default "16 64 256", each at most SIZE_MIB) are the outages' sizes, REPS (default 2)
# the rounds. Per engine, size and round: an async pair (bench_nodes layout, PIN), the secondary
# SIGKILLed, fio dirties N MiB of 4k random writes (each block once), the secondary restarts under
# `perf stat` (its fdatasyncs), and the time until the pair reads Synced is taken from the
# secondary's start (process start included, as bench/replication.sh) and from the primary's log
# line that starts the resync. CPU: each CPU's busy share over the restart, and each engine's
# utime+stime over it.
set -euo pipefail
trap 'echo "bench/resync.sh: failed at line $LINENO: $BASH_COMMAND" >&2' ERR
cd "$(dirname "$0")/.."
OLD=${1:?old engine binary}; NEW=${2:?new engine binary}
SIZE_MIB=${3:-512}
RESYNC_MIB=${RESYNC_MIB:-16 64 256}
REPS=${REPS:-2}
. bench/common.sh
bench_nodes
TANDEM_ENGINE=$OLD bench_setup
bench_cleanup() { kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; [ -n "${KEEP:-}" ] || rm -rf "$W"; }
echo bench > "$W/tok"
TOK=(--token-file "$W/tok")
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# Epoch seconds of the last "resync from the differential table" line in LOG after its first SKIP
# lines ("nan" if none: the journal covered the outage, no resync).
resync_start() {
  python3 - "$1" "$2" <<'PY'
import re, sys, datetime
t = None
for i, l in enumerate(open(sys.argv[1], errors="replace")):
    if i < int(sys.argv[2]):
        continue
    l = re.sub(r"\x1b\[[0-9;]*m", "", l)
    if "resync from the differential table" in l:
        m = re.search(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+)Z", l)
        if m:
            s = m.group(1)[:26]
            t = datetime.datetime.strptime(s, "%Y-%m-%dT%H:%M:%S.%f").replace(tzinfo=datetime.timezone.utc).timestamp()
print(t if t is not None else "nan")
PY
}
# Polls the primary's metrics every 5 ms in one process (a status client per poll took ~100 ms).
synced() {
  python3 - "$1" <<'PY'
import sys, time, urllib.request
while True:
    try:
        body = urllib.request.urlopen("http://%s/metrics" % sys.argv[1], timeout=5).read().decode()
        if any("pair_state{" in l and 'state="synced"' in l and l.split()[-1] == "1"
               for l in body.splitlines()):
            break
    except OSError:
        pass
    time.sleep(0.005)
PY
}
# The secondary's fdatasyncs, where perf may count them (a tracepoint: root or perf_event_paranoid
# <= 1, and a perf that matches the kernel); otherwise the column says n/a.
COUNT=()
if perf stat -e syscalls:sys_enter_fdatasync -x, -o /dev/null -- true >/dev/null 2>&1; then
  COUNT=(perf stat -e syscalls:sys_enter_fdatasync -x, -o "$W/fsyncs" --)
fi

ROWS=()
for rep in $(seq "$REPS"); do
  for which in old new; do
    E=$OLD; [ "$which" = new ] && E=$NEW
    rm -rf "$W"/p "$W"/s "$W"/*.img "$W"/*.log
    dd if=/dev/zero of="$W/p.img" bs=1M count="$SIZE_MIB" oflag=direct status=none
    dd if=/dev/zero of="$W/s.img" bs=1M count="$SIZE_MIB" oflag=direct status=none
    serve s 10882 9582 --role secondary --peer 127.0.0.1:9581; SP=$PID
    # No lease: the outage below must not stop the primary acknowledging (a fresh pair may not have
    # renewed one yet when the secondary dies; leases are bench/takeover.sh's and the campaigns' business).
    serve p 10881 9581 --peer 127.0.0.1:9582 --metrics-listen 127.0.0.1:9681 --lease-ms 0; PP=$PID
    sleep 0.5; wait_synced 127.0.0.1:9581
    for mib in $RESYNC_MIB; do
      kill -9 "$SP" 2>/dev/null || true; wait "$SP" 2>/dev/null || true
      "${NODE_A[@]}" fio --name=d --ioengine=nbd --uri=nbd://127.0.0.1:10881/b --rw=randwrite --bs=4k \
        --iodepth=16 --size="${mib}M" --offset=0 --io_size="${mib}M" --randrepeat=0 >/dev/null 2>&1
      pending=$(js 127.0.0.1:9581 pending_blocks)
      sync; sleep 0.5
      skip=$(wc -l < "$W/p.log")
      c0=$(cpu_ticks "$PP"); k0=$(bench_ticks); t0=$(date +%s.%N)
      rm -f "$W/fsyncs"
      "${COUNT[@]}" "${NODE_B[@]}" "$E" serve --volume b \
        --data "$W/s.img" --size "${SIZE_MIB}M" --state-dir "$W/s" --nbd-listen 127.0.0.1:10882 \
        --grpc-listen 127.0.0.1:9582 "${TOK[@]}" --role secondary --peer 127.0.0.1:9581 2>>"$W/s.log" &
      PERF=$!
      synced 127.0.0.1:9681
      t1=$(date +%s.%N); k1=$(bench_ticks); c1=$(cpu_ticks "$PP")
      SP=$PERF
      if [ ${#COUNT[@]} -gt 0 ]; then SP=$(pgrep -P "$PERF" || echo "$PERF"); fi
      cs=$(cpu_ticks "$SP")
      kill -9 "$SP"; wait "$PERF" 2>/dev/null || true
      fs=n/a; [ ! -s "$W/fsyncs" ] || fs=$(awk -F, '/fdatasync/ {print $1}' "$W/fsyncs")
      ts=$(resync_start "$W/p.log" "$skip")
      busy=$(bench_busy "$k0" "$k1")
      ROWS+=("$(python3 -c "
import os, sys
hz = os.sysconf('SC_CLK_TCK'); mib = $pending * 4096 / 1048576
wall = $t1 - $t0; rs = $t1 - float('$ts')
r = 'journal, no resync | |' if rs != rs else '%.2f s | %.0f MiB/s |' % (rs, mib / rs)
print('| $which | $mib MiB | $pending | %.2f s | %.0f MiB/s | %s $fs | %s | %.2f s | %.2f s |' % (
  wall, mib / wall, r, sys.argv[1], ($c1 - $c0) / hz, $cs / hz))" "$busy")")
      # The next outage starts from a running secondary's state: bring it back.
      serve s 10882 9582 --role secondary --peer 127.0.0.1:9581; SP=$PID
      sleep 0.3; wait_synced 127.0.0.1:9581
    done
    kill "$SP" "$PP" 2>/dev/null || true; wait "$SP" "$PP" 2>/dev/null || true
    cmp "$W/p.img" "$W/s.img" || { echo "replicas differ ($which)"; exit 1; }
  done
done
echo "### Resync of scattered 4 KiB blocks, old and new engine alternating (volume ${SIZE_MIB} MiB, PIN=$PIN)"
echo
echo "old: $OLD"
echo "new: $NEW"
echo
echo "| engine | dirtied | blocks | from secondary start | MiB/s | from resync start | MiB/s | fdatasyncs (secondary) | CPU busy c0/c1 | primary CPU | secondary CPU |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
printf '%s\n' "${ROWS[@]}"
echo
echo "(replicas byte-identical after every engine's rounds)"
