#!/usr/bin/env bash
# Replication benchmarks, all in one run on loopback:
#  1. 4k randwrite IOPS (QD1, QD16) of an unpaired engine, an async pair and a sync pair (fio's nbd engine);
#  2. resync after a secondary outage: bytes moved against bytes dirtied, and resync throughput.
#   bench/replication.sh [SIZE_MIB=512] [RUNTIME=5]
# RUNTIME is a fio time (5 = 5 s, 200ms); RAMP (default 1) likewise; RESYNC_MIB (default
# "16 64 256", each at most SIZE_MIB) are the outages' sizes.
# PIN=1 (default) models two one-core nodes on this machine: fio and every primary (and the unpaired
# engine) run on CPU 0, every secondary on CPU 1, so the secondary's work does not steal the primary's
# core. PIN=0 lets everything share all cores. PIN=one puts everything on CPU 0 (no wakeup ever
# crosses CPUs, and the secondary's work competes with the primary's).
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_MIB=${1:-512}
RUNTIME=${2:-5}
RAMP=${RAMP:-1}
RESYNC_MIB=${RESYNC_MIB:-16 64 256}
. bench/common.sh
bench_nodes
bench_setup
echo bench > "$W/tok"
TOK=(--token-file "$W/tok")
fio_iops() { # uri iodepth -> IOPS; BUSY = each CPU's busy share during the run
  local t0 out; t0=$(bench_ticks)
  out=$(fio_run "$@")
  BUSY=$(bench_busy "$t0" "$(bench_ticks)")
  echo "$out"
}
fio_run() {
  "${NODE_A[@]}" fio --name=b --ioengine=nbd --uri="$1" --rw=randwrite --bs=4k --iodepth="$2" --size="${SIZE_MIB}M" \
      --time_based --runtime="$RUNTIME" --ramp_time="$RAMP" --norandommap --randrepeat=0 --output-format=json 2>/dev/null |
    python3 -c 'import json,sys
t=sys.stdin.read(); print("%.0f" % json.loads(t[t.index("{"):])["jobs"][0]["write"]["iops"])'
}
# CPU time (user + system, all threads, in clock ticks) of the engine named NAME so far.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$(cat "$W/$1.pid")/stat"; }
# The engine's own count of host bytes written (every write fio issued, its ramp included).
written() { js "$1" bytes_written; }
# fio against URI at QD, with CPU per write of the named engines: sets CPU_<name> (µs per 4 KiB
# write, from each process's utime+stime over the run and the primary's written bytes).
cpu_cell() { # grpc-of-the-primary uri qd name...
  local g=$1 uri=$2 qd=$3; shift 3
  local n w0 w1; declare -A c0
  for n in "$@"; do c0[$n]=$(cpu_ticks "$n"); done
  w0=$(written "$g")
  fio_iops "$uri" "$qd" > "$W/iops"
  w1=$(written "$g")
  for n in "$@"; do
    python3 -c "import os,sys; t=int(sys.argv[1]); w=int(sys.argv[2])/4096
print('%.1f' % (t * 1e6 / os.sysconf('SC_CLK_TCK') / max(w, 1)))" "$(( $(cpu_ticks "$n") - ${c0[$n]} ))" "$((w1 - w0))" > "$W/cpu-$n"
  done
  echo "$BUSY" > "$W/busy"
}

# O_DIRECT: the page cache starts empty for every engine alike.
prealloc() { dd if=/dev/zero of="$W/$1.img" bs=1M count="$SIZE_MIB" oflag=direct status=none; }

prealloc solo
serve solo 10870 9570
prealloc sa; prealloc pa
serve sa 10872 9572 --role secondary --peer 127.0.0.1:9571; SA=$PID
serve pa 10871 9571 --peer 127.0.0.1:9572
prealloc ss; prealloc ps
serve ss 10874 9574 --role secondary --peer 127.0.0.1:9573
serve ps 10873 9573 --peer 127.0.0.1:9574 --replication sync
sleep 1; wait_synced 127.0.0.1:9571; wait_synced 127.0.0.1:9573

echo "### 4k randwrite IOPS, unpaired vs paired (fio runtime $RUNTIME per cell, ${SIZE_MIB} MiB volume)"
echo
echo "| QD | unpaired | async pair | async/unpaired | sync pair | sync/unpaired | CPU busy: unpaired | async | sync |"
echo "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
CPU_ROWS=()
for qd in 1 16; do
  cpu_cell 127.0.0.1:9570 nbd://127.0.0.1:10870/b $qd solo; u=$(cat "$W/iops"); bu=$(cat "$W/busy")
  cpu_cell 127.0.0.1:9571 nbd://127.0.0.1:10871/b $qd pa sa; a=$(cat "$W/iops"); ba=$(cat "$W/busy")
  wait_synced 127.0.0.1:9571
  cpu_cell 127.0.0.1:9573 nbd://127.0.0.1:10873/b $qd ps ss; s=$(cat "$W/iops"); bs=$(cat "$W/busy")
  wait_synced 127.0.0.1:9573
  python3 -c "import sys; print('| $qd | $u | $a | %.2fx | $s | %.2fx | %s | %s | %s |' % ($a/$u, $s/$u, *sys.argv[1:]))" "$bu" "$ba" "$bs"
  CPU_ROWS+=("$(python3 -c "import sys
u, pa, sa, ps, ss = map(float, sys.argv[1:])
print('| $qd | %.1f | %.1f | %.1f | %.0f%% | %.1f | %.1f | %.0f%% |' % (u, pa, sa, (pa - u) / u * 100, ps, ss, (ps - u) / u * 100))" \
    "$(cat "$W/cpu-solo")" "$(cat "$W/cpu-pa")" "$(cat "$W/cpu-sa")" "$(cat "$W/cpu-ps")" "$(cat "$W/cpu-ss")")")
  [ "$qd" = 1 ] && U1=$u && S1=$s
done
echo
echo "### Engine CPU per 4 KiB write (µs of user + system time of each engine process over the run)"
echo
echo "Replication's share is what the primary spends beyond an unpaired engine's write, against that write (issue 17: <= 25% async)."
echo
echo "| QD | unpaired | async primary | async secondary | async: replication on the primary | sync primary | sync secondary | sync: replication on the primary |"
echo "|---:|---:|---:|---:|---:|---:|---:|---:|"
printf '%s\n' "${CPU_ROWS[@]}"

# The floor under a sync write: one round trip between the primary's and the secondary's CPU, with
# nothing else in it (two processes bouncing a message). No sync design can beat unpaired latency +
# this, so it bounds sync/unpaired at QD1. Two floors: a byte over a unix socketpair (the machine's
# bare cross-CPU wakeup pair), and what a replicated write must at least do, 4 KiB out and a 64-byte
# acknowledgement back over loopback TCP with TCP_NODELAY (the pair's own transport; a tokio echo
# server measured 70.6 µs against python's 73.1, docs/benchmarks.md).
rtt() { # unix|tcp bytes_out bytes_back cpu_a cpu_b -> microseconds per round trip
  python3 - "$@" <<'PY'
import os, socket, sys, time
kind, out_n, back_n, ca, cb = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
n = 20000
if kind == "unix":
    a, b = socket.socketpair()
else:
    l = socket.socket(); l.bind(("127.0.0.1", 0)); l.listen(1)
    a = socket.create_connection(l.getsockname()); b, _ = l.accept()
    for s in (a, b):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
def recvn(s, k):
    while k > 0:
        k -= len(s.recv(k))
if os.fork() == 0:
    os.sched_setaffinity(0, {cb}); back = b"y" * back_n
    for _ in range(n):
        recvn(b, out_n); b.send(back)
    os._exit(0)
os.sched_setaffinity(0, {ca}); time.sleep(0.2); out = b"x" * out_n
t = time.perf_counter()
for _ in range(n):
    a.send(out); recvn(a, back_n)
print("%.1f" % ((time.perf_counter() - t) / n * 1e6)); os.wait()
PY
}
if [ "$(nproc)" -ge 2 ]; then
  cb=1; [ "$PIN" = one ] && cb=0
  same=$(rtt unix 1 1 0 0); cross=$(rtt unix 1 1 0 1); tcp=$(rtt tcp 4096 64 0 "$cb")
  floor=$cross; [ "$PIN" = one ] && floor=$same
  echo
  echo "### The floor under a sync write on this machine"
  echo
  echo "The ceiling is unpaired / (unpaired + round trip); ceiling/measured is how far sync QD1 is from it (issue 17: <= 1.2)."
  echo
  echo "| round trip, unix, same CPU | unix, CPU 0 to CPU $cb | TCP 4 KiB + 64 B, CPU 0 to CPU $cb | unpaired QD1 latency | sync QD1 measured | ceiling (unix) | ceiling/measured | ceiling (TCP 4 KiB) | ceiling/measured |"
  echo "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
  python3 -c "
l = 1e6 / $U1; m = $S1 / $U1
cu = l / (l + $floor); ct = l / (l + $tcp)
print('| %s us | %s us | %s us | %.1f us | %.2fx | %.2fx | %.2f | %.2fx | %.2f |' % ('$same', '$cross', '$tcp', l, m, cu, cu / m, ct, ct / m))"
fi

echo
echo "### Resync after a secondary outage (async pair)"
echo
echo "| dirtied while down | blocks pending | bytes moved on reconnect | moved/dirty | resync time | throughput |"
echo "|---:|---:|---:|---:|---:|---:|"
for mib in $RESYNC_MIB; do
  kill -9 "$SA"; wait "$SA" 2>/dev/null || true
  fio --name=d --ioengine=nbd --uri=nbd://127.0.0.1:10871/b --rw=randwrite --bs=4k --iodepth=16 \
      --size="${mib}M" --offset=0 --io_size="${mib}M" --randrepeat=0 >/dev/null 2>&1
  pending=$(js 127.0.0.1:9571 pending_blocks)
  before=$(( $(js 127.0.0.1:9571 bytes_replicated) + $(js 127.0.0.1:9571 bytes_resynced) ))
  t0=$(date +%s.%N)
  serve sa 10872 9572 --role secondary --peer 127.0.0.1:9571; SA=$PID
  sleep 0.2; wait_synced 127.0.0.1:9571
  t1=$(date +%s.%N)
  after=$(( $(js 127.0.0.1:9571 bytes_replicated) + $(js 127.0.0.1:9571 bytes_resynced) ))
  python3 -c "
moved=$after-$before; dirty=$pending*4096; dt=$t1-$t0
print('| %d MiB of 4k writes | $pending | %.1f MiB | %.2f | %.2f s | %.0f MiB/s |' % ($mib, moved/1048576, moved/dirty if dirty else 0, dt, moved/1048576/dt))"
done
cmp "$W/pa.img" "$W/sa.img" && echo && echo "(replicas byte-identical at the end)"
