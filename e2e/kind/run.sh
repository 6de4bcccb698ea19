#!/usr/bin/env bash
# Tandem kind suite: a real cluster, real images, real failures. Needs docker, kind and kubectl (helm comes
# from the same cache as scripts/check-chart.sh, or $HELM). Not part of scripts/test.sh: CI machines have
# no Docker engine. Run from anywhere:  e2e/kind/run.sh      (KEEP=1 keeps the cluster afterwards)
#
# One disruption per scenario, each with its policy, its check and its timing bar (issue 12):
#   install, create     chart installed; a Sync MirroredVolume (WaitForPrimary, lease 10 s) reaches Synced and
#                       a writer appends an fsync'd counter, logging every ACK and every IOERR;
#   provision           a StatefulSet claims a volume from the StorageClass `tandem`: the CSI controller
#                       provisions a MirroredVolume named after the PV; the writer's blob survives its
#                       primary engine pod's deletion and the writer pod's restart; the claim grows
#                       online to 512Mi; deleting the claim deletes the MirroredVolume;
#   engine-crash        the primary engine process is SIGKILLed: no takeover, the writer sees no error;
#   engine-pod-deleted  the primary engine pod is deleted: the operator recreates it within the restart grace,
#                       no takeover, the writer sees no error;
#   plugin-restart      the CSI plugin pod on the writer's node is deleted: the writer sees no error;
#   pod-moved           the writer is moved to the secondary's node: its stage takes over; bar: the replacement's
#                       first acknowledged I/O <= 5 s after it was scheduled; the blob verifies;
#   drain               `kubectl drain` of the primary's node: planned switchover gated on the drain; bar: no
#                       IOERR at all; after uncordon the pair is Synced again;
#   node-loss           the primary's node (with the writer) is stopped (Sync): bar: the replacement writer
#                       runs <= lease + 30 s after the stop; the blob and the counter verify; the node returns
#                       and resyncs;
#   partition           the primary's node is disconnected from the network: the old writer's last ACK comes
#                       no later than the cut + lease (+2 s for the one-second timestamps); the replacement
#                       verifies; the node reconnects and resyncs;
#   operator-down       the operator is scaled to 0, the primary's node is stopped, the operator comes back:
#                       it promotes only after a lease from its own start and the replacement verifies.
# Node names come from the cluster (nodes labelled tandem.dev/storage=true). Results go to $OUT (default
# e2e/kind/results.json): each scenario's timings and verdict.
set -euo pipefail
cd "$(dirname "$0")/../.."

CLUSTER=${CLUSTER:-tandem}
NS=tandem-system
TAG=${TAG:-e2e}
OUT=${OUT:-e2e/kind/results.json}
TOOLS=${TANDEM_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/tandem-tools}
HELM=${HELM:-$TOOLS/helm/helm}
KUBECTL=${KUBECTL:-kubectl}
LEASE_S=10
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
declare -A verdict
now_ms() { date +%s%3N; }
log() { printf '%s e2e: %s\n' "$(date +%T)" "$*"; }
write_results() {
  {
    printf '{\n  "date": "%s",\n  "kind_node_image": "%s"' "$(date -u +%FT%TZ)" \
      "$(docker inspect -f '{{.Config.Image}}' "$CLUSTER-control-plane" 2>/dev/null || echo unknown)"
    for key in "${!timing[@]}"; do printf ',\n  "%s": %s' "$key" "${timing[$key]}"; done
    printf ',\n  "scenarios": {'
    local sep=""
    for key in "${!verdict[@]}"; do printf '%s\n    "%s": "%s"' "$sep" "$key" "${verdict[$key]}"; sep=","; done
    printf '\n  }\n}\n'
  } >"$OUT"
}
scenario=setup
fail() {
  log "FAIL ($scenario): $*"
  verdict[$scenario]="FAIL: $*"
  write_results
  k get mv,pods,pdb -A -o wide || true
  k -n "$NS" logs deploy/tandem-operator --tail=200 || true
  exit 1
}
pass() { verdict[$scenario]=pass; log "$scenario: pass"; }
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
writer_logged() { k logs "$1" 2>/dev/null | grep -q "$2"; }
# The writer's IOERR lines since unix second $2, in pod $1 (empty when none).
ioerrs_since() { k logs "$1" 2>/dev/null | awk -v t="$2" '$1 == "IOERR" && $2 >= t' || true; }
# A writer that keeps acknowledging: its last ACK counter grows within 10 s.
writer_progresses() {
  local pod=$1 before after
  before=$(k logs "$pod" | awk '$1 == "ACK" {n=$3} END {print n+0}')
  sleep 10
  after=$(k logs "$pod" | awk '$1 == "ACK" {n=$3} END {print n+0}')
  [ "$after" -gt "$before" ]
}
other_node() { if [ "$1" = "$NODE1" ]; then echo "$NODE2"; else echo "$NODE1"; fi; }
pin_writer() {
  # Required node affinity on the named nodes (a rollout: Recreate stops the old pod first).
  local nodes=$1
  k patch deploy e2e-writer --type json -p "[{\"op\":\"replace\",\"path\":\"/spec/template/spec/affinity/nodeAffinity/requiredDuringSchedulingIgnoredDuringExecution/nodeSelectorTerms/0/matchFields/0/values\",\"value\":[$nodes]}]" >/dev/null
}
verify_ok() {
  local pod=$1
  wait_for "writer $pod verified" 120 writer_logged "$pod" "FIRST_IO"
  k logs "$pod" | grep -q 'VERIFY FAIL' && fail "data check failed in $pod: $(k logs "$pod" | grep VERIFY | tr '\n' ' ')"
  return 0
}
cleanup() {
  if [ "${KEEP:-0}" != 1 ]; then kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT

# install ------------------------------------------------------------------------------------------------
scenario=install
t=$(now_ms)
kind get clusters | grep -qx "$CLUSTER" || kind create cluster --config e2e/kind/cluster.yaml --name "$CLUSTER" --wait 120s
read -r NODE1 NODE2 < <(k get nodes -l tandem.dev/storage=true -o jsonpath='{.items[*].metadata.name}')
[ -n "${NODE1:-}" ] && [ -n "${NODE2:-}" ] || fail "need two nodes labelled tandem.dev/storage=true"
log "storage nodes: $NODE1 $NODE2"
for target in engine csi operator; do
  docker build -q -f docker/Dockerfile --target "$target" -t "tandem-$target:$TAG" . >/dev/null
  kind load docker-image --name "$CLUSTER" "tandem-$target:$TAG" >/dev/null
done
"$HELM" --kube-context "$ctx" upgrade --install tandem charts/tandem --namespace "$NS" --create-namespace \
  --set image.tag="$TAG" --set image.pullPolicy=Never --set operator.logLevel=debug \
  --set-string storageClass.parameters.nodeSelector=tandem.dev/storage=true --wait --timeout 5m
k -n "$NS" rollout status deploy/tandem-operator --timeout=120s
k -n "$NS" rollout status deploy/tandem-csi-controller --timeout=120s
k -n "$NS" rollout status ds/tandem-csi-node --timeout=120s
timing[install_ms]=$(( $(now_ms) - t ))
pass

# create -------------------------------------------------------------------------------------------------
scenario=create
t=$(now_ms)
sed -e "s/__NODE1__/$NODE1/g" -e "s/__NODE2__/$NODE2/g" e2e/kind/workload.yaml | k apply -f -
wait_for "volume Synced" 300 phase_is Synced
timing[create_to_synced_ms]=$(( $(now_ms) - t ))
wait_for "writer running" 300 writer_pod
wait_for "blob written" 180 writer_logged "$(writer_pod)" FIRST_IO
timing[create_to_writer_ms]=$(( $(now_ms) - t ))
k get pdb -A | grep -q e2e || fail "no PodDisruptionBudget for the volume's engines"
pass

# provision: a claim from the StorageClass becomes a MirroredVolume; its data survives an engine pod and a
# workload restart; it grows online; deleting the claim deletes the volume -------------------------------
scenario=provision
pmv() { k get mv "$PROV_PV" -o "jsonpath={$1}"; }
prov_phase_is() { [ "$(pmv .status.phase)" = "$1" ]; }
pvc_bound() { [ "$(k get pvc data-prov-0 -o jsonpath='{.status.phase}')" = Bound ]; }
pvc_capacity_is() { [ "$(k get pvc data-prov-0 -o jsonpath='{.status.capacity.storage}')" = "$1" ]; }
prov_running() { [ "$(k get pod prov-0 -o jsonpath='{.status.phase}')" = Running ]; }
mv_gone() { ! k get mv "$PROV_PV" >/dev/null 2>&1; }
t=$(now_ms)
k apply -f e2e/kind/provisioned.yaml
wait_for "claim data-prov-0 bound" 300 pvc_bound
timing[provision_to_bound_ms]=$(( $(now_ms) - t ))
PROV_PV=$(k get pvc data-prov-0 -o jsonpath='{.spec.volumeName}')
k get mv "$PROV_PV" >/dev/null || fail "no MirroredVolume default/$PROV_PV for the provisioned PV"
[ "$(pmv .spec.persistentVolumeName)" = "$PROV_PV" ] || fail "MirroredVolume $PROV_PV does not name its PV"
[ "$(k get pv "$PROV_PV" -o jsonpath='{.spec.csi.volumeHandle}')" = "default/$PROV_PV" ] || fail "the PV's handle is not default/$PROV_PV"
wait_for "provisioned volume Synced" 300 prov_phase_is Synced
wait_for "provisioned writer verified" 300 writer_logged prov-0 FIRST_IO
timing[provision_to_writer_ms]=$(( $(now_ms) - t ))
# Its primary engine pod goes away and comes back; then the workload restarts and reads its blob back.
t=$(now_ms)
k -n "$NS" delete pod "$(pmv .status.primary.pod)" --wait=false
wait_for "provisioned pair Synced after its engine pod came back" 300 prov_phase_is Synced
k delete pod prov-0 --wait=true
wait_for "prov-0 running again" 300 prov_running
verify_ok prov-0
k logs prov-0 | grep -q 'VERIFY OK blob' || fail "the provisioned volume lost its blob: $(k logs prov-0 | grep VERIFY | tr '\n' ' ')"
timing[provision_restart_to_verified_ms]=$(( $(now_ms) - t ))
# Online expansion: the claim grows while the writer writes.
t=$(now_ms); since=$(date +%s)
k patch pvc data-prov-0 -p '{"spec":{"resources":{"requests":{"storage":"512Mi"}}}}'
wait_for "claim grown to 512Mi" 300 pvc_capacity_is 512Mi
timing[provision_expand_ms]=$(( $(now_ms) - t ))
[ -z "$(ioerrs_since prov-0 "$since")" ] || fail "the writer saw errors while growing: $(ioerrs_since prov-0 "$since" | head -3)"
# Deleting the claim (reclaimPolicy Delete) deletes the MirroredVolume; the operator wipes the engines.
t=$(now_ms)
k delete statefulset prov --wait=true
k delete pvc data-prov-0 --wait=false
wait_for "MirroredVolume $PROV_PV deleted with its claim" 300 mv_gone
timing[provision_delete_ms]=$(( $(now_ms) - t ))
pass

# engine-crash: SIGKILL the primary engine process; the kubelet restarts the container in place ---------------
scenario=engine-crash
pnode=$(mv_field .status.primary.node); epoch=$(mv_field .status.epoch); wpod=$(writer_pod); since=$(date +%s)
t=$(now_ms)
docker exec "$pnode" pkill -9 -f 'tandem-engine serve' || fail "no engine process on $pnode"
wait_for "pair Synced after the crash" 180 phase_is Synced
timing[engine_crash_to_synced_ms]=$(( $(now_ms) - t ))
writer_progresses "$wpod" || fail "the writer stopped acknowledging"
[ "$(mv_field .status.epoch)" = "$epoch" ] || fail "an engine crash on a live node made a takeover"
[ -z "$(ioerrs_since "$wpod" "$since")" ] || fail "the writer saw errors: $(ioerrs_since "$wpod" "$since" | head -3)"
[ "$(writer_pod)" = "$wpod" ] || fail "the writer restarted"
pass

# engine-pod-deleted: the operator recreates the pod within the restart grace --------------------------------
scenario=engine-pod-deleted
ppod=$(mv_field .status.primary.pod); epoch=$(mv_field .status.epoch); since=$(date +%s)
t=$(now_ms)
k -n "$NS" delete pod "$ppod" --wait=false  # engine pods live in the operator's namespace
wait_for "pair Synced after the pod came back" 300 phase_is Synced
timing[engine_pod_deleted_to_synced_ms]=$(( $(now_ms) - t ))
writer_progresses "$wpod" || fail "the writer stopped acknowledging"
[ "$(mv_field .status.epoch)" = "$epoch" ] || fail "a deleted engine pod on a live node made a takeover"
[ -z "$(ioerrs_since "$wpod" "$since")" ] || fail "the writer saw errors: $(ioerrs_since "$wpod" "$since" | head -3)"
pass

# plugin-restart: the CSI plugin on the writer's node is restarted ------------------------------------------
scenario=plugin-restart
wnode=$(writer_node); since=$(date +%s)
t=$(now_ms)
k -n "$NS" delete pod -l app.kubernetes.io/name=tandem-csi-node --field-selector "spec.nodeName=$wnode" --wait=true
k -n "$NS" rollout status ds/tandem-csi-node --timeout=120s
timing[plugin_restart_ms]=$(( $(now_ms) - t ))
writer_progresses "$wpod" || fail "the writer stopped acknowledging after the plugin restart"
[ -z "$(ioerrs_since "$wpod" "$since")" ] || fail "the writer saw errors: $(ioerrs_since "$wpod" "$since" | head -3)"
pass

# pod-moved: the writer moves to the secondary's node; its stage takes over -----------------------------------
scenario=pod-moved
snode=$(mv_field .status.secondary.node); epoch=$(mv_field .status.epoch)
pin_writer "\"$snode\""
wait_for "writer on $snode" 180 bash -c "[ \"\$('$KUBECTL' --context '$ctx' get pods -l app=e2e-writer --field-selector=status.phase=Running -o jsonpath='{.items[0].spec.nodeName}')\" = '$snode' ]"
wpod=$(writer_pod)
verify_ok "$wpod"
scheduled=$(k get pod "$wpod" -o jsonpath='{.status.conditions[?(@.type=="PodScheduled")].lastTransitionTime}')
first=$(k logs "$wpod" | awk '$1 == "FIRST_IO" {print $2; exit}')
timing[pod_moved_scheduled_to_first_io_s]=$(( first - $(date -d "$scheduled" +%s) ))
epoch_above "$epoch" || fail "the stage on the secondary's node did not take over"
[ "${timing[pod_moved_scheduled_to_first_io_s]}" -le 5 ] || fail "first I/O ${timing[pod_moved_scheduled_to_first_io_s]} s after scheduling (bar: 5 s)"
pass

# drain: kubectl drain of the primary's node; a planned switchover lets the eviction through ------------------
scenario=drain
pin_writer "\"$NODE1\",\"$NODE2\""
wait_for "writer rolled out" 180 bash -c "'$KUBECTL' --context '$ctx' rollout status deploy/e2e-writer --timeout=5s"
wpod=$(writer_pod); verify_ok "$wpod"
wait_for "pair Synced" 300 phase_is Synced
pnode=$(mv_field .status.primary.node); epoch=$(mv_field .status.epoch); since=$(date +%s)
[ "$(writer_node)" = "$pnode" ] || fail "the writer runs on $(writer_node), the primary on $pnode"
t=$(now_ms)
k drain "$pnode" --ignore-daemonsets --delete-emptydir-data --timeout=300s >/dev/null || fail "kubectl drain failed"
timing[drain_ms]=$(( $(now_ms) - t ))
wait_for "writer on the other node" 180 writer_ready_on_other_than "$pnode"
npod=$(writer_pod); verify_ok "$npod"
epoch_above "$epoch" || fail "no switchover happened"
errs="$(ioerrs_since "$npod" "$since")"
[ -z "$errs" ] || fail "I/O failed during the drain: $(echo "$errs" | head -3)"
k uncordon "$pnode" >/dev/null
t=$(now_ms)
wait_for "pair Synced after uncordon" 300 phase_is Synced
timing[uncordon_to_synced_ms]=$(( $(now_ms) - t ))
pass

# node-loss (Sync): the primary's node stops; the in-sync secondary is promoted after the lease ---------------
scenario=node-loss
pnode=$(mv_field .status.primary.node); epoch=$(mv_field .status.epoch)
[ "$(writer_node)" = "$pnode" ] || fail "the writer runs on $(writer_node), the primary on $pnode"
t=$(now_ms)
docker stop "$pnode" >/dev/null
wait_for "takeover after node loss" 300 epoch_above "$epoch"
timing[node_loss_to_takeover_ms]=$(( $(now_ms) - t ))
wait_for "writer replacement on another node" 300 writer_ready_on_other_than "$pnode"
npod=$(writer_pod); verify_ok "$npod"
timing[node_loss_to_writer_ms]=$(( $(now_ms) - t ))
[ "${timing[node_loss_to_writer_ms]}" -le $(( (LEASE_S + 30) * 1000 )) ] || fail "replacement after ${timing[node_loss_to_writer_ms]} ms (bar: lease + 30 s)"
[ "$(mv_field .status.takeover.lostBlocks)" = "0" ] || [ -z "$(mv_field .status.takeover.lostBlocks)" ] || fail "a Sync node loss lost blocks"
docker start "$pnode" >/dev/null
t=$(now_ms)
wait_for "returned engine resynced" 600 phase_is Synced
timing[node_return_to_synced_ms]=$(( $(now_ms) - t ))
pass

# partition: the primary's node loses its network; the old writer's acks end within the lease ------------------
scenario=partition
wait_for "writer on the primary's node" 10 bash -c "[ \"\$('$KUBECTL' --context '$ctx' get mv e2e -o jsonpath='{.status.primary.node}')\" = \"\$('$KUBECTL' --context '$ctx' get pods -l app=e2e-writer --field-selector=status.phase=Running -o jsonpath='{.items[0].spec.nodeName}')\" ]"
pnode=$(mv_field .status.primary.node); epoch=$(mv_field .status.epoch); old=$(writer_pod)
old_uid=$(k get pod "$old" -o jsonpath='{.metadata.uid}')
ip=$(docker inspect -f '{{.NetworkSettings.Networks.kind.IPAddress}}' "$pnode")
t=$(now_ms); cut=$(date +%s)
docker network disconnect kind "$pnode"
wait_for "takeover after the partition" 300 epoch_above "$epoch"
timing[partition_to_takeover_ms]=$(( $(now_ms) - t ))
wait_for "writer replacement on another node" 300 writer_ready_on_other_than "$pnode"
npod=$(writer_pod); verify_ok "$npod"
timing[partition_to_writer_ms]=$(( $(now_ms) - t ))
last_ack=$(docker exec "$pnode" sh -c "cat /var/log/pods/default_${old}_${old_uid}/writer/*.log" | awk '/ ACK / {for (i = 1; i <= NF; i++) if ($i == "ACK") s = $(i + 1)} END {print s + 0}')
timing[partition_last_old_ack_after_cut_s]=$(( last_ack - cut ))
[ "$last_ack" -le $(( cut + LEASE_S + 2 )) ] || fail "the partitioned primary acknowledged a write $(( last_ack - cut )) s after the cut (lease ${LEASE_S} s)"
docker network connect --ip "$ip" kind "$pnode"
t=$(now_ms)
wait_for "partitioned engine resynced" 600 phase_is Synced
timing[partition_heal_to_synced_ms]=$(( $(now_ms) - t ))
pass

# operator-down: no operator while the primary's node is lost; it catches up and promotes after a lease ------
scenario=operator-down
pnode=$(mv_field .status.primary.node); epoch=$(mv_field .status.epoch)
k -n "$NS" scale deploy/tandem-operator --replicas=0
k -n "$NS" rollout status deploy/tandem-operator --timeout=60s
docker stop "$pnode" >/dev/null
sleep 20
[ "$(mv_field .status.epoch)" = "$epoch" ] || fail "a takeover happened with no operator"
t=$(now_ms)
k -n "$NS" scale deploy/tandem-operator --replicas=1
wait_for "takeover once the operator is back" 300 epoch_above "$epoch"
timing[operator_back_to_takeover_ms]=$(( $(now_ms) - t ))
[ "${timing[operator_back_to_takeover_ms]}" -ge $(( LEASE_S * 1000 )) ] || fail "the operator promoted ${timing[operator_back_to_takeover_ms]} ms after its start, inside a lease"
wait_for "writer replacement on another node" 300 writer_ready_on_other_than "$pnode"
verify_ok "$(writer_pod)"
docker start "$pnode" >/dev/null
wait_for "returned engine resynced" 600 phase_is Synced
pass

write_results
log "all scenarios passed; results in $OUT"
k get mv e2e -o wide
