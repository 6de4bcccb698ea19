#!/usr/bin/env bash
# Takeover benchmark, all in one run on loopback:
#  1. takeover ready time against the backlog (blocks written on the primary that the secondary has not
#     received), beside the prior-art baseline "wait until the backlog has drained to the secondary, then
#     start" measured on a fresh pair with the same backlog;
#  2. proxied read latency after a takeover (QD1 4k reads of still-pending blocks, served by the old
#     primary over gRPC) against local reads on the same engine.
# Each case is a fresh async pair (3 GiB sparse volume, release engines, --fault-injection). The first
# LOCAL_MIB (64) are written and replicated, then the replication link is paused (`fault --pause true`)
# and the backlog is written with fio (1 MiB sequential writes) right after that region.
#   bench/takeover.sh [SIZES="0 64M 512M 2G"] [REPEATS=5] [READS=10000]     (prints markdown tables)
set -euo pipefail
cd "$(dirname "$0")/.."
SIZES=${1:-0 64M 512M 2G}
REPEATS=${2:-5}
READS=${3:-10000}
# The region written and replicated before the pause (smaller in scripts/bench-smoke.sh).
LOCAL_MIB=${LOCAL_MIB:-64}
. bench/common.sh
bench_setup
echo bench > "$W/tok"
TOK=(--token-file "$W/tok")

mib() { # 0 | N[M] | NG -> MiB
  case $1 in
    *G) echo $(( ${1%G} * 1024 )) ;;
    *M) echo "${1%M}" ;;
    *[!0-9]*) echo "takeover.sh: size $1: use N, NM or NG" >&2; exit 2 ;;
    *) echo "$1" ;;
  esac
}
MAX_MIB=0
for s in $SIZES; do m=$(mib "$s"); if [ "$m" -gt "$MAX_MIB" ]; then MAX_MIB=$m; fi; done
VOL_MIB=$(( MAX_MIB + LOCAL_MIB > 3072 ? MAX_MIB + LOCAL_MIB : 3072 ))
us() { echo $(( ${1/./} )); }  # $EPOCHREALTIME -> µs
ms_since() { local d=$(( $(us "$2") - $(us "$1") )); printf '%d.%03d' $(( d / 1000 )) $(( d % 1000 )); }
field() { # json key -> value (flat JSON from `status --json` / `takeover`; no python on polling paths)
  [[ $1 =~ \"$2\":\"?([^,\"}]*) ]] || { echo "takeover.sh: no $2 in $1" >&2; exit 1; }
  echo "${BASH_REMATCH[1]}"
}
st() { "$E" status --grpc "$1" --volume vol "${TOK[@]}" --json; }
js() { field "$(st "$1")" "$2"; }

start_pair() { # fresh secondary + primary; sets PG SG (gRPC), SN (secondary's NBD), PPID_ SPID_
  rm -rf "$W/p" "$W/s"; mkdir -p "$W/p" "$W/s"
  read -r pn pg sn sg < <(python3 -c '
import socket
ss=[socket.socket() for _ in range(4)]
for s in ss: s.bind(("127.0.0.1",0))
print(*[s.getsockname()[1] for s in ss])')
  PG=127.0.0.1:$pg SG=127.0.0.1:$sg PN=127.0.0.1:$pn SN=127.0.0.1:$sn
  local common=(--volume vol --size "${VOL_MIB}M" "${TOK[@]}" --fault-injection)
  "$E" serve "${common[@]}" --data "$W/s/data.img" --state-dir "$W/s/state" --role secondary \
    --nbd-listen "$SN" --grpc-listen "$SG" --peer "$PG" --ready-file "$W/s/ready" 2>>"$W/s.log" &
  SPID_=$!
  "$E" serve "${common[@]}" --data "$W/p/data.img" --state-dir "$W/p/state" --role primary \
    --nbd-listen "$PN" --grpc-listen "$PG" --peer "$SG" --ready-file "$W/p/ready" 2>>"$W/p.log" &
  PPID_=$!
  for _ in $(seq 100); do [ -s "$W/s/ready" ] && [ -s "$W/p/ready" ] && break; sleep 0.05; done
  wait_synced
}
stop_pair() {
  kill "$PPID_" "$SPID_" 2>/dev/null || true
  wait "$PPID_" 2>/dev/null || true; wait "$SPID_" 2>/dev/null || true
  rm -rf "$W/p" "$W/s"
}
wait_synced() {
  local s
  for _ in $(seq 600); do
    s=$(st "$PG" 2>/dev/null) || { sleep 0.1; continue; }
    [ "$(field "$s" pair_state)" = Synced ] && [ "$(field "$s" pending_blocks)" = 0 ] && return
    sleep 0.1
  done
  echo "takeover.sh: pair did not reach Synced" >&2; exit 1
}
fio_write() { # offset_mib size_mib
  fio --name=w --ioengine=nbd --uri="nbd://$PN/vol" --rw=write --bs=1M --iodepth=4 \
      --offset="$1M" --size="$2M" --end_fsync=1 --output-format=terse >/dev/null 2>>"$W/fio.log"
}
build_backlog() { # mib: replicate the local region, pause the link, write the backlog
  fio_write 0 "$LOCAL_MIB"; wait_synced
  "$E" fault --grpc "$PG" --volume vol "${TOK[@]}" --pause true >/dev/null
  if [ "$1" -gt 0 ]; then fio_write "$LOCAL_MIB" "$1"; fi
  local p; p=$(js "$PG" pending_blocks)
  [ "$p" = $(( $1 * 256 )) ] || { echo "takeover.sh: pending_blocks $p, expected $(( $1 * 256 ))" >&2; exit 1; }
}
events() { # secondary-status primary-status -> ms: request→fenced, fenced→stored, stored→ready
  python3 -c '
import json,sys
def ev(j):
    return {e.split(" ")[1]: int(e.split(" ")[0]) for e in json.loads(j)["events"]}
s, p = ev(sys.argv[1]), ev(sys.argv[2])
print(p["Fenced"] - s["TakeoverRequested"], s["HandoffStored"] - p["Fenced"], s["ServingReady"] - s["HandoffStored"])' "$1" "$2"
}
lat() { # offset_mib size_mib n -> "ios mean p50 p99" (µs, submit to completion), QD1 4k random reads without repeats, fixed seed
  fio --name=r --ioengine=nbd --uri="nbd://$SN/vol" --rw=randread --bs=4k --iodepth=1 \
      --offset="$1M" --size="$2M" --io_size=$(( $3 * 4 ))k --randrepeat=1 --randseed=42 \
      --lat_percentiles=1 --output-format=json 2>>"$W/fio.log" | python3 -c 'import json,sys
t=sys.stdin.read(); r=json.loads(t[t.index("{"):])["jobs"][0]["read"]; c=r["lat_ns"]; p=c["percentile"]
print("%d %.0f %.0f %.0f" % (r["total_ios"], c["mean"]/1e3, p["50.000000"]/1e3, p["99.000000"]/1e3))'
}

R=$W/results
: > "$R"
# Repeats outside, sizes inside: slow spells of this shared machine (fsync latency) spread over all sizes.
for rep in $(seq "$REPEATS"); do
  for s in $SIZES; do
    m=$(mib "$s")
    # Takeover: the secondary fences the primary, takes its table and serves; the drain stays paused.
    start_pair; build_backlog "$m"
    t0=$EPOCHREALTIME
    out=$("$E" takeover --grpc "$SG" --volume vol "${TOK[@]}" --json)
    t1=$EPOCHREALTIME
    ready=$(field "$out" ready_ms); handed=$(field "$out" peer_pending_blocks)
    [ "$handed" = $(( m * 256 )) ] || { echo "takeover.sh: handed over $handed blocks, expected $(( m * 256 ))" >&2; exit 1; }
    echo "T $m $ready $(ms_since "$t0" "$t1") $(events "$(st "$SG")" "$(st "$PG")")" >> "$R"
    if [ "$m" = "$MAX_MIB" ] && [ "$m" -gt 0 ] && [ "$rep" = "$REPEATS" ]; then
      # Proxied reads: distinct still-pending blocks (each is proxied once, then read-repaired), beside
      # reads of the region replicated before the pause, then the same pending blocks again.
      n=$(( READS < m * 256 ? READS : m * 256 )); nl=$(( n < LOCAL_MIB * 256 ? n : LOCAL_MIB * 256 ))
      before=$(js "$SG" proxied_reads)
      echo "L local $(lat 0 "$LOCAL_MIB" "$nl")" >> "$R"
      echo "L proxied $(lat "$LOCAL_MIB" "$m" "$n")" >> "$R"
      mid=$(js "$SG" proxied_reads)
      echo "L repaired $(lat "$LOCAL_MIB" "$m" "$n")" >> "$R"
      after=$(js "$SG" proxied_reads)
      echo "P $m $((mid - before)) $((after - mid)) $(js "$SG" proxied_read_errors)" >> "$R"
      # The machine's gRPC round trip to the old primary, the floor under a proxied read.
      "$E" status --grpc "$PG" --volume vol "${TOK[@]}" --rtt 2000 |
        python3 -c 'import json,sys; j=json.load(sys.stdin); print("G", j["calls"], j["mean_us"], j["p50_us"], j["p99_us"])' >> "$R"
    fi
    stop_pair
    # Baseline on a fresh pair with the same backlog: resume the link, wait until nothing is pending
    # (status polled every 20 ms), then promote the caught-up secondary (a takeover with nothing owed).
    start_pair; build_backlog "$m"
    t0=$EPOCHREALTIME
    "$E" fault --grpc "$PG" --volume vol "${TOK[@]}" --pause false >/dev/null
    until [ "$(js "$PG" pending_blocks)" = 0 ]; do sleep 0.02; done
    t1=$EPOCHREALTIME
    out=$("$E" takeover --grpc "$SG" --volume vol "${TOK[@]}" --json)
    t2=$EPOCHREALTIME
    [ "$(field "$out" peer_pending_blocks)" = 0 ] || { echo "takeover.sh: baseline promoted with blocks owed: $out" >&2; exit 1; }
    echo "B $m $(ms_since "$t0" "$t1") $(ms_since "$t0" "$t2")" >> "$R"
    stop_pair
  done
done

python3 - "$R" "$SIZES" "$REPEATS" "$READS" <<'EOF'
import sys, statistics as st
path, sizes, repeats, reads = sys.argv[1], sys.argv[2].split(), sys.argv[3], sys.argv[4]
T, B, L, P, G = {}, {}, {}, None, None
for line in open(path):
    f = line.split()
    if f[0] == "T": T.setdefault(int(f[1]), []).append([float(x) for x in f[2:]])
    elif f[0] == "B": B.setdefault(int(f[1]), []).append([float(x) for x in f[2:]])
    elif f[0] == "L": L[f[1]] = [float(x) for x in f[2:]]
    elif f[0] == "P": P = f[1:]
    elif f[0] == "G": G = [float(x) for x in f[1:]]
def mib(s): return int(s[:-1]) * 1024 if s.endswith("G") else int(s.rstrip("M"))
def label(m): return "0" if m == 0 else (f"{m // 1024} GiB" if m % 1024 == 0 else f"{m} MiB")
def med(xs): return st.median(xs)
def rng(xs): return f"{min(xs):.0f}–{max(xs):.0f}"
ms = sorted({mib(s) for s in sizes})
print(f"### Takeover ready time against backlog, beside wait-for-drain (median of {repeats}; range)")
print()
print("| backlog | blocks handed over | takeover: ready_ms (engine) | takeover: CLI wall ms | baseline: drain ms | baseline: drain + promote ms | baseline / takeover (wall) |")
print("|---:|---:|---:|---:|---:|---:|---:|")
for m in ms:
    t = T[m]; r = [x[0] for x in t]; w = [x[1] for x in t]
    d = [x[0] for x in B[m]]; b = [x[1] for x in B[m]]
    print(f"| {label(m)} | {m * 256} | {med(r):.0f} ({rng(r)}) | {med(w):.0f} ({rng(w)}) | {med(d):.0f} ({rng(d)}) | {med(b):.0f} ({rng(b)}) | {med(b) / med(w):.1f}x |")
lo, hi = ms[0], ms[-1]
if hi != lo:
    r = lambda m: med([x[0] for x in T[m]]); w = lambda m: med([x[1] for x in T[m]])
    print()
    print(f"Ready at {label(hi)} vs {label(lo)}: engine ready_ms {r(hi) / max(r(lo), 1):.2f}x, CLI wall {w(hi) / w(lo):.2f}x.")
print()
print("### Where the engine's time goes (median ms, from the engines' event timestamps)")
print()
print("| backlog | request → old primary fenced | fenced → table stored, promoted | promoted → reply |")
print("|---:|---:|---:|---:|")
for m in ms:
    t = T[m]
    print(f"| {label(m)} | " + " | ".join(f"{med([x[i] for x in t]):.0f}" for i in (2, 3, 4)) + " |")
if L:
    print()
    print(f"### Reads after a takeover with {label(ms[-1])} pending (QD1 4k random reads, no block read twice per pass)")
    print()
    print("| reads of | ios | mean µs | p50 µs | p99 µs | mean / local |")
    print("|---|---:|---:|---:|---:|---:|")
    names = {"local": "local blocks (replicated before the pause)",
             "proxied": "pending blocks (proxied to the old primary)",
             "repaired": "the same pending blocks again (read-repaired)"}
    for k in ("local", "proxied", "repaired"):
        n, mean, p50, p99 = L[k]
        print(f"| {names[k]} | {n:.0f} | {mean:.0f} | {p50:.0f} | {p99:.0f} | {mean / L['local'][1]:.1f}x |")
    print()
    print(f"(proxied reads counted by the engine: {P[1]} in the first pass, {P[2]} in the second; errors: {P[3]})")
    if G:
        print()
        print(f"gRPC round trip to the old primary (`status --rtt`, {G[0]:.0f} calls on one connection): mean {G[1]:.0f} µs, "
              f"p50 {G[2]:.0f} µs, p99 {G[3]:.0f} µs. Proxied read p50 / round trip p50: {L['proxied'][2] / G[2]:.2f}x (issue 17: <= 2x).")
EOF
