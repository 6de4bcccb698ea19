#!/usr/bin/env bash
# Safety campaigns against a real tandem-engine pair (campaign/, binary tandem-campaign):
#   history  pipelined NBD clients (QD 32) under takeovers, failbacks, SIGKILLs, SIGSTOPs and link
#            faults; the recorded history is checked per 512-byte sector, a final full read must
#            hold every acknowledged write, and both replicas must end byte-identical;
#   kill     the same clients and checks under random-time SIGKILLs of either engine;
#   partition  each engine in its own network namespace (needs root; result=SKIPPED otherwise):
#            blackholes, one-way drops, SIGSTOPs, node reboots and forced takeovers; dead-peer
#            detection within --peer-timeout-ms + 1 s, replication resuming by itself, sync mode
#            reporting its degradation, the same history checks.
# Usage: scripts/campaign.sh          full size (several minutes of history, 500 kills,
#                                     40 partitions per replication mode)
#        scripts/campaign.sh --ci     small sizes for CI (< 3 minutes in all)
# Extra arguments (e.g. --seed N) go to every run. Prints a markdown summary table for
# docs/reliability.md; exits non-zero if any run found a violation or a liveness problem.
set -euo pipefail
cd "$(dirname "$0")/.."
ci=0
if [ "${1:-}" = "--ci" ]; then ci=1; shift; fi
target=${CARGO_TARGET_DIR:-target}
cargo build -q -p storage-engine -p campaign
bin="$target/debug/tandem-campaign"

if [ $ci = 1 ]; then
  runs=(
    "history --mode async --size 64M --seconds 20"
    "history --mode sync --size 64M --seconds 12"
    "kill --mode async --size 64M --kills 60"
    "partition --mode async --size 64M --rounds 5"
    "partition --mode sync --size 64M --rounds 5"
  )
else
  runs=(
    "history --mode async --size 256M --seconds 300"
    "history --mode sync --size 128M --seconds 180"
    "kill --mode async --size 128M --kills 500"
    "kill --mode sync --size 128M --kills 100"
    "partition --mode async --size 128M --rounds 40"
    "partition --mode sync --size 128M --rounds 40"
  )
fi

log=$(mktemp)
trap 'rm -f "$log"' EXIT
failed=0
summaries=()
for r in "${runs[@]}"; do
  echo "=== tandem-campaign $r $*"
  # shellcheck disable=SC2086
  if ! "$bin" $r "$@" | tee "$log"; then failed=1; fi
  s=$(grep '^SUMMARY ' "$log" | tail -1 || true)
  [ -n "$s" ] || { s="SUMMARY campaign=${r%% *} result=FAIL"; failed=1; }
  summaries+=("$s")
done

field() { tr ' ' '\n' <<<"$1" | sed -n "s/^$2=//p"; }
echo
echo "commit $(git rev-parse --short HEAD), $(date -u +%Y-%m-%d), $(nproc) cores"
echo
echo "| campaign | mode | runs | kills | takeovers / failbacks | partitions / pauses | histories checked | ops | reads checked | violations | liveness | seconds | result |"
echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
for s in "${summaries[@]}"; do
  res=$(field "$s" result)
  checked=0; [ -n "$(field "$s" reads_checked)" ] && checked=1
  echo "| $(field "$s" campaign) | $(field "$s" mode) | 1 | $(field "$s" kills) | $(field "$s" takeovers) / $(field "$s" failbacks) | $(field "$s" partitions) / $(field "$s" pauses) | $checked | $(field "$s" ops) | $(field "$s" reads_checked) | $(field "$s" violations) | $(field "$s" liveness) | $(field "$s" seconds) | $res |"
done
parts=()
for s in "${summaries[@]}"; do
  if [ "$(field "$s" campaign)" = partition ]; then parts+=("$s"); fi
done
if [ ${#parts[@]} -gt 0 ]; then
  echo
  echo "| partition | rounds | blackhole / one-way / SIGSTOP / reboot / forced | detections (max ms / bound) | resumes (max ms) | sync degraded reported | wait takeovers blocked | forced refused (torn replica) | lost blocks reported | reported losses | violations | result |"
  echo "|---|---|---|---|---|---|---|---|---|---|---|---|"
  for s in "${parts[@]}"; do
    f() { field "$s" "$1"; }
    echo "| $(f mode) | $(f rounds) | $(f blackholes) / $(f oneway) / $(f pauses) / $(f reboots) / $(f forced) | $(f detections) ($(f detect_max_ms) / $(f bound_ms)) | $(f resumes) ($(f resume_max_ms)) | $(f degraded_seen) | $(f wait_blocked) | $(f force_refused_torn) | $(f lost_blocks_reported) | $(f reported_losses) | $(f violations) | $(f result) |"
  done
fi
exit $failed
