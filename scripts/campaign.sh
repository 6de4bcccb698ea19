#!/usr/bin/env bash
# Safety campaigns against a real tandem-engine pair (campaign/, binary tandem-campaign):
#   history  pipelined NBD clients (QD 32) under takeovers, failbacks, SIGKILLs, SIGSTOPs, link
#            faults and throttled streams; the recorded history is checked per 512-byte sector, a
#            final full read must hold every acknowledged write, and both replicas must be
#            byte-identical at every settle and at the end (one run: 4 KiB ops and a throttled
#            stream, so the journal overflows while the table is resynced under writes);
#   kill     the same clients and checks under random-time SIGKILLs of either engine;
#   partition  each engine in its own network namespace (needs root; result=SKIPPED otherwise):
#            blackholes, one-way drops, SIGSTOPs, node reboots and forced takeovers (after a node
#            reboot, or a blackhole with both engines up), write leases renewed by a witness;
#            dead-peer detection within --peer-timeout-ms + 1 s, replication resuming by itself,
#            sync mode reporting its degradation, no acknowledgement by a fenced old primary after
#            its lease, the same history checks;
#   powerloss, failpoints  in-process: the power cut (then EIO, ENOSPC, a short write) at every file
#            operation of a takeover and of a receiving secondary, restart, every FLUSHed or
#            acknowledged write checked (storage-engine/src/takeover/powerloss.rs);
#   fuzz     the NBD server, the on-disk decoders, the replication apply path (storage-engine/tests/fuzz.rs).
# Usage: scripts/campaign.sh          full size (several minutes of history, 500 kills, 40 partitions
#                                     per replication mode, 40 power-loss scenarios)
#        scripts/campaign.sh --ci     small sizes for CI (< 3 minutes; cargo test runs the in-process ones)
# Extra arguments (e.g. --seed N) go to every run. Prints a markdown summary table for
# docs/reliability.md; exits non-zero if any run found a violation or a liveness problem.
set -euo pipefail
cd "$(dirname "$0")/.."
ci=0
if [ "${1:-}" = "--ci" ]; then ci=1; shift; fi
target=${CARGO_TARGET_DIR:-target}
# TANDEM_PREBUILT=1 (scripts/test.sh): the workspace's binaries are built already, with its features.
[ -n "${TANDEM_PREBUILT:-}" ] || cargo build -q -p storage-engine -p campaign
bin="$target/debug/tandem-campaign"

if [ $ci = 1 ]; then
  runs=(
    "history --mode async --size 64M --seconds 20"
    "history --mode sync --size 64M --seconds 12"
    "history --mode async --size 256M --seconds 20 --max-op 4K --hot 0 --nemesis throttle,settle"
    "kill --mode async --size 64M --kills 60"
    "partition --mode async --size 64M --rounds 5"
    "partition --mode sync --size 64M --rounds 5"
  )
else
  runs=(
    "history --mode async --size 256M --seconds 300"
    "history --mode sync --size 128M --seconds 180"
    "history --mode async --size 256M --seconds 120 --max-op 4K --hot 0 --nemesis throttle,settle"
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

# In-process campaigns of the engine's own files (storage-engine/src/takeover/powerloss.rs): the
# power cut at every file operation of a takeover, then EIO / ENOSPC / a short write at each.
if [ $ci = 1 ]; then pl_seeds=3; fp_seeds=1; fuzz=64; else pl_seeds=40; fp_seeds=12; fuzz=5000; fi
inproc=()
run_inproc() { # name, env assignment, test filter, line prefix
  echo "=== $1 ($2)"
  local out start end
  start=$(date +%s)
  if ! out=$(env "$2" cargo test -q -p storage-engine --lib "$3" -- --nocapture --exact 2>&1); then failed=1; fi
  end=$(date +%s)
  grep -E "^$4" <<<"$out" || { echo "$out" | tail -20; failed=1; }
  local line; line=$(grep -E "^$4: [0-9]+ scenarios" <<<"$out" | tail -1)
  inproc+=("| $1 | in-process | $(sed -E 's/.* ([0-9]+) scenarios.*/\1/' <<<"$line") | $(sed -E 's/.*, ([0-9]+) (crash points|injected faults).*/\1/' <<<"$line") | $(sed -E 's/.*, ([0-9]+) violations.*/\1/' <<<"$line") | $((end - start)) |")
}
fuzz_res="not run (cargo test ran it at this size)"; fuzz_secs=0
# At CI size `cargo test --workspace` has just run these with the same sizes.
if [ $ci = 0 ]; then
  run_inproc powerloss "TANDEM_POWERLOSS_SEEDS=$pl_seeds" takeover::powerloss::powerloss_campaign powerloss
  run_inproc powerloss-rx "TANDEM_POWERLOSS_SEEDS=$pl_seeds" takeover::powerloss::powerloss_campaign_on_the_receiving_side powerloss-rx
  run_inproc failpoints "TANDEM_FAILPOINT_SEEDS=$fp_seeds" takeover::powerloss::failpoint_campaign failpoints
  echo "=== fuzz (TANDEM_FUZZ_CASES=$fuzz)"
  start=$(date +%s)
  if TANDEM_FUZZ_CASES=$fuzz cargo test -q -p storage-engine --test fuzz 2>&1 | tail -3; then
    fuzz_res=pass
  else
    fuzz_res=FAIL; failed=1
  fi
  fuzz_secs=$(( $(date +%s) - start ))
fi

field() { tr ' ' '\n' <<<"$1" | sed -n "s/^$2=//p"; }
dash() { local v; v=$(field "$1" "$2"); echo "${v:--}"; } # a field the partition campaign lacks
echo
echo "commit $(git rev-parse --short HEAD), $(date -u +%Y-%m-%d), $(nproc) cores"
echo
echo "| campaign | mode | runs | kills | takeovers / failbacks | partitions / pauses | throttles / settles identical (diverged) | histories checked | ops | reads checked | violations | liveness | seconds | result |"
echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
for s in "${summaries[@]}"; do
  res=$(field "$s" result)
  checked=0; [ -n "$(field "$s" reads_checked)" ] && checked=1
  echo "| $(field "$s" campaign) | $(field "$s" mode) | 1 | $(field "$s" kills) | $(field "$s" takeovers) / $(field "$s" failbacks) | $(field "$s" partitions) / $(field "$s" pauses) | $(dash "$s" throttles) / $(dash "$s" compared) ($(dash "$s" diverged)) | $checked | $(field "$s" ops) | $(field "$s" reads_checked) | $(field "$s" violations) | $(field "$s" liveness) | $(field "$s" seconds) | $res |"
done
parts=()
for s in "${summaries[@]}"; do
  if [ "$(field "$s" campaign)" = partition ]; then parts+=("$s"); fi
done
if [ ${#parts[@]} -gt 0 ]; then
  echo
  echo "| partition | rounds | blackhole / one-way / blackhole + forced / SIGSTOP / reboot / reboot + forced | detections (max ms / bound) | resumes (max ms) | sync degraded reported | wait takeovers blocked | forced promotions (LeaseHeld retries) | forced refused (torn replica) | lease ms / witness grants | lost blocks reported | reported losses (blocks) | fenced acks after cut (last ms after cut / max margin to lease end ms) | acks after lease | violations | result |"
  echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
  for s in "${parts[@]}"; do
    f() { field "$s" "$1"; }
    echo "| $(f mode) | $(f rounds) | $(f blackholes) / $(f oneway) / $(f blackhole_forced) / $(f pauses) / $(f reboots) / $(f forced) | $(f detections) ($(f detect_max_ms) / $(f bound_ms)) | $(f resumes) ($(f resume_max_ms)) | $(f degraded_seen) | $(f wait_blocked) | $(f takeovers) ($(f lease_held_retries)) | $(f force_refused_torn) | $(f lease_ms) / $(f witness_grants) | $(f lost_blocks_reported) | $(f reported_losses) ($(f reported_loss_blocks)) | $(f fenced_acks) ($(f ack_after_cut_max_ms) / $(f lease_margin_max_ms)) | $(f late_acks) | $(f violations) | $(f result) |"
  done
fi
if [ ${#inproc[@]} -gt 0 ]; then
  echo
  echo "| campaign | kind | scenarios | crash points / faults | violations | seconds |"
  echo "|---|---|---|---|---|---|"
  for r in "${inproc[@]}"; do echo "$r"; done
fi
echo
echo "fuzz: TANDEM_FUZZ_CASES=$fuzz, $fuzz_res, ${fuzz_secs} s"
exit $failed
