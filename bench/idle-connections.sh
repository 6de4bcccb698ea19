#!/usr/bin/env bash
# What an idle NBD connection costs the engine (issue 17: <= 64 KiB each): an unpaired engine on a
# 64 MiB volume, its RSS before and after N connections have finished the handshake and sit idle.
#   bench/idle-connections.sh [N=10000]
# Both this shell and the engine need N + a few dozen open files (ulimit -n).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-10000}
ulimit -n $((N + 256)) 2>/dev/null || true
if [ "$(ulimit -n)" -lt $((N + 64)) ]; then
  echo "ulimit -n is $(ulimit -n): too low for $N connections" >&2
  exit 1
fi
. bench/common.sh
bench_setup
echo bench > "$W/tok"
"$E" serve --volume b --data "$W/d.img" --size 64M --state-dir "$W/s" --nbd-listen 127.0.0.1:10981 \
  --grpc-listen 127.0.0.1:9681 --token-file "$W/tok" --nbd-max-connections $((N + 16)) 2>>"$W/e.log" &
P=$!
for _ in $(seq 100); do nbdinfo --size nbd://127.0.0.1:10981/b >/dev/null 2>&1 && break; sleep 0.1; done
rss() { awk '/^VmRSS/ {print $2}' "/proc/$P/status"; }
before=$(rss)
mkfifo "$W/hold"
python3 bench/nbd_idle.py 127.0.0.1 10981 "$N" b <"$W/hold" >"$W/out" 2>&1 &
exec 3>"$W/hold"
for _ in $(seq 600); do grep -q "open\|Error" "$W/out" && break; sleep 0.2; done
if ! grep -q "^open $N" "$W/out"; then cat "$W/out" >&2; exit 1; fi
after=$(rss)
exec 3>&-
echo "| connections | engine RSS before | after | per connection |"
echo "|---:|---:|---:|---:|"
echo "| $N | $before KiB | $after KiB | $(( (after - before) * 1024 / N / 1024 )).$(( ((after - before) * 1024 / N % 1024) * 10 / 1024 )) KiB |"
