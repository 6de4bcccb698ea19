#!/usr/bin/env bash
# The project's test command: installs missing tools, then runs every test that this machine can run.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo test --workspace --locked
# --- further suites (chart checks, CRD drift, e2e) go below this line ---
scripts/check-chart.sh
