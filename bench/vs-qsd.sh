#!/usr/bin/env bash
# Tandem's pair against qemu-storage-daemon's mirror, in one run on loopback (issue 17, "a real peer").
#   bench/vs-qsd.sh [SIZE_MIB=256] [RUNTIME=5]
# RUNTIME is a fio time (5 = 5 s, 200ms); RAMP (default 1) likewise. JOBS ("rw bs qd" triples split
# by ";") narrows the table. Smoke run (scripts/bench-smoke.sh):
#   RAMP=0 JOBS="randwrite 4k 1;write 1m 4" bench/vs-qsd.sh 16 200ms
# The same fio jobs (--ioengine=nbd) against
#  - Tandem's async pair and sync pair (as bench/replication.sh starts them), and
#  - qemu-storage-daemon exporting a raw file over NBD, with a blockdev-mirror (started over QMP) to an
#    NBD export of a second qemu-storage-daemon: copy-mode=background beside async, write-blocking
#    beside sync. Every fio run starts in the mirror's steady state (job READY, nothing left to copy).
# What each mode guarantees when fio gets its acknowledgement of a write:
#  - Tandem async / qsd background: the primary has it; the secondary gets it later (Tandem: in order,
#    from the journal or the table; qsd: the dirty bitmap's blocks, copied in any order).
#  - Tandem sync: the secondary has applied it too (durable there at the next FLUSH/FUA).
#    qsd write-blocking: the write reached the target export too (its page cache, cache.direct=off),
#    but only once the job is READY and "actively-synced"; before that, writes are copied in the
#    background like in background mode. This script measures only after READY.
#  Neither side is asked for durability here: fio sends no FLUSH.
# Fairness: every file is a fully allocated copy of the same random data (secondaries start as zeros
# and get the full copy), and before each fio run every file is written back (fsync) and dropped
# from the page cache (posix_fadvise DONTNEED). The mirror's granularity is 4 KiB, Tandem's tracking unit; qemu's
# default (64 KiB for a raw file) would copy 64 KiB per 4 KiB random write in background mode
# (QSD_GRANULARITY overrides it).
# PIN=1 (default), PIN=0, PIN=one: the layouts of bench/replication.sh (fio and primaries on CPU 0,
# secondaries on CPU 1; everything shared; everything on CPU 0).
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_MIB=${1:-256}
RUNTIME=${2:-5}
GRAN=${QSD_GRANULARITY:-4096}
RAMP=${RAMP:-1}
# fio time -> ms (a bare number is seconds), for the CPU per I/O.
ms() { python3 -c "import re,sys; n,u=re.fullmatch(r'([0-9.]+)(ms|s|m)?',sys.argv[1]).groups(); print(int(float(n)*{'ms':1,'s':1000,'m':60000}[u or 's']))" "$1"; }
RUNTIME_MS=$(ms "$RUNTIME"); RAMP_MS=$(ms "$RAMP")
IFS=';' read -r -a JOBS <<<"${JOBS:-randwrite 4k 1;randwrite 4k 16;randread 4k 1;randread 4k 16;write 1m 4}"
command -v qemu-storage-daemon >/dev/null || { echo "vs-qsd: qemu-storage-daemon not found (apt-get install qemu-utils)" >&2; exit 1; }
. bench/common.sh
bench_nodes
bench_setup
echo bench > "$W/tok"
TOK=(--token-file "$W/tok")
QMP=(python3 bench/qmp.py)

# Ports apart from bench/replication.sh's, so both can run on one machine.
# Tandem async: pa 10961/9561 -> sa 10962/9562; sync: ps 10963/9563 -> ss 10964/9564.
# qsd background: qa 10965 -> qb 10966; write-blocking: qs 10967 -> qt 10968.
qsd() { # name nbdport primary|secondary: a qemu-storage-daemon exporting $W/name.img as "b"
  local n=$1 np=$2 node=("${NODE_A[@]}")
  [ "$3" = secondary ] && node=("${NODE_B[@]}")
  "${node[@]}" qemu-storage-daemon \
    --blockdev driver=file,node-name=file0,filename="$W/$n.img",cache.direct=off \
    --blockdev driver=raw,node-name=disk0,file=file0 \
    --nbd-server addr.type=inet,addr.host=127.0.0.1,addr.port=$np \
    --export type=nbd,id=exp0,node-name=disk0,name=b,writable=on \
    --chardev socket,id=mon0,path="$W/$n.qmp",server=on,wait=off --monitor chardev=mon0 2>>"$W/$n.log" &
  echo $! > "$W/$n.pid"
}
mirror() { # primary-name target-nbdport copy-mode
  "${QMP[@]}" "$W/$1.qmp" blockdev-add \
    "{\"driver\":\"nbd\",\"node-name\":\"tgt\",\"export\":\"b\",\"server\":{\"type\":\"inet\",\"host\":\"127.0.0.1\",\"port\":\"$2\"}}" >/dev/null
  "${QMP[@]}" "$W/$1.qmp" blockdev-mirror \
    "{\"job-id\":\"m\",\"device\":\"disk0\",\"target\":\"tgt\",\"sync\":\"full\",\"copy-mode\":\"$3\",\"granularity\":$GRAN}" >/dev/null
}
qsd_steady() { "${QMP[@]}" "$W/$1.qmp" wait-ready m 120; }
actively_synced() { "${QMP[@]}" "$W/$1.qmp" query-block-jobs | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["actively-synced"])'; }
# Every file alike: written back, then dropped from the page cache.
evict() { bench_evict "$W"/*.img; }

dd if=/dev/urandom of="$W/seed.img" bs=1M count="$SIZE_MIB" status=none
for n in pa ps qa qs; do cp "$W/seed.img" "$W/$n.img"; done
for n in sa ss qb qt; do dd if=/dev/zero of="$W/$n.img" bs=1M count="$SIZE_MIB" status=none; done
rm "$W/seed.img"
evict

serve sa 10962 9562 --role secondary --peer 127.0.0.1:9561
serve pa 10961 9561 --peer 127.0.0.1:9562
serve ss 10964 9564 --role secondary --peer 127.0.0.1:9563
serve ps 10963 9563 --peer 127.0.0.1:9564 --replication sync
qsd qb 10966 secondary; qsd qt 10968 secondary
qsd qa 10965 primary; qsd qs 10967 primary
mirror qa 10966 background
mirror qs 10968 write-blocking
wait_synced 127.0.0.1:9561; wait_synced 127.0.0.1:9563
qsd_steady qa; qsd_steady qs
[ "$(actively_synced qs)" = True ] || { echo "vs-qsd: the write-blocking mirror is READY but not actively synced" >&2; exit 1; }

# Does each mirror mirror? 64 KiB of a new pattern through each primary's NBD export, then the two
# files compared: at once for the synchronous modes, after catching up for the others.
for spec in "pa 10961 async" "ps 10963 sync" "qa 10965 async" "qs 10967 sync"; do
  set -- $spec
  qemu-io -f raw -c "write -P 0xa5 $((SIZE_MIB * 1048576 / 2)) 64k" "nbd://127.0.0.1:$2/b" >/dev/null
  if [ "$3" = async ]; then
    case $1 in pa) wait_synced 127.0.0.1:9561;; qa) qsd_steady qa;; esac
  fi
  sec=$(case $1 in pa) echo sa;; ps) echo ss;; qa) echo qb;; qs) echo qt;; esac)
  cmp -s "$W/$1.img" "$W/$sec.img" || { echo "vs-qsd: $1 is not mirrored to $sec after a write" >&2; exit 1; }
done

# CPU time (user+system, all threads) of the named daemons, in microseconds, each: "pri sec".
proc_cpu() {
  python3 - "$W" "$@" <<'PY'
import os, sys
hz = os.sysconf("SC_CLK_TCK")
out = []
for n in sys.argv[2:]:
    pid = open("%s/%s.pid" % (sys.argv[1], n)).read().strip()
    f = open("/proc/%s/stat" % pid).read().rsplit(")", 1)[1].split()
    out.append(str((int(f[11]) + int(f[12])) * 1000000 // hz))  # utime, stime
print(" ".join(out))
PY
}
# Daemon CPU per I/O, "primary+secondary" in microseconds, from two proc_cpu snapshots and the IOPS
# (the ramp and the catch-up after the run are in the CPU time, counted at the measured rate).
per_io() { # "before" "after" iops
  python3 -c "
import sys
a, b = [list(map(int, x.split())) for x in sys.argv[1:3]]
ios = max(1.0, float(sys.argv[3]) * ($RUNTIME_MS + $RAMP_MS) / 1000)
print('+'.join('%.1f' % ((y - x) / ios) for x, y in zip(a, b)))" "$@"
}
run() { # uri rw bs iodepth -> IOPS; BUSY (a file) = each CPU's busy share during the run
  local t0 out; t0=$(bench_ticks)
  out=$("${NODE_A[@]}" fio --name=b --ioengine=nbd --uri="$1" --rw="$2" --bs="$3" --iodepth="$4" \
      --size="${SIZE_MIB}M" --time_based --runtime="${RUNTIME_MS}ms" --ramp_time="${RAMP_MS}ms" --norandommap \
      --randrepeat=0 --output-format=json 2>/dev/null |
    python3 -c 'import json,sys
t=sys.stdin.read()
j=json.loads(t[t.index("{"):])["jobs"][0]
print("%.0f" % (j["read"]["iops"] if j["read"]["io_bytes"] > 0 else j["write"]["iops"]))')
  bench_busy "$t0" "$(bench_ticks)" > "$W/busy"
  echo "$out"
}

echo "### Tandem's pair against qemu-storage-daemon's mirror (fio runtime $RUNTIME per cell, ${SIZE_MIB} MiB volume, PIN=$PIN)"
echo
echo "| workload | mode | tandem IOPS | qsd IOPS | tandem/qsd | CPU busy (cpu0/cpu1): tandem | qsd | daemon CPU µs/IO (pri+sec): tandem | qsd |"
echo "|---|---|---:|---:|---:|---:|---:|---:|---:|"
for job in "${JOBS[@]}"; do
  set -- $job
  for mode in async sync; do
    if [ $mode = async ]; then tn="pa sa" tp=10961 tg=9561 qn="qa qb" qp=10965; qm=background
    else tn="ps ss" tp=10963 tg=9563 qn="qs qt" qp=10967; qm=write-blocking; fi
    evict
    c0=$(proc_cpu $tn)
    t=$(run "nbd://127.0.0.1:$tp/b" "$1" "$2" "$3"); tb=$(cat "$W/busy")
    wait_synced 127.0.0.1:$tg
    tc=$(per_io "$c0" "$(proc_cpu $tn)" "$t")
    evict
    c0=$(proc_cpu $qn)
    q=$(run "nbd://127.0.0.1:$qp/b" "$1" "$2" "$3"); qb=$(cat "$W/busy")
    qsd_steady ${qn%% *}
    qc=$(per_io "$c0" "$(proc_cpu $qn)" "$q")
    python3 -c "import sys; print('| $1 $2 QD$3 | $mode / $qm | $t | $q | %s | %s | %s | %s | %s |' % ('%.2fx' % ($t / $q) if $q else 'n/a', *sys.argv[1:]))" "$tb" "$qb" "$tc" "$qc"
  done
done

# The replicas at the end: Tandem's once the pairs are Synced; qsd's once each job is cancelled in the
# READY state (the job then finishes its copy, and the target is a copy of the source).
wait_synced 127.0.0.1:9561; wait_synced 127.0.0.1:9563
for n in qa qs; do "${QMP[@]}" "$W/$n.qmp" block-job-cancel '{"device":"m"}' >/dev/null; "${QMP[@]}" "$W/$n.qmp" wait-gone m 60; done
echo
for pair in "pa sa tandem-async" "ps ss tandem-sync" "qa qb qsd-background" "qs qt qsd-write-blocking"; do
  set -- $pair
  if cmp -s "$W/$1.img" "$W/$2.img"; then echo "$3: replica byte-identical to its source"
  else echo "$3: REPLICA DIFFERS from its source"; FAIL=1; fi
done
[ -z "${FAIL:-}" ]
