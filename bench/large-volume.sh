#!/usr/bin/env bash
# Does the volume's size cost replication or takeover anything? An async pair per size (pinned as
# bench/replication.sh's PIN=1: primary and fio on CPU 0, secondary on CPU 1), fio 4k randwrite QD16
# over the first 256 MiB only, so every size does the same I/O; the differential table grows with
# the size (32 MiB of bits for 1 TiB). Then the link is paused, 16 MiB of 4k writes are left pending,
# and the secondary takes over: its ready_ms.
#   bench/large-volume.sh [SIZES="1G 1T"] [RUNTIME=5]
# RUNTIME and RAMP (default 1) are fio times; REGION_MIB (256) and PENDING_MIB (16) shrink the I/O
# for volumes smaller than them (scripts/bench-smoke.sh).
#
# SCATTER=1: a scattered backlog instead (no IOPS runs). For each size and each count in BACKLOGS
# (default "4096 262144" blocks), a fresh pair, the link paused (the sender neither sends nor
# heartbeats), then that many 4 KiB writes spread evenly over the WHOLE volume (fio sequential with a
# stride of size/count: every block in a 64-block word of its own when the volume has that many words;
# a 1 GiB volume has 4096, so its 262,144 blocks are the whole volume), then the takeover. Printed:
# the backlog's time and CPU busy share, ready_ms, the handoff table's bytes and form (engine event
# HandoffStored: runs, 2-6 bytes per scattered block; words from an older engine, 16 per nonzero
# word), the ready path's steps in µs (old primary: fence, table snapshot; new primary: ask (the
# whole round trip), parse, store of peer_pending, promote (all its effects)), VmRSS/VmHWM of both engines after the backlog and
# after the takeover (1 s later), and the bound 64 MiB + 1 bit per 4 KiB block.
# Each write of a scattered backlog lands in a 1 MiB extent of its own, so each one waits for an
# intent-log fdatasync (shared by the writes queued with it): 262,144 blocks over 4 TiB take 26-58 s
# here (docs/benchmarks.md).
set -euo pipefail
cd "$(dirname "$0")/.."
SIZES=${1:-"1G 1T"}
RUNTIME=${2:-5}
RAMP=${RAMP:-1}
REGION_MIB=${REGION_MIB:-256}
# NBD and gRPC ports of the two engines (BENCH_PORTS="A_NBD B_NBD A_GRPC B_GRPC" when they are taken).
read -r NA NB GA GB <<< "${BENCH_PORTS:-10971 10972 9671 9672}"
PENDING_MIB=${PENDING_MIB:-16}
NODE_A=(); NODE_B=()
if [ "$(nproc)" -ge 2 ]; then NODE_A=(taskset -c 0); NODE_B=(taskset -c 1); fi
. bench/common.sh
bench_setup
echo bench > "$W/tok"
iops() {
  "${NODE_A[@]}" fio --name=b --ioengine=nbd --uri=nbd://127.0.0.1:$NA/b --rw=randwrite --bs=4k \
      --iodepth=16 --size="${REGION_MIB}M" --time_based --runtime="$RUNTIME" --ramp_time="$RAMP" --norandommap \
      --randrepeat=0 --output-format=json 2>/dev/null |
    python3 -c 'import json,sys
t=sys.stdin.read(); print("%.0f" % json.loads(t[t.index("{"):])["jobs"][0]["write"]["iops"])'
}
if [ "${SCATTER:-0}" = 1 ]; then
  TOK=(--token-file "$W/tok")
  mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }
  mem() { # pid: "VmRSS/VmHWM" in MiB
    local r h
    r=$(awk '/^VmRSS/ {print $2}' "/proc/$1/status"); h=$(awk '/^VmHWM/ {print $2}' "/proc/$1/status")
    echo "$(mib "$r")/$(mib "$h")"
  }
  bytes_of() { python3 -c 'import re,sys
s=sys.argv[1].strip().upper(); m=re.fullmatch(r"(\d+)([KMGT]?)", s)
print(int(m.group(1)) * 1024 ** " KMGT".index(m.group(2) or " "))' "$1"; }
  echo "| volume | pending blocks | backlog s (CPU busy) | ready_ms | handoff table | ready path µs | primary RSS/HWM MiB after backlog | secondary after backlog | old primary after takeover | new primary after takeover | bound MiB |"
  echo "|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|"
  for size in $SIZES; do
    vb=$(bytes_of "$size")
    for n in ${BACKLOGS:-4096 262144}; do
      rm -rf "$W/s" "$W/p" "$W"/*.img
      "${NODE_B[@]}" "$E" serve --volume b --data "$W/s.img" --size "$size" --state-dir "$W/s" \
        --nbd-listen 127.0.0.1:$NB --grpc-listen 127.0.0.1:$GB "${TOK[@]}" \
        --role secondary --peer 127.0.0.1:$GA 2>>"$W/s.log" &
      S=$!
      "${NODE_A[@]}" "$E" serve --volume b --data "$W/p.img" --size "$size" --state-dir "$W/p" \
        --nbd-listen 127.0.0.1:$NA --grpc-listen 127.0.0.1:$GA "${TOK[@]}" \
        --peer 127.0.0.1:$GB --fault-injection 2>>"$W/p.log" &
      P=$!
      wait_synced 127.0.0.1:$GA
      "$E" fault --grpc 127.0.0.1:$GA --volume b "${TOK[@]}" --pause true >/dev/null
      stride=$((vb / n))
      t0=$(bench_ticks); s0=$(date +%s.%N)
      "${NODE_A[@]}" fio --name=d --ioengine=nbd --uri=nbd://127.0.0.1:$NA/b --bs=4k --iodepth=16 \
        --rw="write:$((stride - 4096))" --size="$vb" --number_ios="$n" >/dev/null 2>&1
      s1=$(date +%s.%N); t1=$(bench_ticks)
      pending=$(js 127.0.0.1:$GA pending_blocks)
      mp=$(mem "$P"); ms=$(mem "$S")
      ready=$("$E" takeover --grpc 127.0.0.1:$GB --volume b "${TOK[@]}" --json |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["ready_ms"])')
      # The handoff table's bytes and form, and where the ready time went: the old primary's
      # HandoffAnswered (gate, fence, stale scan, table snapshot) and the new primary's
      # HandoffStored (ask = the whole round trip, parse, promote and its effects), in µs.
      read -r table path < <(python3 - \
        "$("$E" status --grpc 127.0.0.1:$GA --volume b "${TOK[@]}" --json)" \
        "$("$E" status --grpc 127.0.0.1:$GB --volume b "${TOK[@]}" --json)" <<'PY'
import json, re, sys
def last(doc, name):
    ev = [e for e in json.loads(doc)["events"] if name in e]
    return ev[-1] if ev else ""
old, new = last(sys.argv[1], "HandoffAnswered"), last(sys.argv[2], "HandoffStored")
f = lambda s, k: (re.search(r"\b" + k + r"=(\w+)", s) or [None, "?"])[1]
print("%s_B_%s" % (f(new, "bytes"), f(new, "form")),
      "fence:%s+table:%s/ask:%s/parse:%s/store:%s/promote:%s" % (
          f(old, "fence_us"), f(old, "table_us"), f(new, "ask_us"), f(new, "parse_us"),
          f(new, "StoreTable"), f(new, "promote_us")))
PY
      )
      table=${table//_/ }
      sleep 1
      mp2=$(mem "$P"); ms2=$(mem "$S")
      bound=$(( 64 + vb / 4096 / 8 / 1048576 ))
      echo "| $size | $pending | $(awk -v a="$s0" -v b="$s1" 'BEGIN{printf "%.1f", b-a}') ($(bench_busy "$t0" "$t1")) | $ready | $table | $path | $mp | $ms | $mp2 | $ms2 | $bound |"
      kill "$S" "$P"; wait "$S" "$P" 2>/dev/null || true
    done
  done
  exit 0
fi
echo "| volume size | async QD16 IOPS (two runs) | secondary's heartbeat-set file | takeover ready_ms ($PENDING_MIB MiB pending) |"
echo "|---:|---:|---:|---:|"
for size in $SIZES; do
  rm -rf "$W/s" "$W/p" "$W"/*.img
  "${NODE_B[@]}" "$E" serve --volume b --data "$W/s.img" --size "$size" --state-dir "$W/s" \
    --nbd-listen 127.0.0.1:$NB --grpc-listen 127.0.0.1:$GB --token-file "$W/tok" \
    --role secondary --peer 127.0.0.1:$GA 2>>"$W/s.log" &
  S=$!
  "${NODE_A[@]}" "$E" serve --volume b --data "$W/p.img" --size "$size" --state-dir "$W/p" \
    --nbd-listen 127.0.0.1:$NA --grpc-listen 127.0.0.1:$GA --token-file "$W/tok" \
    --peer 127.0.0.1:$GB --fault-injection 2>>"$W/p.log" &
  P=$!
  sleep 2
  a=$(iops); b=$(iops)
  hb=$(stat -c %s "$W/s/peer_pending_heartbeat" 2>/dev/null || echo 0)
  "$E" fault --grpc 127.0.0.1:$GA --volume b --token-file "$W/tok" --pause true >/dev/null
  fio --name=d --ioengine=nbd --uri=nbd://127.0.0.1:$NA/b --rw=randwrite --bs=4k --iodepth=16 \
      --size="${REGION_MIB}M" --io_size="${PENDING_MIB}M" --randrepeat=0 >/dev/null 2>&1
  ready=$("$E" takeover --grpc 127.0.0.1:$GB --volume b --token-file "$W/tok" --json |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["ready_ms"])')
  echo "| $size | $a / $b | $hb bytes | $ready |"
  kill "$S" "$P"; wait "$S" "$P" 2>/dev/null || true
done
