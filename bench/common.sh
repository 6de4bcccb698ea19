# Shared set-up of the bench scripts; source it from the repository root, then call bench_setup.
# It installs the dependencies, builds a release engine (plus any packages named), and makes a
# scratch directory that is removed, with every background job killed, on exit.
# Sets E (the engine binary; TANDEM_ENGINE overrides it) and W (the scratch directory).
bench_setup() { # [-p PACKAGE ...]
  scripts/install-deps.sh >/dev/null
  # TANDEM_ENGINE=path runs that build of the engine instead (bench/compare-engines.sh: two commits
  # in one run); packages named are still built.
  if [ -z "${TANDEM_ENGINE:-}" ] || [ $# -gt 0 ]; then cargo build --release -q -p storage-engine "$@"; fi
  E=${TANDEM_ENGINE:-${CARGO_TARGET_DIR:-$PWD/target}/release/tandem-engine}
  W=$(mktemp -d /var/tmp/tandem-bench.XXXXXX)
  trap bench_cleanup EXIT
}

bench_cleanup() {
  kill $(jobs -p) 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$W"
}

# Writes FILE back and drops it from the page cache (no root needed): a peer comparison starts
# with both servers' files in the same state, whatever wrote them.
bench_evict() { # FILE...
  python3 - "$@" <<'PY'
import os, sys
for path in sys.argv[1:]:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # dirty pages are not dropped; written back, they are
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
PY
}

# Every CPU's tick counters, for bench_busy.
bench_ticks() { grep -E '^cpu[0-9]+ ' /proc/stat; }
# Busy share of each CPU between two bench_ticks snapshots, as "c0%/c1%" (whole machine: the other
# builders on a shared machine show up here too).
bench_busy() { # before after
  python3 - "$1" "$2" <<'PY'
import sys
def parse(t):
    out = []
    for l in t.strip().splitlines():
        f = [int(x) for x in l.split()[1:]]
        idle = f[3] + f[4]
        out.append((sum(f[:8]) - idle, idle))
    return out
a, b = parse(sys.argv[1]), parse(sys.argv[2])
print("/".join("%.0f%%" % (100 * (b1 - a1) / max(1, (b1 - a1) + (i2 - i1))) for (a1, i1), (b1, i2) in zip(a, b)))
PY
}

# The CPU layout of a pair (PIN, default 1): 1 = two one-core nodes (fio and primaries on CPU 0,
# secondaries on CPU 1), 0 = everything shares all CPUs, one = everything on CPU 0.
bench_nodes() {
  PIN=${PIN:-1}
  NODE_A=(); NODE_B=()
  if [ "$PIN" = 1 ] && [ "$(nproc)" -ge 2 ]; then NODE_A=(taskset -c 0); NODE_B=(taskset -c 1); fi
  if [ "$PIN" = one ]; then NODE_A=(taskset -c 0); NODE_B=(taskset -c 0); fi
  return 0
}

# Engine pairs (bench/replication.sh, bench/vs-qsd.sh): volume `b`, token file in TOK, the node layout
# in NODE_A/NODE_B (a secondary runs on NODE_B). `serve` sets PID and writes $W/<name>.pid.
js() { "$E" status --grpc "$1" --volume b "${TOK[@]}" --json | python3 -c "import json,sys; print(json.load(sys.stdin)[\"$2\"])"; }
wait_synced() { # grpc-address: waits for Synced, at most SYNC_WAIT seconds (default 600), else fails
  local t0=$SECONDS
  until [ "$(js "$1" pair_state 2>/dev/null)" = Synced ]; do
    if [ $((SECONDS - t0)) -ge "${SYNC_WAIT:-600}" ]; then
      echo "the pair at $1 is not Synced after ${SYNC_WAIT:-600} s (see the engines' logs)" >&2
      return 1
    fi
    sleep 0.05
  done
}
serve() { # name nbdport grpcport [extra...]
  local n=$1 np=$2 gp=$3; shift 3
  local node=("${NODE_A[@]}")
  case " $* " in *" secondary "*) node=("${NODE_B[@]}");; esac
  "${node[@]}" "$E" serve --volume b --data "$W/$n.img" --size "${SIZE_MIB}M" --state-dir "$W/$n" \
    --nbd-listen 127.0.0.1:$np --grpc-listen 127.0.0.1:$gp "${TOK[@]}" "$@" 2>>"$W/$n.log" &
  PID=$!
  echo "$PID" > "$W/$n.pid" # taskset execs the daemon: this is its pid
}
