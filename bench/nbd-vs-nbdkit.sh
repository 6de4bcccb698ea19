#!/usr/bin/env bash
# NBD path benchmark: fio's nbd engine against tandem-engine and against nbdkit's file plugin,
# on identical files, in the same run, over TCP and a unix socket. Prints a markdown table with
# each run's CPU busy share (per CPU, whole machine, from /proc/stat).
#   bench/nbd-vs-nbdkit.sh [SIZE_MIB=512] [RUNTIME=5]
# RUNTIME is a fio time (5 = 5 s, 200ms); RAMP (default 1) likewise. REPS (default 3) runs each
# cell that many times, tandem and nbdkit alternating, and prints each side's median run (one run
# of each swings by 10-20% here). NBDKIT_FILE_ARGS passes options to nbdkit's file plugin
# (fadvise=random gives it tandem's page-cache policy: docs/benchmarks.md). PERF=1 adds the server's
# context switches and CPU migrations per request (perf stat on the server process; needs perf).
# TRANSPORTS (default "tcp unix") and JOBS ("rw bs qd" triples split by ";") narrow the table.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_MIB=${1:-512}
RUNTIME=${2:-5}
RAMP=${RAMP:-1}
PERF=${PERF:-0}
REPS=${REPS:-3}
. bench/common.sh
bench_setup
ENGINE=$E

# Identical, fully allocated files written the same way, then out of the page cache: a file
# dd left in the cache holds large folios that make every later 4 KiB write several times dearer
# (store.rs), so a file written last, or copied without the cache, would favour its server.
dd if=/dev/urandom of="$W/a.img" bs=1M count="$SIZE_MIB" status=none
dd if="$W/a.img" of="$W/b.img" bs=1M status=none
bench_evict "$W/a.img" "$W/b.img"

"$ENGINE" serve --volume bench --data "$W/a.img" --size "${SIZE_MIB}M" --state-dir "$W/state" \
  --nbd-listen 127.0.0.1:0 --grpc-listen 127.0.0.1:0 --nbd-socket "$W/tandem.sock" \
  --ready-file "$W/ready" 2>"$W/engine.log" &
declare -A PID=([tandem-tcp]=$! [tandem-unix]=$!)
nbdkit -f -U "$W/nbdkit.sock" file "$W/b.img" ${NBDKIT_FILE_ARGS:-} 2>"$W/nbdkit.log" &
PID[nbdkit-unix]=$!
nbdkit -f -i 127.0.0.1 -p 10898 file "$W/b.img" ${NBDKIT_FILE_ARGS:-} 2>"$W/nbdkit-tcp.log" &
PID[nbdkit-tcp]=$!
for _ in $(seq 100); do [ -s "$W/ready" ] && [ -S "$W/nbdkit.sock" ] && break; sleep 0.1; done
TANDEM_TCP=$(python3 -c 'import json,sys;print(json.load(open(sys.argv[1]))["nbd"])' "$W/ready")

declare -A URI=(
  [tandem-tcp]="nbd://$TANDEM_TCP/bench"
  [tandem-unix]="nbd+unix:///bench?socket=$W/tandem.sock"
  [nbdkit-tcp]="nbd://127.0.0.1:10898/"
  [nbdkit-unix]="nbd+unix:///?socket=$W/nbdkit.sock"
)
IFS=';' read -r -a JOBS <<<"${JOBS:-randread 4k 1;randread 4k 16;randwrite 4k 1;randwrite 4k 16;read 1m 4;write 1m 4}"

run() { # server rw bs iodepth -> "iops MiB/s busy [switches/req migrations/req]"
  local t0 out perf=()
  [ "$PERF" = 1 ] && perf=(perf stat -x, -e context-switches,cpu-migrations -o "$W/perf" -p "${PID[$1]}" --)
  t0=$(bench_ticks)
  out=$("${perf[@]}" fio --name=b --ioengine=nbd --uri="${URI[$1]}" --rw="$2" --bs="$3" --iodepth="$4" \
      --size="${SIZE_MIB}M" --time_based --runtime="$RUNTIME" --ramp_time="$RAMP" --norandommap \
      --randrepeat=0 --output-format=json 2>/dev/null)
  local busy; busy=$(bench_busy "$t0" "$(bench_ticks)")
  python3 -c 'import json,sys
t=sys.stdin.read()
j=json.loads(t[t.index("{"):])["jobs"][0]
side=j["read"] if j["read"]["io_bytes"]>0 else j["write"]
row=["%.0f" % side["iops"], "%.1f" % (side["bw_bytes"]/1048576), sys.argv[1]]
if sys.argv[2] == "1":
    # perf counts the ramp too: per request over every request fio issued.
    ios = j["read"]["total_ios"] + j["write"]["total_ios"]
    ev = {l.split(",")[2]: int(l.split(",")[0]) for l in open(sys.argv[3]) if l.count(",") > 2 and l.split(",")[0].isdigit()}
    row += ["%.2f" % (ev.get("context-switches", 0) / max(ios, 1)), "%.3f" % (ev.get("cpu-migrations", 0) / max(ios, 1))]
print(" ".join(row))' "$busy" "$PERF" "$W/perf" <<<"$out"
}

# Each server reads its whole file once, its own way (tandem's store advises random access, so no
# readahead), so that no cell below measures the disk.
for s in tandem-unix nbdkit-unix; do
  fio --name=warm --ioengine=nbd --uri="${URI[$s]}" --rw=read --bs=1m --iodepth=4 \
      --size="${SIZE_MIB}M" >/dev/null 2>&1
done

if [ "$PERF" = 1 ]; then
  echo "| transport | workload | tandem IOPS | tandem MiB/s | nbdkit IOPS | nbdkit MiB/s | ratio | CPU busy: tandem | nbdkit | switches/req: tandem | nbdkit | migrations/req: tandem | nbdkit |"
  echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
else
  echo "| transport | workload | tandem IOPS | tandem MiB/s | nbdkit IOPS | nbdkit MiB/s | ratio | CPU busy: tandem | nbdkit |"
  echo "|---|---|---:|---:|---:|---:|---:|---:|---:|"
fi
for t in ${TRANSPORTS:-tcp unix}; do
  for job in "${JOBS[@]}"; do
    set -- $job
    # REPS runs of each server, alternating; each side's median run (by IOPS) is the row.
    : >"$W/runs-tandem"; : >"$W/runs-nbdkit"
    for _ in $(seq "$REPS"); do
      run "tandem-$t" "$1" "$2" "$3" >>"$W/runs-tandem"
      run "nbdkit-$t" "$1" "$2" "$3" >>"$W/runs-nbdkit"
    done
    read -r ti tb tc ts tm <<<"$(sort -n "$W/runs-tandem" | sed -n "$(((REPS + 1) / 2))p")"
    read -r ni nb nc ns nm <<<"$(sort -n "$W/runs-nbdkit" | sed -n "$(((REPS + 1) / 2))p")"
    ratio=$(python3 -c "print(f'{$ti/$ni:.2f}x' if $ni else 'n/a')")
    extra=""
    [ "$PERF" = 1 ] && extra=" $ts | $ns | $tm | $nm |"
    echo "| $t | $1 $2 QD$3 | $ti | $tb | $ni | $nb | $ratio | $tc | $nc |$extra"
  done
done
