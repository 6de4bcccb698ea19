#!/usr/bin/env bash
# The project's test command: installs missing tools, then runs every test that this machine can run.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/check-msrv.sh
# Every binary and test once, by the same command that runs them: the tests, the chart checks and the
# campaigns use these binaries. A package set built on its own (`cargo build -p storage-engine` inside
# a test, the chart check's `-p operator -p csi-node`), or `cargo build --all-targets`, resolves some
# dependencies differently and recompiles much of the workspace, minutes on two cores.
cargo test --workspace --locked --no-run
target_dir=$(cargo metadata -q --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
export TANDEM_ENGINE_BIN="$target_dir/debug/tandem-engine" TANDEM_CSI_BIN="$target_dir/debug/tandem-csi"
export TANDEM_PREBUILT=1
cargo test --workspace --locked
# --- further suites (chart checks, CRD drift, e2e) go below this line ---
scripts/check-chart.sh
# The safety campaigns at small size (docs/reliability.md): history and kills against real engine
# pairs, power cuts and failpoints at every file operation of a takeover, fuzzing.
scripts/campaign.sh --ci
# An async pair whose journal overflows under writes must end byte-identical (docs/reliability.md
# "Found and fixed: an async pair diverged..."; engines before the fix failed within three rounds).
ITER=3 TANDEM_ENGINE="$TANDEM_ENGINE_BIN" scripts/hunt-divergence.sh
# Every bench script at a tiny size (issue 17): they keep working; their numbers gate nothing.
scripts/bench-smoke.sh
