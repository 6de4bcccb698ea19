#!/usr/bin/env bash
# The project's test command: installs missing tools, then runs every test that this machine can run.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/check-msrv.sh
cargo test --workspace --locked
# --- further suites (chart checks, CRD drift, e2e) go below this line ---
scripts/check-chart.sh
# The safety campaigns at small size (docs/reliability.md): history and kills against real engine
# pairs, power cuts and failpoints at every file operation of a takeover, fuzzing.
scripts/campaign.sh --ci
# Every bench script at a tiny size (issue 17): they keep working; their numbers gate nothing.
scripts/bench-smoke.sh
