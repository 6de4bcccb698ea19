#!/usr/bin/env bash
# Does the volume's size cost replication or takeover anything? An async pair per size (pinned as
# bench/replication.sh's PIN=1: primary and fio on CPU 0, secondary on CPU 1), fio 4k randwrite QD16
# over the first 256 MiB only, so every size does the same I/O; the differential table grows with
# the size (32 MiB of bits for 1 TiB). Then the link is paused, 16 MiB of 4k writes are left pending,
# and the secondary takes over: its ready_ms.
#   bench/large-volume.sh [SIZES="1G 1T"] [RUNTIME=5]
# RUNTIME and RAMP (default 1) are fio times; REGION_MIB (256) and PENDING_MIB (16) shrink the I/O
# for volumes smaller than them (scripts/bench-smoke.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
SIZES=${1:-"1G 1T"}
RUNTIME=${2:-5}
RAMP=${RAMP:-1}
REGION_MIB=${REGION_MIB:-256}
PENDING_MIB=${PENDING_MIB:-16}
NODE_A=(); NODE_B=()
if [ "$(nproc)" -ge 2 ]; then NODE_A=(taskset -c 0); NODE_B=(taskset -c 1); fi
. bench/common.sh
bench_setup
echo bench > "$W/tok"
iops() {
  "${NODE_A[@]}" fio --name=b --ioengine=nbd --uri=nbd://127.0.0.1:10971/b --rw=randwrite --bs=4k \
      --iodepth=16 --size="${REGION_MIB}M" --time_based --runtime="$RUNTIME" --ramp_time="$RAMP" --norandommap \
      --randrepeat=0 --output-format=json 2>/dev/null |
    python3 -c 'import json,sys
t=sys.stdin.read(); print("%.0f" % json.loads(t[t.index("{"):])["jobs"][0]["write"]["iops"])'
}
echo "| volume size | async QD16 IOPS (two runs) | secondary's heartbeat-set file | takeover ready_ms ($PENDING_MIB MiB pending) |"
echo "|---:|---:|---:|---:|"
for size in $SIZES; do
  rm -rf "$W/s" "$W/p" "$W"/*.img
  "${NODE_B[@]}" "$E" serve --volume b --data "$W/s.img" --size "$size" --state-dir "$W/s" \
    --nbd-listen 127.0.0.1:10972 --grpc-listen 127.0.0.1:9672 --token-file "$W/tok" \
    --role secondary --peer 127.0.0.1:9671 2>>"$W/s.log" &
  S=$!
  "${NODE_A[@]}" "$E" serve --volume b --data "$W/p.img" --size "$size" --state-dir "$W/p" \
    --nbd-listen 127.0.0.1:10971 --grpc-listen 127.0.0.1:9671 --token-file "$W/tok" \
    --peer 127.0.0.1:9672 --fault-injection 2>>"$W/p.log" &
  P=$!
  sleep 2
  a=$(iops); b=$(iops)
  hb=$(stat -c %s "$W/s/peer_pending_heartbeat" 2>/dev/null || echo 0)
  "$E" fault --grpc 127.0.0.1:9671 --volume b --token-file "$W/tok" --pause true >/dev/null
  fio --name=d --ioengine=nbd --uri=nbd://127.0.0.1:10971/b --rw=randwrite --bs=4k --iodepth=16 \
      --size="${REGION_MIB}M" --io_size="${PENDING_MIB}M" --randrepeat=0 >/dev/null 2>&1
  ready=$("$E" takeover --grpc 127.0.0.1:9672 --volume b --token-file "$W/tok" --json |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["ready_ms"])')
  echo "| $size | $a / $b | $hb bytes | $ready |"
  kill "$S" "$P"; wait "$S" "$P" 2>/dev/null || true
done
