#!/usr/bin/env bash
# NBD path benchmark: fio's nbd engine against tandem-engine and against nbdkit's file plugin,
# on identical files, in the same run, over TCP and a unix socket. Prints a markdown table.
#   bench/nbd-vs-nbdkit.sh [SIZE_MIB=512] [RUNTIME_S=5]
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_MIB=${1:-512}
RUNTIME=${2:-5}
. bench/common.sh
bench_setup
ENGINE=$E

# Identical, fully allocated files, so neither side reads holes.
dd if=/dev/urandom of="$W/a.img" bs=1M count="$SIZE_MIB" status=none
cp "$W/a.img" "$W/b.img"
sync

"$ENGINE" serve --volume bench --data "$W/a.img" --size "${SIZE_MIB}M" --state-dir "$W/state" \
  --nbd-listen 127.0.0.1:0 --grpc-listen 127.0.0.1:0 --nbd-socket "$W/tandem.sock" \
  --ready-file "$W/ready" 2>"$W/engine.log" &
nbdkit -f -U "$W/nbdkit.sock" file "$W/b.img" 2>"$W/nbdkit.log" &
nbdkit -f -i 127.0.0.1 -p 10898 file "$W/b.img" 2>"$W/nbdkit-tcp.log" &
for _ in $(seq 100); do [ -s "$W/ready" ] && [ -S "$W/nbdkit.sock" ] && break; sleep 0.1; done
TANDEM_TCP=$(python3 -c 'import json,sys;print(json.load(open(sys.argv[1]))["nbd"])' "$W/ready")

declare -A URI=(
  [tandem-tcp]="nbd://$TANDEM_TCP/bench"
  [tandem-unix]="nbd+unix:///bench?socket=$W/tandem.sock"
  [nbdkit-tcp]="nbd://127.0.0.1:10898/"
  [nbdkit-unix]="nbd+unix:///?socket=$W/nbdkit.sock"
)
JOBS=("randread 4k 1" "randread 4k 16" "randwrite 4k 1" "randwrite 4k 16" "read 1m 4" "write 1m 4")

run() { # uri rw bs iodepth -> "iops MiB/s"
  fio --name=b --ioengine=nbd --uri="$1" --rw="$2" --bs="$3" --iodepth="$4" --size="${SIZE_MIB}M" \
      --time_based --runtime="$RUNTIME" --ramp_time=1 --norandommap --randrepeat=0 \
      --output-format=json 2>/dev/null |
    python3 -c 'import json,sys
t=sys.stdin.read()
j=json.loads(t[t.index("{"):])["jobs"][0]
side=j["read"] if j["read"]["io_bytes"]>0 else j["write"]
print("%.0f %.1f" % (side["iops"], side["bw_bytes"]/1048576))'
}

echo "| transport | workload | tandem IOPS | tandem MiB/s | nbdkit IOPS | nbdkit MiB/s | ratio |"
echo "|---|---|---:|---:|---:|---:|---:|"
for t in tcp unix; do
  for job in "${JOBS[@]}"; do
    set -- $job
    read -r ti tb <<<"$(run "${URI[tandem-$t]}" "$1" "$2" "$3")"
    read -r ni nb <<<"$(run "${URI[nbdkit-$t]}" "$1" "$2" "$3")"
    ratio=$(python3 -c "print(f'{$ti/$ni:.2f}x' if $ni else 'n/a')")
    echo "| $t | $1 $2 QD$3 | $ti | $tb | $ni | $nb | $ratio |"
  done
done
