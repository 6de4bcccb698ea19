#!/usr/bin/env bash
# Local demo, no cluster and no root: a primary and a secondary engine on loopback, a real NBD
# client (qemu-io) writing to the primary, replication lag, a killed secondary, a resync of only
# the dirty blocks, and byte-identical replicas at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v qemu-io >/dev/null || { echo "demo needs qemu-io (apt-get install qemu-utils)"; exit 1; }
cargo build --release -q -p storage-engine
E=$PWD/target/release/tandem-engine
W=$(mktemp -d /tmp/tandem-demo.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$W"' EXIT
echo demo-token > "$W/token"
st() { "$E" status --grpc "$1" --volume demo --token-file "$W/token" --json |
  python3 -c 'import json,sys; s=json.load(sys.stdin); print("  %-9s %-12s pending=%-6s applied_seq=%-5s replicated=%-9s resynced=%s" % (s["role"], s["pair_state"], s["pending_blocks"], s["applied_seq"], s["bytes_replicated"], s["bytes_resynced"]))'; }
secondary() { "$E" serve --volume demo --data "$W/s.img" --size 256M --state-dir "$W/s" --role secondary \
  --nbd-listen 127.0.0.1:10810 --grpc-listen 127.0.0.1:9511 --peer 127.0.0.1:9510 \
  --token-file "$W/token" 2>>"$W/s.log" & SPID=$!; }
secondary
"$E" serve --volume demo --data "$W/p.img" --size 256M --state-dir "$W/p" --peer 127.0.0.1:9511 \
  --nbd-listen 127.0.0.1:10809 --grpc-listen 127.0.0.1:9510 --token-file "$W/token" --fault-injection \
  2>>"$W/p.log" &
sleep 1
echo "1. write 32 MiB through NBD with the link throttled to 8 MiB/s: the host is not slowed"
"$E" fault --grpc 127.0.0.1:9510 --volume demo --token-file "$W/token" --rate 8M >/dev/null
time qemu-io -f raw -c 'write -P 0xab 0 32M' nbd://127.0.0.1:10809/demo >/dev/null
st 127.0.0.1:9510
echo "2. unthrottle; the secondary catches up in write order"
"$E" fault --grpc 127.0.0.1:9510 --volume demo --token-file "$W/token" --rate 0 >/dev/null
until "$E" status --grpc 127.0.0.1:9510 --volume demo --token-file "$W/token" --json | grep -q '"pair_state":"Synced"'; do sleep 0.2; done
st 127.0.0.1:9510; st 127.0.0.1:9511
echo "3. SIGKILL the secondary, write 1 MiB in 256 scattered blocks, restart it"
kill -9 $SPID; wait $SPID 2>/dev/null || true
cmds=(); for i in $(seq 0 255); do cmds+=(-c "write -P $((i % 200 + 1)) $((i * 61 * 4096)) 4096"); done
qemu-io -f raw "${cmds[@]}" nbd://127.0.0.1:10809/demo >/dev/null
st 127.0.0.1:9510
secondary
until "$E" status --grpc 127.0.0.1:9510 --volume demo --token-file "$W/token" --json | grep -q '"pair_state":"Synced"'; do sleep 0.2; done
st 127.0.0.1:9510
echo "4. the replicas are byte-identical"
cmp "$W/p.img" "$W/s.img" && sha256sum "$W/p.img" "$W/s.img" | sed "s|$W/||"
echo "5. the secondary refuses host I/O:"
nbdinfo nbd://127.0.0.1:10810/demo 2>&1 | grep -i error || qemu-io -f raw -c 'read 0 4k' nbd://127.0.0.1:10810/demo 2>&1 | tail -1
