#!/usr/bin/env bash
# CSI attach-path benchmark: fio through the block device that tandem-csi attaches here (a loop device
# with direct I/O over the tandem-csi FUSE daemon) against fio's nbd engine straight to the same
# tandem-engine export, in the same run. The gap is the cost of the fallback attach path (FUSE + loop);
# on nodes with nbd.ko the kernel NBD client is the production path and replaces it.
#   sudo bench/csi-attach.sh [SIZE_MIB=512] [RUNTIME=5]     (prints a markdown table)
# RUNTIME and RAMP (default 1) are fio times (5 = 5 s, 200ms).
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_MIB=${1:-512}
RUNTIME=${2:-5}
RAMP=${RAMP:-1}
[ "$(id -u)" -eq 0 ] || { echo "csi-attach.sh: needs root (FUSE mount, loop device)" >&2; exit 1; }
scripts/install-deps.sh >/dev/null
TARGET=${CARGO_TARGET_DIR:-$PWD/target}
# TANDEM_ENGINE and TANDEM_CSI (both) run those builds instead (scripts/bench-smoke.sh: debug ones).
if [ -z "${TANDEM_ENGINE:-}" ] || [ -z "${TANDEM_CSI:-}" ]; then
  cargo build --release -q -p storage-engine -p csi-node
fi
ENGINE=${TANDEM_ENGINE:-$TARGET/release/tandem-engine}
CSI=${TANDEM_CSI:-$TARGET/release/tandem-csi}
W=$(mktemp -d /var/tmp/tandem-csi-bench.XXXXXX)
LOOP="" DPID="" EPID=""
cleanup() {
  if [ -n "$LOOP" ]; then losetup -d "$LOOP" 2>/dev/null || true; sleep 0.2; fi
  if [ -n "$DPID" ]; then kill "$DPID" 2>/dev/null || true; wait "$DPID" 2>/dev/null || true; fi
  if [ -n "$EPID" ]; then kill "$EPID" 2>/dev/null || true; wait "$EPID" 2>/dev/null || true; fi
  umount -l "$W/att/fuse" 2>/dev/null || true
  rm -rf "$W"
}
trap cleanup EXIT

# A fully allocated file, so reads never hit holes.
dd if=/dev/urandom of="$W/a.img" bs=1M count="$SIZE_MIB" status=none
sync
"$ENGINE" serve --volume bench --data "$W/a.img" --size "${SIZE_MIB}M" --state-dir "$W/state" \
  --nbd-listen 127.0.0.1:0 --grpc-listen 127.0.0.1:0 --ready-file "$W/ready" 2>"$W/engine.log" &
EPID=$!
for _ in $(seq 100); do [ -s "$W/ready" ] && break; sleep 0.1; done
NBD=$(python3 -c 'import json,sys;print(json.load(open(sys.argv[1]))["nbd"])' "$W/ready")

mkdir -p "$W/att"
"$CSI" attach-fuse --nbd "$NBD" --export bench --dir "$W/att" --fuse-threads "${FUSE_THREADS:-2}" \
  >"$W/att.out" 2>"$W/att.log" &
DPID=$!
for _ in $(seq 100); do grep -q READY "$W/att.out" 2>/dev/null && break; sleep 0.1; done
grep -q READY "$W/att.out" || { cat "$W/att.log" >&2; exit 1; }
LOOP=$(losetup --direct-io=on --show -f "$W/att/fuse/disk")
[ "$(cat /sys/block/"$(basename "$LOOP")"/loop/dio)" = 1 ] || echo "warning: $LOOP is not in direct-I/O mode" >&2

JOBS=("randread 4k 1" "randread 4k 16" "randwrite 4k 1" "randwrite 4k 16" "read 1m 4" "write 1m 4")
summary() {
  python3 -c 'import json,sys
t=sys.stdin.read()
j=json.loads(t[t.index("{"):])["jobs"][0]
side=j["read"] if j["read"]["io_bytes"]>0 else j["write"]
print("%.0f %.1f %.0f" % (side["iops"], side["bw_bytes"]/1048576, side["clat_ns"]["mean"]/1000))'
}
common=(--name=b --size="${SIZE_MIB}M" --time_based --runtime="$RUNTIME" --ramp_time="$RAMP"
        --norandommap --randrepeat=0 --output-format=json)
run_nbd() { fio "${common[@]}" --ioengine=nbd --uri="nbd://$NBD/bench" --rw="$1" --bs="$2" --iodepth="$3" 2>/dev/null | summary; }
run_dev() { fio "${common[@]}" --ioengine=libaio --direct=1 --filename="$LOOP" --rw="$1" --bs="$2" --iodepth="$3" 2>/dev/null | summary; }

echo "| workload | fio nbd → engine IOPS | MiB/s | mean lat µs | fio → loop over FUSE IOPS | MiB/s | mean lat µs | FUSE+loop / nbd |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|"
for j in "${JOBS[@]}"; do
  set -- $j
  read -r ni nb nl < <(run_nbd "$1" "$2" "$3")
  read -r di db dl < <(run_dev "$1" "$2" "$3")
  ratio=$(python3 -c "print('%.2f' % ($di/$ni if $ni else 0))")
  echo "| $1 bs=$2 qd=$3 | $ni | $nb | $nl | $di | $db | $dl | $ratio |"
done
