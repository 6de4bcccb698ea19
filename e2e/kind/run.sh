#!/usr/bin/env bash
# Tandem kind suite: a real cluster, real images, real failures. Needs docker, kind and kubectl (helm comes
# from the same cache as scripts/check-chart.sh, or $HELM). Not part of scripts/test.sh: CI machines have
# no Docker engine. Run from anywhere:  e2e/kind/run.sh      (KEEP=1 keeps the cluster afterwards)
#
# Scenarios, each timed and checked:
#   1. install: images built and loaded, chart installed, operator and CSI plugin ready;
#   2. create:  a MirroredVolume reaches Synced; a writer fills a blob and keeps appending a counter;
#   3. engine loss: the primary engine pod is force-deleted -> the operator takes over on the secondary
#      (epoch +1), the old slot rejoins as secondary, the pair is Synced again, the writer never restarts;
#   4. node loss: the node running the writer (and the primary) is stopped -> takeover, the stuck writer
#      pod is released, its replacement starts on the other node and verifies the blob and the counter;
#   5. return: the node is started again; its engine rejoins as secondary and the pair resyncs.
# Timings go to $OUT (default e2e/kind/results.json).
set -euo pipefail
cd "$(dirname "$0")/../.."

CLUSTER=${CLUSTER:-tandem}
NS=tandem-system
TAG=${TAG:-e2e}
OUT=${OUT:-e2e/kind/results.json}
TOOLS=${TANDEM_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/tandem-tools}
HELM=${HELM:-$TOOLS/helm/helm}
KUBECTL=${KUBECTL:-kubectl}
ctx="kind-$CLUSTER"
k() { "$KUBECTL" --context "$ctx" "$@"; }

for tool in docker kind "$KUBECTL"; do
  command -v "$tool" >/dev/null || { echo "e2e: $tool is required" >&2; exit 2; }
done
if [ ! -x "$HELM" ]; then
  echo "e2e: helm not found at $HELM; run scripts/check-chart.sh once (it caches helm) or set HELM" >&2
  exit 2
fi

declare -A timing
now_ms() { date +%s%3N; }
log() { printf '%s e2e: %s\n' "$(date +%T)" "$*"; }
fail() { log "FAIL: $*"; k get mv,pods -A -o wide || true; k -n "$NS" logs deploy/tandem-operator --tail=200 || true; exit 1; }
# wait_for DESCRIPTION TIMEOUT_S COMMAND...: polls every 250 ms.
wait_for() {
  local what=$1 timeout=$2; shift 2
  local deadline=$(( $(date +%s) + timeout ))
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$deadline" ] || fail "timed out after ${timeout}s waiting for $what"
    sleep 0.25
  done
}
mv_field() { k get mv e2e -o "jsonpath={$1}"; }
phase_is() { [ "$(mv_field .status.phase)" = "$1" ]; }
epoch_above() { [ "$(mv_field .status.epoch)" -gt "$1" ]; }
writer_pod() { k get pods -l app=e2e-writer --field-selector=status.phase=Running -o jsonpath='{.items[0].metadata.name}'; }
writer_node() { k get pods -l app=e2e-writer --field-selector=status.phase=Running -o jsonpath='{.items[0].spec.nodeName}'; }
writer_ready_on_other_than() {
  local n; n=$(writer_node) && [ -n "$n" ] && [ "$n" != "$1" ]
}
cleanup() {
  if [ "${KEEP:-0}" != 1 ]; then kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT

# 1. install -------------------------------------------------------------------------------------------
t=$(now_ms)
kind get clusters | grep -qx "$CLUSTER" || kind create cluster --config e2e/kind/cluster.yaml --name "$CLUSTER" --wait 120s
for target in engine csi operator; do
  docker build -q -f docker/Dockerfile --target "$target" -t "tandem-$target:$TAG" . >/dev/null
  kind load docker-image --name "$CLUSTER" "tandem-$target:$TAG" >/dev/null
done
"$HELM" --kube-context "$ctx" upgrade --install tandem charts/tandem --namespace "$NS" --create-namespace \
  --set image.tag="$TAG" --set image.pullPolicy=Never --set operator.logLevel=debug --wait --timeout 5m
k -n "$NS" rollout status deploy/tandem-operator --timeout=120s
k -n "$NS" rollout status ds/tandem-csi-node --timeout=120s
timing[install_ms]=$(( $(now_ms) - t ))
log "installed in ${timing[install_ms]} ms"

# 2. create ---------------------------------------------------------------------------------------------
t=$(now_ms)
k apply -f e2e/kind/workload.yaml
wait_for "volume Synced" 300 phase_is Synced
timing[create_to_synced_ms]=$(( $(now_ms) - t ))
wait_for "writer running" 300 writer_pod
wait_for "blob written" 120 bash -c "'$KUBECTL' --context '$ctx' logs deploy/e2e-writer | grep -q 'WROTE blob'"
timing[create_to_writer_ms]=$(( $(now_ms) - t ))
log "volume Synced after ${timing[create_to_synced_ms]} ms; writer up after ${timing[create_to_writer_ms]} ms"

# 3. engine loss ----------------------------------------------------------------------------------------
primary_pod=$(mv_field .status.primary.pod)
epoch=$(mv_field .status.epoch)
writer_before=$(writer_pod)
t=$(now_ms)
k delete pod "$primary_pod" --grace-period=0 --force --wait=false
wait_for "takeover (epoch > $epoch)" 120 epoch_above "$epoch"
timing[engine_loss_to_takeover_ms]=$(( $(now_ms) - t ))
wait_for "pair Synced again" 300 phase_is Synced
timing[engine_loss_to_synced_ms]=$(( $(now_ms) - t ))
[ "$(writer_pod)" = "$writer_before" ] || fail "the writer restarted on an engine loss"
[ "$(mv_field .status.secondary.pod)" = "$primary_pod" ] || fail "the lost engine did not rejoin as secondary"
log "engine loss: takeover after ${timing[engine_loss_to_takeover_ms]} ms, Synced after ${timing[engine_loss_to_synced_ms]} ms"

# 4. node loss ------------------------------------------------------------------------------------------
# Put the primary where the writer runs, then stop that node.
node=$(writer_node)
epoch=$(mv_field .status.epoch)
if [ "$(mv_field .status.primary.node)" != "$node" ]; then
  log "primary is on $(mv_field .status.primary.node), writer on $node: stopping the primary's node instead"
  node=$(mv_field .status.primary.node)
fi
t=$(now_ms)
docker stop "$node" >/dev/null
wait_for "takeover after node loss" 300 epoch_above "$epoch"
timing[node_loss_to_takeover_ms]=$(( $(now_ms) - t ))
wait_for "writer replacement on another node" 300 writer_ready_on_other_than "$node"
timing[node_loss_to_writer_ms]=$(( $(now_ms) - t ))
wait_for "replacement verified" 120 bash -c "'$KUBECTL' --context '$ctx' logs deploy/e2e-writer | grep -q 'VERIFY OK blob'"
k logs deploy/e2e-writer | grep -q 'VERIFY FAIL' && fail "data check failed after node loss"
log "node loss: takeover after ${timing[node_loss_to_takeover_ms]} ms, writer back after ${timing[node_loss_to_writer_ms]} ms; $(k logs deploy/e2e-writer | grep VERIFY | tr '\n' ' ')"

# 5. return ---------------------------------------------------------------------------------------------
t=$(now_ms)
docker start "$node" >/dev/null
wait_for "returned engine resynced" 600 phase_is Synced
timing[node_return_to_synced_ms]=$(( $(now_ms) - t ))
log "node return: Synced after ${timing[node_return_to_synced_ms]} ms"

{
  printf '{\n  "date": "%s",\n  "kind_node_image": "%s"' "$(date -u +%FT%TZ)" "$(docker inspect -f '{{.Config.Image}}' "$CLUSTER-control-plane")"
  for key in "${!timing[@]}"; do printf ',\n  "%s": %s' "$key" "${timing[$key]}"; done
  printf '\n}\n'
} >"$OUT"
log "all scenarios passed; timings in $OUT"
k get mv e2e -o wide
