#!/usr/bin/env bash
# The MSRV (`rust-version` in Cargo.toml) is at least what every locked dependency declares.
# Fails, naming them, when a dependency (normal, build or dev, any platform in Cargo.lock) needs a newer
# Rust than the workspace promises; and when a member does not inherit the workspace's rust-version.
# Code in the workspace that uses a newer std API is caught by clippy's incompatible_msrv lint, which
# reads the same rust-version.
set -euo pipefail
cd "$(dirname "$0")/.."
META=$(mktemp)
trap 'rm -f "$META"' EXIT
cargo metadata --format-version 1 --locked >"$META"
python3 - "$META" <<'PY'
import json, sys

def version(text):
    parts = [int(p) for p in text.split(".")]
    return tuple(parts + [0] * (3 - len(parts)))

def too_new(packages, msrv):
    return sorted(
        (p["name"], p["version"], p["rust_version"])
        for p in packages
        if p.get("rust_version") and version(p["rust_version"]) > msrv
    )

# The check can fail: a dependency that needs more than the MSRV is named.
fake = [{"name": "a", "version": "1.0.0", "rust_version": "1.90"}, {"name": "b", "version": "1.0.0", "rust_version": None}]
assert too_new(fake, version("1.89")) == [("a", "1.0.0", "1.90")] and not too_new(fake, version("1.90.0"))

meta = json.load(open(sys.argv[1]))
members = set(meta["workspace_members"])
ours = [p for p in meta["packages"] if p["id"] in members]
declared = {p["rust_version"] for p in ours}
if len(declared) != 1 or None in declared:
    sys.exit("check-msrv: every workspace member must set rust-version.workspace = true; found " + repr(sorted(map(str, declared))))
msrv_text = declared.pop()
deps = [p for p in meta["packages"] if p["id"] not in members]
bad = too_new(deps, version(msrv_text))
if bad:
    for name, ver, rv in bad:
        print(f"check-msrv: {name} {ver} needs Rust {rv}", file=sys.stderr)
    sys.exit(f"check-msrv: raise rust-version in Cargo.toml above {msrv_text} (or pin older dependencies)")
needed = max(version(p["rust_version"]) for p in deps if p.get("rust_version"))
print(f"check-msrv: ok, rust-version {msrv_text}; the locked dependencies need at most {'.'.join(map(str, needed))}")
PY
