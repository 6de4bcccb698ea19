#!/usr/bin/env bash
# The main job, locally, no cluster and no root: `tandem-engine demo` runs a primary and a secondary
# on loopback, builds a backlog behind a throttled link, takes over on the secondary (ready at once),
# reads every byte back through it (the unsent ones by proxied reads), shows the drain, the merge and
# the reverse replication, fails back, and prints a timeline. Extra arguments go to `demo`
# (see `tandem-engine demo --help`: --size, --backlog, --rate, --dir).
set -euo pipefail
cd "$(dirname "$0")/.."
# cargo run, not target/release/...: the binary is wherever CARGO_TARGET_DIR puts it.
exec cargo run --release -q -p storage-engine --bin tandem-engine -- demo "$@"
