//! Desired objects as pure functions of (MirroredVolume, status, observed state, config).
//!
//! Nothing here talks to the API server: the reconciler observes, calls these, and applies the result with
//! server-side apply. Names are deterministic so every reconcile converges on the same objects.
//!
//! Pods and claims are immutable in the fields we set, so they are only created when missing (a pod that must
//! change is deleted by the failover logic and recreated here). Services and the PV are applied every time;
//! the PV only when missing too, because its CSI source is immutable (growth patches the capacity alone).

use std::collections::BTreeMap;

use k8s_openapi::{
    api::core::v1::{
        Affinity, CSIPersistentVolumeSource, Capabilities, Container, ContainerPort, EnvVar,
        EnvVarSource, HostPathVolumeSource, NodeAffinity, NodeSelector, NodeSelectorRequirement,
        NodeSelectorTerm, ObjectFieldSelector, ObjectReference, PersistentVolume,
        PersistentVolumeClaim, PersistentVolumeClaimSpec, PersistentVolumeClaimVolumeSource,
        PersistentVolumeSpec, Pod, PodSpec, Probe, ResourceRequirements, Secret, SecretReference,
        SecretVolumeSource, SecurityContext, Service, ServicePort, ServiceSpec, TCPSocketAction,
        Volume, VolumeMount, VolumeNodeAffinity, VolumeResourceRequirements,
    },
    apimachinery::pkg::{
        api::resource::Quantity, apis::meta::v1::ObjectMeta, util::intstr::IntOrString,
    },
    ByteString,
};
use kube::{Resource, ResourceExt};
use tandem_api::{
    contract::{secret_csi_cert_key, secret_csi_key_key, SECRET_ENGINES_KEY, SECRET_NBD_KEY},
    tls::{Identity, Issued, VolumeRef, CA_FILE, CERT_FILE, KEY_FILE},
};

use crate::{
    crd::{
        parse_quantity, EngineRole, MirroredVolume, MirroredVolumeStatus, ReplicationMode,
        SecondaryAccess, Slot, CSI_DRIVER,
    },
    failover::primary_slot,
    observed::{
        MovePvc, NodeObs, Observed, DISRUPTION_LABEL, MOVE_ANNOTATION, NAMESPACE_LABEL, NAME_LABEL,
        ROLE_ANNOTATION, SLOT_LABEL, UID_LABEL, VOLUME_LABEL,
    },
};

/// Engine ports (DESIGN.md contract). NBD has no port in the pods the operator creates: engines serve it
/// on a unix socket only (`NBD_SOCKET`), which the CSI plugin on the same node reaches through the host.
pub const GRPC_PORT: u16 = 9500;
pub const METRICS_PORT: u16 = 9501;

/// PV volume attributes and the token's key: the contract with the CSI plugin.
pub use tandem_api::contract::{
    ATTR_ENGINES, ATTR_FAILOVER_POLICY, ATTR_NBD, ATTR_PEER_TIMEOUT, ATTR_SECONDARY_ACCESS,
    ATTR_SECONDARY_READ_MODE, ATTR_TAKEOVER_POLICY, ATTR_VOLUME, SECRET_CA_KEY, SECRET_TOKEN_KEY,
};

/// Where the engine keeps everything inside its pod.
const DATA_MOUNT: &str = "/var/lib/tandem";
const TOKEN_MOUNT: &str = "/etc/tandem/token";
/// The engine's `--tls-dir`: its TLS Secret (`ca.crt`, `tls.crt`, `tls.key`).
pub const TLS_MOUNT: &str = "/etc/tandem/tls";
/// The per-volume host directory shared by the engine pod and the CSI plugin on its node, mounted here.
pub const RUN_MOUNT: &str = "/run/tandem";
/// The NBD socket inside the engine pod (under `RUN_MOUNT`).
pub const NBD_SOCKET: &str = "/run/tandem/nbd.sock";
/// Host directory holding one directory per volume; the CSI DaemonSet mounts it at the same path.
pub const HOST_VOLUMES_DIR: &str = "/run/tandem/volumes";
/// Set to `tandem-operator` on everything the operator creates.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Extra room in an engine PVC beyond the volume and journal: meta, tables, overlay headroom.
const ENGINE_PVC_SLACK: u64 = 256 << 20;
/// Journal size assumed for PVC sizing when the spec leaves it to the engine (the engine's default).
const DEFAULT_JOURNAL: u64 = 32 << 20;
/// Leaf certificates live this long unless the operator is told otherwise (`--cert-validity`).
pub const DEFAULT_CERT_VALIDITY: std::time::Duration =
    std::time::Duration::from_secs(90 * 24 * 3600);

/// Settings that come from the operator's deployment, not from the volume.
#[derive(Clone, Debug, PartialEq)]
pub struct EngineConfig {
    pub image: String,
    pub image_pull_policy: Option<String>,
    /// Cluster DNS domain for engine addresses.
    pub cluster_domain: String,
    /// Priority class for engine pods (the chart sets one so engines are not the first to be evicted).
    pub priority_class: Option<String>,
    /// The operator's namespace: every object of a volume but its claim lives here, so workload
    /// namespaces hold no engine pods, token or keys (and can run under the `restricted` profile).
    pub namespace: String,
    /// `engineStorage.hostPath` must lie under this directory (`--allowed-host-path-root`).
    pub allowed_host_path_root: String,
    /// Lifetime of the leaf certificates the operator mints (`--cert-validity`).
    pub cert_validity: std::time::Duration,
    /// The chart's engine pod settings (`--engine-pod`): pull secrets, tolerations, log format...
    pub pod: crate::engine_pod::EnginePodSettings,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            image: "tandem-engine:dev".to_string(),
            image_pull_policy: None,
            cluster_domain: "cluster.local".to_string(),
            priority_class: None,
            namespace: "tandem-system".to_string(),
            allowed_host_path_root: "/var/lib/tandem".to_string(),
            cert_validity: DEFAULT_CERT_VALIDITY,
            pod: Default::default(),
        }
    }
}

/// Deterministic object names for one volume. Everything in the operator's namespace is named from the
/// volume's [`key`](names::key); the PV from its namespace and name.
pub mod names {
    use crate::crd::Slot;

    /// Longest readable part of a key (the namespace and name, cut): the key stays <= 41 characters, so
    /// `<key>-engine-a-data` is a valid name, a Service name `<key>-engine-a` a DNS-1035 label, and the
    /// NBD socket path `/run/tandem/volumes/<key>/nbd.sock` far below the 108 bytes of `sun_path`.
    const READABLE: usize = 23;

    /// FNV-1a, 64 bits: stable across Rust versions and platforms (the key must never change for a
    /// volume), unlike `DefaultHasher`.
    fn fnv1a(bytes: &[u8]) -> u64 {
        bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
        })
    }

    /// The volume's key in the operator's namespace: `<namespace>-<name>` cut to 23 characters for
    /// humans, then a 64-bit hash of `<namespace>/<name>` (`/` appears in neither, so the hashed string
    /// is unambiguous). Always hashed, so `a-b`/`c` and `a`/`b-c` differ even when readable parts are
    /// equal; a DNS-1035 label (lowercase, starts with a letter).
    ///
    /// Uniqueness is not what keeps tenants apart: a hash collision (found on purpose, say) only makes
    /// the second volume see objects whose owner labels name another volume, and it refuses them
    /// (`NameConflict`, test `controller::tests::a_key_collision_is_refused`).
    pub fn key(namespace: &str, volume: &str) -> String {
        let hash = fnv1a(format!("{namespace}/{volume}").as_bytes());
        let mut readable: String = format!("{namespace}-{volume}")
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .take(READABLE)
            .collect();
        while readable.ends_with('-') {
            readable.pop();
        }
        if !readable.starts_with(|c: char| c.is_ascii_lowercase()) {
            readable.insert(0, 'v');
        }
        format!("{readable}-{hash:016x}")
    }

    /// The volume's node label key, `tandem.dev/v-<key>` (the name part at most 2 + 41 characters,
    /// within a label's 63). The whole key, not its hash alone: two volumes whose hashes collide (made
    /// so on purpose, say) still get distinct labels, so one can never overwrite the other's on a
    /// shared node; equal keys are refused as a `NameConflict` before any label is set. The operator
    /// puts it, with the key as its value, on exactly the nodes that hold the volume's engines, and
    /// moves it with a live move; PVs select it as their node affinity (`super::node_label`).
    pub fn node_label(namespace: &str, volume: &str) -> String {
        format!("{NODE_LABEL_PREFIX}{}", key(namespace, volume))
    }
    /// Prefix of every volume's node label key.
    pub const NODE_LABEL_PREFIX: &str = "tandem.dev/v-";

    /// Engine pod and its Service (a slot's first instance).
    pub fn engine(key: &str, slot: Slot) -> String {
        engine_instance(key, slot, 0)
    }
    /// A slot's engine instance: `a`, `b` for generation 0, `a-m<n>`, `b-m<n>` after the n-th live move
    /// (the value of the pods' and Services' `tandem.dev/slot` label).
    pub fn instance(slot: Slot, generation: u32) -> String {
        match generation {
            0 => slot.as_str().to_string(),
            n => format!("{}-m{n}", slot.as_str()),
        }
    }
    /// The engine pod and Service of a slot's instance `generation`.
    pub fn engine_instance(key: &str, slot: Slot, generation: u32) -> String {
        format!("{key}-engine-{}", instance(slot, generation))
    }
    /// The wipe pod of a live move: `<key>-wipe-<instance>` empties the new node before the new engine
    /// starts, `<key>-wipe-<instance>-old` the old node once it is gone.
    pub fn move_wipe(key: &str, slot: Slot, generation: u32, old: bool) -> String {
        format!(
            "{key}-wipe-{}{}",
            instance(slot, generation),
            if old { "-old" } else { "" }
        )
    }
    /// The token Secret the engines mount.
    pub fn secret(key: &str) -> String {
        format!("{key}-token")
    }
    /// A slot's engine TLS Secret (kubernetes.io/tls plus `ca.crt`).
    pub fn tls_secret(key: &str, slot: Slot) -> String {
        format!("{key}-tls-{}", slot.as_str())
    }
    /// The CSI plugins' Secret (the PV's `nodeStageSecretRef`): token, CA and one certificate per node.
    pub fn csi_secret(key: &str) -> String {
        format!("{key}-csi")
    }
    /// The PV: `tandem.<namespace>.<name>`. Namespaces have no dots, so the first dot after the prefix
    /// splits it unambiguously; at most 7 + 63 + 1 + 63 characters (volume names are capped at 63).
    pub fn pv(namespace: &str, volume: &str) -> String {
        format!("tandem.{namespace}.{volume}")
    }
    /// A slot's first engine PVC (StorageClass storage): `<key>-engine-<slot>-data`.
    pub fn engine_pvc(key: &str, slot: Slot) -> String {
        engine_pvc_at(key, slot, 0)
    }
    /// The PVC of a slot's instance `generation`: `<instance>-data`, so each live move's new engine
    /// gets its own claim (`<key>-engine-<slot>-m<n>-data`).
    pub fn engine_pvc_at(key: &str, slot: Slot, generation: u32) -> String {
        format!("{}-data", engine_instance(key, slot, generation))
    }
    /// The engines' PodDisruptionBudget.
    pub fn budget(key: &str) -> String {
        format!("{key}-engines")
    }
    /// The host directory of the volume's NBD socket, on both engine nodes.
    pub fn host_dir(key: &str) -> String {
        format!("{}/{key}", super::HOST_VOLUMES_DIR)
    }
}

/// The CSI stage Secret's name: `<key>-csi`; for a provisioned volume (`spec.persistentVolumeName`)
/// `tandem-csi-<persistentVolumeName>`, the name its StorageClass's
/// `csi.storage.k8s.io/node-stage-secret-name: tandem-csi-${pv.name}` asks for.
pub fn csi_secret_name(mv: &MirroredVolume) -> String {
    match &mv.spec.persistent_volume_name {
        Some(pv) => format!("tandem-csi-{pv}"),
        None => names::csi_secret(&key(mv)),
    }
}

/// The volume's PersistentVolume: the operator's `tandem.<ns>.<name>`, or the provisioned one.
pub fn pv_name(mv: &MirroredVolume) -> String {
    match &mv.spec.persistent_volume_name {
        Some(pv) => pv.clone(),
        None => names::pv(&mv.namespace().unwrap_or_default(), &mv.name_any()),
    }
}

/// The volume's node label: (key, value) = (`tandem.dev/v-<key>`, the volume's key). On the nodes
/// of its engines (`status.nodes`) from before `status.nodes` is first written, moved at a live
/// move's cutover, removed by the finalizer; the PV's node affinity and CreateVolume's
/// accessible topology select it, so workloads follow the engines (operator/README.md, "Live move").
pub fn node_label(mv: &MirroredVolume) -> (String, String) {
    (
        names::node_label(&mv.namespace().unwrap_or_default(), &mv.name_any()),
        key(mv),
    )
}

/// The volume's key (see [`names::key`]).
pub fn key(mv: &MirroredVolume) -> String {
    names::key(&mv.namespace().unwrap_or_default(), &mv.name_any())
}

/// Which instance of a slot's engine serves it (`status.slotGenerations`; 0 when unrecorded).
pub fn generation(status: Option<&MirroredVolumeStatus>, slot: Slot) -> u32 {
    status
        .and_then(|s| s.slot_generations.get(slot.index()).copied())
        .unwrap_or(0)
}

/// gRPC address of a slot's engine, through its Service in the operator's namespace.
pub fn engine_address(mv: &MirroredVolume, slot: Slot, cfg: &EngineConfig) -> String {
    engine_address_at(mv, slot, generation(mv.status.as_ref(), slot), cfg)
}

/// gRPC address of a slot's engine instance `generation` (a live move's target before it serves).
///
/// Invariant: an instance's address never changes and never names another instance: a primary stores
/// the address it moved its secondary to and uses it across restarts whatever `--peer` says
/// (storage-engine `repl/mover.rs` `recover`), so the Service of that name must reach that engine for as
/// long as it serves (tests/failover_engines.rs
/// `a_placement_edit_moves_the_secondary_under_writes_and_loses_nothing`).
pub fn engine_address_at(
    mv: &MirroredVolume,
    slot: Slot,
    generation: u32,
    cfg: &EngineConfig,
) -> String {
    format!(
        "{}.{}.svc.{}:{GRPC_PORT}",
        names::engine_instance(&key(mv), slot, generation),
        cfg.namespace,
        cfg.cluster_domain
    )
}

/// The DNS name of a slot's Service.
fn engine_host(mv: &MirroredVolume, slot: Slot, cfg: &EngineConfig) -> String {
    format!(
        "{}.{}.svc.{}",
        names::engine_instance(&key(mv), slot, generation(mv.status.as_ref(), slot)),
        cfg.namespace,
        cfg.cluster_domain
    )
}

/// Every DNS name of a slot's Service (the DNS SANs of its engine certificate).
pub fn engine_dns_names(mv: &MirroredVolume, slot: Slot, cfg: &EngineConfig) -> Vec<String> {
    let svc = names::engine_instance(&key(mv), slot, generation(mv.status.as_ref(), slot));
    let ns = &cfg.namespace;
    vec![
        svc.clone(),
        format!("{svc}.{ns}"),
        format!("{svc}.{ns}.svc"),
        engine_host(mv, slot, cfg),
    ]
}

/// Labels on every object of the volume. `tandem.dev/volume` carries the key (it selects the engines,
/// unique in the operator's namespace); namespace, name and uid say whose object it is: owner references
/// cannot cross namespaces, so these labels are the ownership the operator checks before it adopts,
/// reads or deletes anything.
pub fn labels(mv: &MirroredVolume) -> BTreeMap<String, String> {
    let mut l = BTreeMap::from([
        (
            "app.kubernetes.io/name".to_string(),
            "tandem-engine".to_string(),
        ),
        (MANAGED_BY_LABEL.to_string(), "tandem-operator".to_string()),
        (VOLUME_LABEL.to_string(), key(mv)),
        (
            NAMESPACE_LABEL.to_string(),
            mv.namespace().unwrap_or_default(),
        ),
        (NAME_LABEL.to_string(), mv.name_any()),
    ]);
    if let Some(uid) = &mv.metadata.uid {
        l.insert(UID_LABEL.to_string(), uid.clone());
    }
    l
}

/// Whether an object's labels say it belongs to this volume: namespace and name equal, and the uid
/// equal when both sides have one. `Err` says whose it is instead.
pub fn owned_by(
    labels: Option<&BTreeMap<String, String>>,
    mv: &MirroredVolume,
) -> Result<(), String> {
    let get = |k: &str| labels.and_then(|l| l.get(k)).map(String::as_str);
    let (ns, name) = (mv.namespace().unwrap_or_default(), mv.name_any());
    let (their_ns, their_name) = (get(NAMESPACE_LABEL), get(NAME_LABEL));
    if their_ns != Some(ns.as_str()) || their_name != Some(name.as_str()) {
        return Err(match (their_ns, their_name) {
            (Some(n), Some(v)) => format!("it belongs to volume {n}/{v}"),
            _ => "it carries no tandem.dev owner labels".to_string(),
        });
    }
    match (get(UID_LABEL), mv.metadata.uid.as_deref()) {
        (Some(theirs), Some(ours)) if theirs != ours => Err(format!(
            "it belongs to an earlier volume {ns}/{name} (uid {theirs})"
        )),
        _ => Ok(()),
    }
}

fn slot_labels(mv: &MirroredVolume, slot: Slot) -> BTreeMap<String, String> {
    instance_labels(mv, slot, 0)
}

/// Labels of an engine instance's pod and Service: `tandem.dev/slot` names the instance, so a slot's
/// Service never selects a live move's new engine (nor the old one after it).
fn instance_labels(mv: &MirroredVolume, slot: Slot, generation: u32) -> BTreeMap<String, String> {
    let mut l = labels(mv);
    l.insert(SLOT_LABEL.to_string(), names::instance(slot, generation));
    l
}

/// Metadata of an object in the operator's namespace: no owner reference (it would name an object in
/// another namespace, which the garbage collector treats as absent and deletes the child); the finalizer
/// deletes these.
fn meta(name: String, labels: BTreeMap<String, String>, cfg: &EngineConfig) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: Some(cfg.namespace.clone()),
        labels: Some(labels),
        ..Default::default()
    }
}

/// Why a volume cannot be turned into objects: the spec is invalid in a way the schema cannot express,
/// or the operator refuses it (`reason` is the Ready condition's reason and the event's).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct InvalidSpec {
    pub reason: &'static str,
    pub message: String,
}

impl InvalidSpec {
    pub fn new(message: impl Into<String>) -> Self {
        Self::refused("InvalidSpec", message)
    }
    pub fn refused(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }
}

/// Condition reasons of a refused volume.
pub const HOST_PATH_NOT_ALLOWED: &str = "HostPathNotAllowed";
pub const PV_CONFLICT: &str = "PersistentVolumeConflict";
pub const NAME_CONFLICT: &str = "NameConflict";

/// Longest volume name: the name is a label value on every object.
const MAX_NAME: usize = 63;

/// `path` made absolute and clean (no `.`, empty segments or trailing `/`); `..` is refused rather than
/// resolved, so no spelling of a path outside the root can pass the prefix check.
fn normalize(path: &str) -> Result<String, String> {
    if !path.starts_with('/') {
        return Err(format!("{path:?} is not absolute"));
    }
    let mut parts = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => return Err(format!("{path:?} contains \"..\"")),
            p => parts.push(p),
        }
    }
    Ok(format!("/{}", parts.join("/")))
}

/// The engines' hostPath base, checked against the allowed root: the same directory or below it.
/// Invariant: no engine pod mounts a host directory outside `--allowed-host-path-root` (a tenant
/// cannot pick `/` or `/etc`); test `plan::tests::host_path_outside_the_root_is_refused`.
pub fn host_path_base(
    mv: &MirroredVolume,
    cfg: &EngineConfig,
) -> Result<Option<String>, InvalidSpec> {
    let Some(path) = &mv.spec.engine_storage.host_path else {
        return Ok(None);
    };
    let refuse = |why: String| {
        InvalidSpec::refused(
            HOST_PATH_NOT_ALLOWED,
            format!(
                "engineStorage.hostPath {path:?} is not allowed: {why} (the operator allows only paths under {:?})",
                cfg.allowed_host_path_root
            ),
        )
    };
    let root = normalize(&cfg.allowed_host_path_root).map_err(refuse)?;
    let path = normalize(path).map_err(refuse)?;
    let inside = root == "/" || path == root || path.starts_with(&format!("{root}/"));
    if !inside {
        return Err(refuse(format!("it is outside {root}")));
    }
    Ok(Some(path))
}

/// The engines' own directory on their nodes (hostPath storage; `None` with engine PVCs): the one
/// recorded in `status.dataDir`; for a volume placed before that field existed (nodes recorded, no
/// dir) the old `<hostPath>/<namespace>/<name>`, so its engines keep their data; for a new volume
/// `<hostPath>/<namespace>/<name>-<uid>`.
///
/// Invariant: a volume created again under a deleted one's name never opens the old one's files,
/// even when its wipe could not run (node gone): the uid differs, so the directory does (test
/// `plan::tests::data_dirs_carry_the_uid_and_old_volumes_keep_theirs`).
pub fn host_data_dir(
    mv: &MirroredVolume,
    status: Option<&MirroredVolumeStatus>,
    cfg: &EngineConfig,
) -> Result<Option<String>, InvalidSpec> {
    let Some(base) = host_path_base(mv, cfg)? else {
        return Ok(None);
    };
    let base = base.trim_end_matches('/');
    let (ns, name) = (mv.namespace().unwrap_or_default(), mv.name_any());
    if let Some(dir) = status.and_then(|s| s.data_dir.as_ref()) {
        // Status is writable by others than the operator: a recorded dir must still sit under the
        // volume's own namespace directory.
        let prefix = format!("{base}/{ns}/{name}");
        let ok = normalize(dir).is_ok_and(|d| {
            d == prefix
                || d.strip_prefix(&format!("{prefix}-"))
                    .is_some_and(|u| !u.contains('/'))
        });
        if !ok {
            return Err(InvalidSpec::refused(
                HOST_PATH_NOT_ALLOWED,
                format!("status.dataDir {dir:?} is not this volume's directory under {base}/{ns}"),
            ));
        }
        return Ok(Some(dir.clone()));
    }
    if status.is_some_and(|s| s.nodes.len() == 2) {
        return Ok(Some(format!("{base}/{ns}/{name}")));
    }
    let uid = mv
        .metadata
        .uid
        .as_deref()
        .ok_or_else(|| InvalidSpec::new("the volume has no uid yet".to_string()))?;
    Ok(Some(format!("{base}/{ns}/{name}-{uid}")))
}

/// What can be checked before anything is observed: name length, size, the hostPath root.
pub fn validate(mv: &MirroredVolume, cfg: &EngineConfig) -> Result<(), InvalidSpec> {
    if mv.name_any().len() > MAX_NAME {
        return Err(InvalidSpec::new(format!(
            "the name is longer than {MAX_NAME} characters (it is a label value)"
        )));
    }
    volume_bytes(mv)?;
    host_path_base(mv, cfg)?;
    Ok(())
}

/// Volume size in bytes: a binary quantity, at least 1 MiB and a multiple of 4 KiB.
pub fn volume_bytes(mv: &MirroredVolume) -> Result<u64, InvalidSpec> {
    let bytes = parse_quantity(&mv.spec.size).ok_or_else(|| {
        InvalidSpec::new(format!("size {:?} is not a binary quantity", mv.spec.size))
    })?;
    if bytes < (1 << 20) || bytes % 4096 != 0 {
        return Err(InvalidSpec::new(format!(
            "size {} must be at least 1Mi and a multiple of 4Ki",
            mv.spec.size
        )));
    }
    Ok(bytes)
}

/// The two nodes when they are already decided: recorded in status (sticky once chosen), or named by
/// `placement.nodes`. `None`: `placement.nodeSelector` leaves the choice to [`crate::placement::place`].
pub fn fixed_nodes(
    mv: &MirroredVolume,
    status: &MirroredVolumeStatus,
) -> Result<Option<[String; 2]>, InvalidSpec> {
    if let [a, b] = status.nodes.as_slice() {
        return Ok(Some([a.clone(), b.clone()]));
    }
    if let Some(nodes) = &mv.spec.placement.nodes {
        return match nodes.as_slice() {
            [a, b] if a != b => Ok(Some([a.clone(), b.clone()])),
            _ => Err(InvalidSpec::new(
                "placement.nodes must name two distinct nodes".to_string(),
            )),
        };
    }
    if mv.spec.placement.node_selector.is_some() {
        return Ok(None);
    }
    Err(InvalidSpec::new(
        "placement needs nodes or nodeSelector".to_string(),
    ))
}

/// Label selector string for `placement.nodeSelector`.
pub fn selector_string(selector: &BTreeMap<String, String>) -> String {
    selector
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The engine pod of a slot, started with `role`.
pub fn engine_pod(
    mv: &MirroredVolume,
    slot: Slot,
    role: EngineRole,
    node: &str,
    cfg: &EngineConfig,
) -> Result<Pod, InvalidSpec> {
    engine_pod_at(
        mv,
        slot,
        generation(mv.status.as_ref(), slot),
        role,
        node,
        cfg,
    )
}

/// The engine pod of a slot's instance `generation` (a live move's target: a secondary on an empty
/// state dir).
pub fn engine_pod_at(
    mv: &MirroredVolume,
    slot: Slot,
    generation: u32,
    role: EngineRole,
    node: &str,
    cfg: &EngineConfig,
) -> Result<Pod, InvalidSpec> {
    let key = key(mv);
    let name = names::engine_instance(&key, slot, generation);
    let mut args: Vec<String> = vec![
        "serve".into(),
        "--volume".into(),
        mv.name_any(),
        "--data".into(),
        format!("{DATA_MOUNT}/data.img"),
        "--size".into(),
        volume_bytes(mv)?.to_string(),
        "--state-dir".into(),
        format!("{DATA_MOUNT}/state"),
        // Invariant: NBD never leaves the node. No TCP listener; the socket sits in the volume's host
        // directory, shared only with the CSI plugin on this node, and opens only `<volume>@<epoch>`.
        // Tests `plan::tests::no_nbd_listener_and_no_nbd_port_anywhere`, `engine_pod_carries_the_cli_contract`.
        "--nbd-listen".into(),
        "off".into(),
        "--nbd-socket".into(),
        NBD_SOCKET.into(),
        "--nbd-pinned-exports-only".into(),
        "--grpc-listen".into(),
        format!("0.0.0.0:{GRPC_PORT}"),
        "--metrics-listen".into(),
        format!("0.0.0.0:{METRICS_PORT}"),
        "--role".into(),
        role.flag().into(),
        "--peer".into(),
        engine_address(mv, slot.other(), cfg),
        "--token-file".into(),
        format!("{TOKEN_MOUNT}/{SECRET_TOKEN_KEY}"),
        "--tls-dir".into(),
        TLS_MOUNT.into(),
        "--node-name".into(),
        "$(NODE_NAME)".into(),
        "--replication".into(),
        match mv.spec.replication.mode {
            ReplicationMode::Async => "async".into(),
            ReplicationMode::Sync => "sync".into(),
        },
    ];
    if let Some(journal) = &mv.spec.replication.journal_size {
        let bytes = parse_quantity(journal).ok_or_else(|| {
            InvalidSpec::new(format!(
                "replication.journalSize {journal:?} is not a binary quantity"
            ))
        })?;
        args.push("--journal-size".into());
        args.push(bytes.to_string());
    }
    // Both engines run the spec's lease: the primary's lease, the secondary's promise and the operator's
    // wait as the witness are all derived from this one number.
    args.push("--lease-ms".into());
    args.push(mv.spec.failover.lease_ms.to_string());
    if mv.spec.secondary_access != SecondaryAccess::None {
        args.push("--secondary-access".into());
        args.push(mv.spec.secondary_access.engine_flag().into());
    }

    let data_volume = match (
        host_path_base(mv, cfg)?,
        &mv.spec.engine_storage.storage_class_name,
    ) {
        (Some(_), _) => Volume {
            name: "data".into(),
            host_path: Some(HostPathVolumeSource {
                path: host_data_dir(mv, mv.status.as_ref(), cfg)?.unwrap_or_default(),
                type_: Some("DirectoryOrCreate".into()),
            }),
            ..Default::default()
        },
        (None, Some(_)) => Volume {
            name: "data".into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: names::engine_pvc_at(&key, slot, generation),
                read_only: None,
            }),
            ..Default::default()
        },
        (None, None) => {
            return Err(InvalidSpec::new(
                "engineStorage needs hostPath or storageClassName".to_string(),
            ))
        }
    };
    let port = |name: &str, p: u16| ContainerPort {
        name: Some(name.into()),
        container_port: i32::from(p),
        protocol: Some("TCP".into()),
        ..Default::default()
    };
    // JSON lines with volume, epoch and role by default (engine_pod::EnginePodSettings).
    args.extend(["--log-format".into(), cfg.pod.log_format().into()]);
    let mut pod_labels = instance_labels(mv, slot, generation);
    // Born under the volume's PodDisruptionBudget: the operator lifts it once the pod is an in-sync secondary.
    pod_labels.insert(DISRUPTION_LABEL.to_string(), "false".to_string());
    let mut metadata = meta(name, pod_labels, cfg);
    metadata.annotations = Some(BTreeMap::from([(
        ROLE_ANNOTATION.to_string(),
        role.flag().to_string(),
    )]));
    let mut pod = Pod {
        metadata,
        spec: Some(PodSpec {
            affinity: Some(Affinity {
                node_affinity: Some(NodeAffinity {
                    required_during_scheduling_ignored_during_execution: Some(NodeSelector {
                        node_selector_terms: vec![NodeSelectorTerm {
                            match_fields: Some(vec![NodeSelectorRequirement {
                                key: "metadata.name".into(),
                                operator: "In".into(),
                                values: Some(vec![node.to_string()]),
                            }]),
                            ..Default::default()
                        }],
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            containers: vec![Container {
                name: "engine".into(),
                image: Some(cfg.image.clone()),
                image_pull_policy: cfg.image_pull_policy.clone(),
                args: Some(args),
                ports: Some(vec![port("grpc", GRPC_PORT), port("metrics", METRICS_PORT)]),
                env: Some(vec![EnvVar {
                    name: "NODE_NAME".into(),
                    value_from: Some(EnvVarSource {
                        field_ref: Some(ObjectFieldSelector {
                            field_path: "spec.nodeName".into(),
                            api_version: None,
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                }]),
                readiness_probe: Some(Probe {
                    tcp_socket: Some(TCPSocketAction {
                        port: IntOrString::String("grpc".into()),
                        host: None,
                    }),
                    period_seconds: Some(2),
                    failure_threshold: Some(2),
                    ..Default::default()
                }),
                liveness_probe: Some(Probe {
                    tcp_socket: Some(TCPSocketAction {
                        port: IntOrString::String("grpc".into()),
                        host: None,
                    }),
                    period_seconds: Some(10),
                    failure_threshold: Some(6),
                    ..Default::default()
                }),
                resources: Some(ResourceRequirements {
                    requests: Some(BTreeMap::from([
                        ("cpu".to_string(), Quantity("100m".into())),
                        ("memory".to_string(), Quantity("128Mi".into())),
                    ])),
                    ..Default::default()
                }),
                security_context: Some(SecurityContext {
                    allow_privilege_escalation: Some(false),
                    read_only_root_filesystem: Some(true),
                    capabilities: Some(Capabilities {
                        drop: Some(vec!["ALL".into()]),
                        add: None,
                    }),
                    ..Default::default()
                }),
                volume_mounts: Some(vec![
                    VolumeMount {
                        name: "data".into(),
                        mount_path: DATA_MOUNT.into(),
                        ..Default::default()
                    },
                    VolumeMount {
                        name: "token".into(),
                        mount_path: TOKEN_MOUNT.into(),
                        read_only: Some(true),
                        ..Default::default()
                    },
                    VolumeMount {
                        name: "tls".into(),
                        mount_path: TLS_MOUNT.into(),
                        read_only: Some(true),
                        ..Default::default()
                    },
                    VolumeMount {
                        name: "run".into(),
                        mount_path: RUN_MOUNT.into(),
                        ..Default::default()
                    },
                ]),
                ..Default::default()
            }],
            enable_service_links: Some(false),
            automount_service_account_token: Some(false),
            priority_class_name: cfg.priority_class.clone(),
            restart_policy: Some("Always".into()),
            termination_grace_period_seconds: Some(30),
            volumes: Some(vec![
                data_volume,
                // Secrets read-only, 0400: only the engine's user reads the token and its key.
                Volume {
                    name: "token".into(),
                    secret: Some(SecretVolumeSource {
                        secret_name: Some(names::secret(&key)),
                        default_mode: Some(0o400),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                Volume {
                    name: "tls".into(),
                    secret: Some(SecretVolumeSource {
                        secret_name: Some(names::tls_secret(&key, slot)),
                        default_mode: Some(0o400),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                Volume {
                    name: "run".into(),
                    host_path: Some(HostPathVolumeSource {
                        path: names::host_dir(&key),
                        type_: Some("DirectoryOrCreate".into()),
                    }),
                    ..Default::default()
                },
            ]),
            ..Default::default()
        }),
        status: None,
    };
    cfg.pod.apply(&mut pod);
    if role == EngineRole::Primary {
        if let Some(r) = mv.status.as_ref().and_then(|s| s.restore.as_ref()) {
            if !r.done && r.node == node {
                add_seed(&mut pod, mv, r, cfg)?;
            }
        }
    }
    Ok(pod)
}

/// Where a restoring primary sees the source engine's socket directory (read-only).
pub const SOURCE_MOUNT: &str = "/src";

/// The restoring primary's init container: `tandem-engine seed` fills its fresh state dir and data
/// file from the source engine's snapshot export, over that engine's NBD socket on this node, before
/// `serve` starts. Idempotent (a restarted pod seeds nothing twice), and `serve` refuses a half-seeded
/// dir, so a crash mid-seed never serves a partial copy.
fn add_seed(
    pod: &mut Pod,
    mv: &MirroredVolume,
    r: &crate::crd::RestoreStatus,
    cfg: &EngineConfig,
) -> Result<(), InvalidSpec> {
    let src_key = names::key(&mv.namespace().unwrap_or_default(), &r.volume);
    let Some(spec) = pod.spec.as_mut() else {
        return Ok(());
    };
    let engine = &spec.containers[0];
    let mut mounts = engine.volume_mounts.clone().unwrap_or_default();
    mounts.retain(|m| m.name == "data");
    mounts.push(VolumeMount {
        name: "source".into(),
        mount_path: SOURCE_MOUNT.into(),
        read_only: Some(true),
        ..Default::default()
    });
    let init = Container {
        name: "seed".into(),
        image: Some(cfg.image.clone()),
        image_pull_policy: cfg.image_pull_policy.clone(),
        args: Some(vec![
            "seed".into(),
            "--from".into(),
            format!("unix:{SOURCE_MOUNT}/nbd.sock"),
            "--export".into(),
            tandem_api::contract::snapshot_export(&r.volume, &r.snapshot),
            "--state-dir".into(),
            format!("{DATA_MOUNT}/state"),
            "--data".into(),
            format!("{DATA_MOUNT}/data.img"),
            "--volume".into(),
            mv.name_any(),
            "--size".into(),
            volume_bytes(mv)?.to_string(),
        ]),
        volume_mounts: Some(mounts),
        security_context: engine.security_context.clone(),
        ..Default::default()
    };
    spec.init_containers = Some(vec![init]);
    spec.volumes.get_or_insert_with(Vec::new).push(Volume {
        name: "source".into(),
        host_path: Some(HostPathVolumeSource {
            path: names::host_dir(&src_key),
            // The source engine made it; absent means the source is not on this node.
            type_: Some("Directory".into()),
        }),
        ..Default::default()
    });
    Ok(())
}

/// The Service in front of a slot's engine: gRPC and metrics only (no NBD port, by design: NBD stays on
/// the node). Not-ready addresses are published: the peer must reach an engine that is starting, and the
/// old primary while it drains.
pub fn engine_service(mv: &MirroredVolume, slot: Slot, cfg: &EngineConfig) -> Service {
    engine_service_at(mv, slot, generation(mv.status.as_ref(), slot), cfg)
}

/// The Service of a slot's instance `generation`; it selects that instance's pod only.
pub fn engine_service_at(
    mv: &MirroredVolume,
    slot: Slot,
    generation: u32,
    cfg: &EngineConfig,
) -> Service {
    let port = |name: &str, p: u16| ServicePort {
        name: Some(name.into()),
        port: i32::from(p),
        target_port: Some(IntOrString::String(name.into())),
        protocol: Some("TCP".into()),
        ..Default::default()
    };
    let key = key(mv);
    let mut selector = BTreeMap::new();
    selector.insert(VOLUME_LABEL.to_string(), key.clone());
    selector.insert(SLOT_LABEL.to_string(), names::instance(slot, generation));
    Service {
        metadata: meta(
            names::engine_instance(&key, slot, generation),
            instance_labels(mv, slot, generation),
            cfg,
        ),
        spec: Some(ServiceSpec {
            selector: Some(selector),
            ports: Some(vec![port("grpc", GRPC_PORT), port("metrics", METRICS_PORT)]),
            publish_not_ready_addresses: Some(true),
            type_: Some("ClusterIP".into()),
            ..Default::default()
        }),
        status: None,
    }
}

fn secret_data(entries: Vec<(String, &str)>) -> BTreeMap<String, ByteString> {
    entries
        .into_iter()
        .map(|(k, v)| (k, ByteString(v.as_bytes().to_vec())))
        .collect()
}

/// The token Secret (key `token`) the engines mount, created once; the token itself comes from the caller.
pub fn token_secret(mv: &MirroredVolume, token: &str, cfg: &EngineConfig) -> Secret {
    Secret {
        metadata: meta(names::secret(&key(mv)), labels(mv), cfg),
        data: Some(secret_data(vec![(SECRET_TOKEN_KEY.to_string(), token)])),
        type_: Some("Opaque".into()),
        ..Default::default()
    }
}

/// A slot's engine TLS Secret: `kubernetes.io/tls` plus `ca.crt`, the engine's `--tls-dir`. The
/// certificate speaks for `Engine{volume}` (both engines of a volume share the identity; the peer check
/// is the volume).
pub fn engine_tls_secret(
    mv: &MirroredVolume,
    slot: Slot,
    cfg: &EngineConfig,
    ca_pem: &str,
    leaf: &Issued,
) -> Secret {
    Secret {
        metadata: meta(
            names::tls_secret(&key(mv), slot),
            slot_labels(mv, slot),
            cfg,
        ),
        data: Some(secret_data(vec![
            (CA_FILE.to_string(), ca_pem),
            (CERT_FILE.to_string(), &leaf.cert_pem),
            (KEY_FILE.to_string(), &leaf.key_pem),
        ])),
        type_: Some("kubernetes.io/tls".into()),
        ..Default::default()
    }
}

/// The CSI Secret (the PV's `nodeStageSecretRef`): the token, the CA and, per engine node, the certificate
/// and key of `Csi{volume, node}`. Kubelet hands it to the plugin of every node it stages on; each plugin
/// uses its own node's pair.
pub fn csi_secret(
    mv: &MirroredVolume,
    cfg: &EngineConfig,
    token: &str,
    ca_pem: &str,
    leaves: &[(String, Issued)],
) -> Secret {
    let mut entries = vec![
        (SECRET_TOKEN_KEY.to_string(), token),
        (SECRET_CA_KEY.to_string(), ca_pem),
    ];
    for (node, leaf) in leaves {
        entries.push((secret_csi_cert_key(node), leaf.cert_pem.as_str()));
        entries.push((secret_csi_key_key(node), leaf.key_pem.as_str()));
    }
    // The engine maps, current (the PV's copy is immutable): the CSI plugin prefers these, so a
    // live move to another node reaches the plugins (csi-node `context::overlay_stage_secrets`).
    let maps = csi_secret_maps(mv, leaves, cfg);
    if let Some((engines, nbd)) = &maps {
        entries.push((SECRET_ENGINES_KEY.to_string(), engines.as_str()));
        entries.push((SECRET_NBD_KEY.to_string(), nbd.as_str()));
    }
    Secret {
        metadata: meta(csi_secret_name(mv), labels(mv), cfg),
        data: Some(secret_data(entries)),
        type_: Some("Opaque".into()),
        ..Default::default()
    }
}

/// The CSI Secret's `engines` and `nbd` maps for the nodes of `leaves` (slot a's, then slot b's).
fn csi_secret_maps(
    mv: &MirroredVolume,
    leaves: &[(String, Issued)],
    cfg: &EngineConfig,
) -> Option<(String, String)> {
    let [(a, _), (b, _)] = leaves else {
        return None;
    };
    let nodes = [a.clone(), b.clone()];
    Some((
        engines_attribute(mv, &nodes, cfg),
        nbd_attribute(mv, &nodes),
    ))
}

/// Whether the CSI Secret's engine maps are what `nodes` and the current engine instances give (a
/// stale Secret is issued again, certificates included).
pub fn csi_secret_maps_current(
    mv: &MirroredVolume,
    data: &BTreeMap<String, ByteString>,
    nodes: &[String; 2],
    cfg: &EngineConfig,
) -> bool {
    let text = |k: &str| data.get(k).and_then(|b| std::str::from_utf8(&b.0).ok());
    text(SECRET_ENGINES_KEY) == Some(engines_attribute(mv, nodes, cfg).as_str())
        && text(SECRET_NBD_KEY) == Some(nbd_attribute(mv, nodes).as_str())
}

/// The identity of a slot's engine certificate.
pub fn engine_identity(mv: &MirroredVolume) -> Identity {
    Identity::Engine {
        volume: VolumeRef::new(mv.namespace().unwrap_or_default(), mv.name_any()),
    }
}

/// The identity of the CSI plugin on `node` for this volume.
pub fn csi_identity(mv: &MirroredVolume, node: &str) -> Identity {
    Identity::Csi {
        volume: VolumeRef::new(mv.namespace().unwrap_or_default(), mv.name_any()),
        node: node.to_string(),
    }
}

/// A leaf is (re-)issued when missing or when less than a third of `validity` is left.
pub fn needs_cert(
    not_after: Option<k8s_openapi::jiff::Timestamp>,
    now: k8s_openapi::jiff::Timestamp,
    validity: std::time::Duration,
) -> bool {
    let Some(not_after) = not_after else {
        return true;
    };
    let third = i64::try_from(validity.as_secs() / 3).unwrap_or(i64::MAX);
    not_after.as_second().saturating_sub(now.as_second()) < third
}

/// `node=host:port,node=host:port` for the CSI plugin: the engines' gRPC addresses.
pub fn engines_attribute(mv: &MirroredVolume, nodes: &[String; 2], cfg: &EngineConfig) -> String {
    Slot::BOTH
        .iter()
        .map(|s| format!("{}={}", nodes[s.index()], engine_address(mv, *s, cfg)))
        .collect::<Vec<_>>()
        .join(",")
}

/// `node=unix:/run/tandem/volumes/<key>/nbd.sock,...`: each engine's NBD socket as its node's CSI plugin
/// sees it (the host directory the engine pod mounts at `/run/tandem`).
pub fn nbd_attribute(mv: &MirroredVolume, nodes: &[String; 2]) -> String {
    let dir = names::host_dir(&key(mv));
    Slot::BOTH
        .iter()
        .map(|s| format!("{}=unix:{dir}/nbd.sock", nodes[s.index()]))
        .collect::<Vec<_>>()
        .join(",")
}

/// The PV `volumeAttributes` the CSI plugin stages with (the operator↔CSI contract): written into the
/// PersistentVolume the operator creates, and answered by the CSI controller as CreateVolume's
/// `volume_context` for a provisioned volume (the external-provisioner copies it into its PV).
pub fn pv_attributes(
    mv: &MirroredVolume,
    node_names: &[String; 2],
    cfg: &EngineConfig,
) -> BTreeMap<String, String> {
    let name = mv.name_any();
    let mut attributes = BTreeMap::new();
    attributes.insert(ATTR_VOLUME.to_string(), name.clone());
    attributes.insert(
        ATTR_ENGINES.to_string(),
        engines_attribute(mv, node_names, cfg),
    );
    attributes.insert(ATTR_NBD.to_string(), nbd_attribute(mv, node_names));
    attributes.insert(
        ATTR_TAKEOVER_POLICY.to_string(),
        mv.spec.failover.policy.csi_value().to_string(),
    );
    attributes.insert(
        ATTR_FAILOVER_POLICY.to_string(),
        mv.spec.failover.policy.csi_name().to_string(),
    );
    // A read-only stage on the secondary's node reads the secondary only when the volume allows it.
    attributes.insert(
        ATTR_SECONDARY_ACCESS.to_string(),
        mv.spec.secondary_access.attribute().to_string(),
    );
    attributes.insert(
        ATTR_SECONDARY_READ_MODE.to_string(),
        mv.spec.secondary_read_mode.attribute().to_string(),
    );
    let peer_timeout = crate::crd::parse_duration(&mv.spec.failover.peer_timeout)
        .unwrap_or(std::time::Duration::from_secs(30));
    attributes.insert(
        ATTR_PEER_TIMEOUT.to_string(),
        peer_timeout.as_millis().div_ceil(1000).max(1).to_string(),
    );
    attributes
}

/// The PersistentVolume. Cluster-scoped, so no owner reference (a namespaced owner is not allowed): the
/// finalizer deletes it. Reclaim policy Retain for the same reason.
pub fn persistent_volume(
    mv: &MirroredVolume,
    nodes: &[NodeObs; 2],
    cfg: &EngineConfig,
) -> Result<PersistentVolume, InvalidSpec> {
    volume_bytes(mv)?;
    let namespace = mv.namespace().unwrap_or_default();
    let name = mv.name_any();
    let node_names = [nodes[0].name.clone(), nodes[1].name.clone()];
    // Invariant: the PV selects the volume's node label, never node names, so a workload can be
    // scheduled wherever the engines are now, also after a live move (the label moves; the PV's
    // affinity is immutable). Test: plan::tests::the_pv_follows_the_volumes_node_label.
    let (label, value) = node_label(mv);
    let attributes = pv_attributes(mv, &node_names, cfg);
    // The owner labels are what a later pass checks before adopting an existing PV of this name.
    let pv_labels = labels(mv);
    let filesystem = mv.spec.volume_mode == crate::crd::VolumeMode::Filesystem;
    Ok(PersistentVolume {
        metadata: ObjectMeta {
            name: Some(names::pv(&namespace, &name)),
            labels: Some(pv_labels),
            ..Default::default()
        },
        spec: Some(PersistentVolumeSpec {
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            capacity: Some(BTreeMap::from([(
                "storage".to_string(),
                Quantity(mv.spec.size.clone()),
            )])),
            claim_ref: mv.spec.claim.as_ref().map(|c| ObjectReference {
                namespace: Some(namespace.clone()),
                name: Some(c.name.clone()),
                kind: Some("PersistentVolumeClaim".into()),
                api_version: Some("v1".into()),
                ..Default::default()
            }),
            csi: Some(CSIPersistentVolumeSource {
                driver: CSI_DRIVER.into(),
                volume_handle: format!("{namespace}/{name}"),
                fs_type: filesystem.then(|| mv.spec.fs_type.as_str().to_string()),
                volume_attributes: Some(attributes),
                node_stage_secret_ref: Some(SecretReference {
                    name: Some(csi_secret_name(mv)),
                    namespace: Some(cfg.namespace.clone()),
                }),
                ..Default::default()
            }),
            node_affinity: Some(VolumeNodeAffinity {
                required: Some(NodeSelector {
                    node_selector_terms: vec![NodeSelectorTerm {
                        match_expressions: Some(vec![NodeSelectorRequirement {
                            key: label,
                            operator: "In".into(),
                            values: Some(vec![value]),
                        }]),
                        ..Default::default()
                    }],
                }),
            }),
            persistent_volume_reclaim_policy: Some("Retain".into()),
            storage_class_name: Some(String::new()),
            volume_mode: Some(mv.spec.volume_mode.as_str().into()),
            ..Default::default()
        }),
        status: None,
    })
}

/// The claim of `spec.claim`, pre-bound to the PV (empty StorageClass: no provisioner involved).
pub fn claim(mv: &MirroredVolume) -> Option<PersistentVolumeClaim> {
    let c = mv.spec.claim.as_ref()?;
    Some(PersistentVolumeClaim {
        // The one object in the workload's namespace: owned by the volume there.
        metadata: ObjectMeta {
            name: Some(c.name.clone()),
            namespace: mv.namespace(),
            labels: Some(labels(mv)),
            owner_references: mv.controller_owner_ref(&()).map(|o| vec![o]),
            ..Default::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".to_string(),
                    Quantity(mv.spec.size.clone()),
                )])),
                ..Default::default()
            }),
            storage_class_name: Some(String::new()),
            volume_mode: Some(mv.spec.volume_mode.as_str().into()),
            volume_name: Some(names::pv(
                &mv.namespace().unwrap_or_default(),
                &mv.name_any(),
            )),
            ..Default::default()
        }),
        status: None,
    })
}

/// Bytes an engine needs for its own files: the volume, the journal and slack for meta/tables/overlay.
pub fn engine_pvc_bytes(mv: &MirroredVolume) -> Result<u64, InvalidSpec> {
    let journal = match &mv.spec.replication.journal_size {
        Some(j) => parse_quantity(j).ok_or_else(|| {
            InvalidSpec::new(format!(
                "replication.journalSize {j:?} is not a binary quantity"
            ))
        })?,
        None => DEFAULT_JOURNAL,
    };
    Ok(volume_bytes(mv)?
        .saturating_add(journal)
        .saturating_add(ENGINE_PVC_SLACK))
}

/// An engine's own PVC (StorageClass storage).
pub fn engine_pvc(
    mv: &MirroredVolume,
    slot: Slot,
    class: &str,
    cfg: &EngineConfig,
) -> Result<PersistentVolumeClaim, InvalidSpec> {
    engine_pvc_at(mv, slot, 0, class, cfg)
}

/// The PVC of a slot's instance `generation`: the first one's size, class and owner labels, its
/// `tandem.dev/slot` naming the instance (as its pod's does).
pub fn engine_pvc_at(
    mv: &MirroredVolume,
    slot: Slot,
    generation: u32,
    class: &str,
    cfg: &EngineConfig,
) -> Result<PersistentVolumeClaim, InvalidSpec> {
    let bytes = engine_pvc_bytes(mv)?;
    Ok(PersistentVolumeClaim {
        metadata: meta(
            names::engine_pvc_at(&key(mv), slot, generation),
            instance_labels(mv, slot, generation),
            cfg,
        ),
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".to_string(),
                    Quantity(format!("{}Mi", bytes.div_ceil(1 << 20))),
                )])),
                ..Default::default()
            }),
            storage_class_name: Some(class.to_string()),
            ..Default::default()
        }),
        status: None,
    })
}

/// Everything to create or apply in one reconcile.
#[derive(Clone, Debug, Default)]
pub struct Desired {
    /// The token Secret, when missing.
    pub secret: Option<Secret>,
    /// Engine PVCs that are missing.
    pub engine_pvcs: Vec<PersistentVolumeClaim>,
    /// Both Services (applied every time).
    pub services: Vec<Service>,
    /// The engines' PodDisruptionBudget (applied every time, right after the Services).
    pub budget: Option<k8s_openapi::api::policy::v1::PodDisruptionBudget>,
    /// Engine pods to create (missing ones, not being replaced this round).
    pub pods: Vec<Pod>,
    /// The PV, when missing.
    pub pv: Option<PersistentVolume>,
    /// New PV capacity when the volume grew.
    pub pv_capacity: Option<String>,
    /// The claim, when asked for and missing.
    pub claim: Option<PersistentVolumeClaim>,
    /// Certificates to (re-)issue: missing, from another CA, or with less than a third left.
    pub certs: CertPlan,
}

/// Which certificate Secrets to mint this pass (minting is the act step's: keys are random).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CertPlan {
    /// Each slot's engine TLS Secret.
    pub engine: [bool; 2],
    /// The CSI Secret (both nodes' certificates at once).
    pub csi: bool,
}

impl CertPlan {
    pub fn any(&self) -> bool {
        self.csi || self.engine.iter().any(|e| *e)
    }
}

/// Computes the desired objects. `skip_pods` are slots whose pod is being deleted this round.
pub fn desired(
    mv: &MirroredVolume,
    status: &MirroredVolumeStatus,
    observed: &Observed,
    cfg: &EngineConfig,
    token: Option<&str>,
    skip_pods: &[Slot],
) -> Result<Desired, InvalidSpec> {
    // Names and addresses follow the status of this pass: a live move's cutover changes a slot's
    // engine instance in it.
    let current = MirroredVolume {
        status: Some(status.clone()),
        ..mv.clone()
    };
    let mv = &current;
    let bytes = volume_bytes(mv)?;
    validate(mv, cfg)?;
    // Invariant: nothing is created or changed for a volume whose PV or objects belong to another
    // volume (tests `controller::tests::a_foreign_pv_is_not_adopted`, `a_key_collision_is_refused`).
    if let Some(conflict) = &observed.conflict {
        return Err(conflict.clone());
    }
    let mut out = Desired::default();
    if !observed.secret_exists {
        if let Some(t) = token {
            out.secret = Some(token_secret(mv, t, cfg));
        }
    }
    if let Some(class) = &mv.spec.engine_storage.storage_class_name {
        for slot in Slot::BOTH {
            if !observed.engine_pvcs[slot.index()] {
                let g = generation(Some(status), slot);
                out.engine_pvcs
                    .push(engine_pvc_at(mv, slot, g, class, cfg)?);
            }
        }
        // A live move's new engine gets its own claim while Preparing, only once it was seen absent:
        // an earlier attempt's claim of that name is never applied over (it would look fresh).
        if let Some(m) = status.moving.as_ref().filter(|m| {
            m.phase == crate::crd::MovePhase::Preparing && observed.moving.pvc == MovePvc::Absent
        }) {
            let mut pvc = engine_pvc_at(mv, m.slot, m.generation, class, cfg)?;
            pvc.metadata.annotations = Some(BTreeMap::from([(
                MOVE_ANNOTATION.to_string(),
                m.started_at.clone().unwrap_or_default(),
            )]));
            out.engine_pvcs.push(pvc);
        }
    }
    out.services = Slot::BOTH
        .iter()
        .map(|s| engine_service(mv, *s, cfg))
        .collect();
    // A live move's new engine: its Service until the cutover makes it the slot's, its pod while
    // it starts (created once: a pod lost later fails the move, never comes back by itself).
    if let Some(m) = status.moving.as_ref() {
        use crate::crd::MovePhase;
        if matches!(
            m.phase,
            MovePhase::Starting | MovePhase::Copying | MovePhase::CuttingOver
        ) {
            out.services
                .push(engine_service_at(mv, m.slot, m.generation, cfg));
        }
        if m.phase == MovePhase::Starting && observed.moving.pod.is_none() {
            out.pods.push(engine_pod_at(
                mv,
                m.slot,
                m.generation,
                EngineRole::Secondary,
                &m.to,
                cfg,
            )?);
        }
    }
    out.budget = Some(crate::disruption::budget(mv, cfg));
    let renew = |n| needs_cert(n, observed.now, cfg.cert_validity);
    out.certs = CertPlan {
        engine: observed.certs.engine.map(renew),
        csi: renew(observed.certs.csi),
    };
    let primary = primary_slot(status);
    for slot in Slot::BOTH {
        if observed.pod(slot).is_none() && !skip_pods.contains(&slot) {
            let role = if slot == primary {
                EngineRole::Primary
            } else {
                EngineRole::Secondary
            };
            out.pods
                .push(engine_pod(mv, slot, role, &observed.node(slot).name, cfg)?);
        }
    }
    // A provisioned volume's PV and claim are the external-provisioner's (and its growth the
    // external-resizer's): the operator creates neither (test
    // `controller::tests::a_provisioned_volume_gets_no_pv_and_its_named_stage_secret`).
    if mv.spec.persistent_volume_name.is_none() {
        match &observed.pv {
            None => out.pv = Some(persistent_volume(mv, &observed.nodes, cfg)?),
            Some(pv) => {
                // Invariant: the PV never shows more than both engines serve (test
                // `plan::tests::desired_creates_only_what_is_missing`).
                let current = pv.capacity.as_deref().and_then(parse_quantity).unwrap_or(0);
                let served = bytes.min(status.capacity_bytes);
                if current < served {
                    out.pv_capacity = Some(if served == bytes {
                        mv.spec.size.clone()
                    } else {
                        served.to_string()
                    });
                }
            }
        }
        if mv.spec.claim.is_some() && !observed.claim_exists {
            out.claim = claim(mv);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        crd::{FailoverPolicy, FsType, Placement, VolumeMode},
        observed::PvObs,
    };
    use k8s_openapi::jiff::Timestamp;

    fn node(name: &str, ready: bool) -> NodeObs {
        NodeObs {
            name: name.into(),
            exists: true,
            ready,
            out_of_service: false,
            labeled: true,
            not_ready_since: None,
            unschedulable: false,
        }
    }

    fn observed() -> Observed {
        Observed {
            now: Timestamp::from_second(1_800_000_000).unwrap(),
            nodes: [node("n1", true), node("n2", true)],
            pods: [None, None],
            engines: [None, None],
            secret_exists: false,
            token: None,
            pv: None,
            claim_exists: false,
            engine_pvcs: [false, false],
            workloads: vec![],
            attachments: vec![],
            witness: crate::witness::LeaseClock::long_ago(10_000),
            certs: Default::default(),
            conflict: None,
            moving: Default::default(),
        }
    }

    fn args(pod: &Pod) -> Vec<String> {
        pod.spec.as_ref().unwrap().containers[0]
            .args
            .clone()
            .unwrap()
    }

    fn flag(pod: &Pod, name: &str) -> Option<String> {
        let a = args(pod);
        a.iter().position(|x| x == name).map(|i| a[i + 1].clone())
    }

    fn key_of_test() -> String {
        names::key("default", "data")
    }

    #[test]
    fn names_are_deterministic() {
        let key = names::key("default", "data");
        assert_eq!(key, names::key("default", "data"));
        assert!(key.starts_with("default-data-"), "{key}");
        assert_eq!(names::engine(&key, Slot::B), format!("{key}-engine-b"));
        assert_eq!(names::secret(&key), format!("{key}-token"));
        assert_eq!(names::tls_secret(&key, Slot::A), format!("{key}-tls-a"));
        assert_eq!(names::csi_secret(&key), format!("{key}-csi"));
        assert_eq!(names::pv("ns", "data"), "tandem.ns.data");
        assert_eq!(
            names::engine_pvc(&key, Slot::A),
            format!("{key}-engine-a-data")
        );
        assert_eq!(
            engine_address(&MirroredVolume::test(), Slot::A, &EngineConfig::default()),
            format!("{key}-engine-a.tandem-system.svc.cluster.local:9500")
        );
    }

    /// A DNS-1035 label: lowercase alphanumerics and '-', a letter first, no '-' last.
    fn dns_1035(s: &str) -> bool {
        s.len() <= 63
            && s.starts_with(|c: char| c.is_ascii_lowercase())
            && !s.ends_with('-')
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    }

    #[test]
    fn names_cannot_collide_across_namespaces() {
        // The pair: the old `tandem-{ns}-{name}` gave both `tandem-a-b-c`.
        assert_ne!(names::pv("a-b", "c"), names::pv("a", "b-c"));
        assert_ne!(names::key("a-b", "c"), names::key("a", "b-c"));
        let mut one = MirroredVolume::test();
        one.metadata.namespace = Some("a-b".into());
        one.metadata.name = Some("c".into());
        let mut two = one.clone();
        two.metadata.namespace = Some("a".into());
        two.metadata.name = Some("b-c".into());
        let cfg = EngineConfig::default();
        let pv = |mv: &MirroredVolume| persistent_volume(mv, &observed().nodes, &cfg).unwrap();
        assert_ne!(pv(&one).metadata.name, pv(&two).metadata.name);
        assert_ne!(
            engine_service(&one, Slot::A, &cfg).metadata.name,
            engine_service(&two, Slot::A, &cfg).metadata.name
        );
        // Longest names still make valid, short keys; digits first get a letter.
        let long = "x".repeat(63);
        for (ns, name) in [(long.as_str(), long.as_str()), ("0ns", "1.a"), ("a", "b")] {
            let key = names::key(ns, name);
            assert!(dns_1035(&key), "{key}");
            assert!(dns_1035(&names::engine(&key, Slot::A)));
            assert!(names::host_dir(&key).len() + "/nbd.sock".len() < 108);
        }
        assert_ne!(
            names::key(&long, &long),
            names::key(&long, &format!("{}y", &long[..62]))
        );
    }

    #[test]
    fn host_path_outside_the_root_is_refused() {
        let cfg = EngineConfig::default();
        let mut mv = MirroredVolume::test();
        for bad in [
            "/",
            "/etc",
            "/var/lib/tandem-other",
            "/var/lib/tandem/../../etc",
            "var/lib/tandem",
        ] {
            mv.spec.engine_storage.host_path = Some(bad.into());
            let err = validate(&mv, &cfg).unwrap_err();
            assert_eq!(err.reason, HOST_PATH_NOT_ALLOWED, "{bad}");
            assert!(err.message.contains(bad), "{}", err.message);
            assert!(err.message.contains("/var/lib/tandem"), "{}", err.message);
            // Nothing is created for it: no pod, no objects at all.
            assert!(engine_pod(&mv, Slot::A, EngineRole::Primary, "n1", &cfg).is_err());
            let d = desired(
                &mv,
                &MirroredVolumeStatus::default(),
                &observed(),
                &cfg,
                Some("t"),
                &[],
            );
            assert_eq!(d.unwrap_err().reason, HOST_PATH_NOT_ALLOWED);
        }
        for good in [
            "/var/lib/tandem",
            "/var/lib/tandem/",
            "/var/lib/tandem/./fast//disks",
        ] {
            mv.spec.engine_storage.host_path = Some(good.into());
            assert!(validate(&mv, &cfg).is_ok(), "{good}");
        }
        mv.spec.engine_storage.host_path = Some("/var/lib/tandem/./fast//disks/".into());
        let pod = engine_pod(&mv, Slot::A, EngineRole::Primary, "n1", &cfg).unwrap();
        let data = &pod.spec.as_ref().unwrap().volumes.as_ref().unwrap()[0];
        assert_eq!(
            data.host_path.as_ref().unwrap().path,
            format!(
                "/var/lib/tandem/fast/disks/default/data-{}",
                mv.uid().unwrap()
            )
        );
        let mut long = MirroredVolume::test();
        long.metadata.name = Some("x".repeat(64));
        assert_eq!(validate(&long, &cfg).unwrap_err().reason, "InvalidSpec");
    }

    #[test]
    fn ownership_is_read_from_the_labels() {
        let mv = MirroredVolume::test();
        assert_eq!(owned_by(Some(&labels(&mv)), &mv), Ok(()));
        assert!(owned_by(None, &mv)
            .unwrap_err()
            .contains("no tandem.dev owner labels"));
        let mut other = mv.clone();
        other.metadata.namespace = Some("elsewhere".into());
        assert!(owned_by(Some(&labels(&other)), &mv)
            .unwrap_err()
            .contains("elsewhere/data"));
        let mut earlier = mv.clone();
        earlier.metadata.uid = Some("older".into());
        assert!(owned_by(Some(&labels(&earlier)), &mv)
            .unwrap_err()
            .contains("uid older"));
        // A PV labelled before uids were recorded is still ours by namespace and name.
        let mut no_uid = labels(&mv);
        no_uid.remove(UID_LABEL);
        assert_eq!(owned_by(Some(&no_uid), &mv), Ok(()));
    }

    #[test]
    fn every_object_but_the_claim_is_in_the_operator_namespace() {
        let mut mv = MirroredVolume::test().with_claim("app-data");
        mv.spec.engine_storage.host_path = None;
        mv.spec.engine_storage.storage_class_name = Some("local-path".into());
        let cfg = EngineConfig::default();
        let d = desired(
            &mv,
            &MirroredVolumeStatus::default(),
            &observed(),
            &cfg,
            Some("t"),
            &[],
        )
        .unwrap();
        let mut metas: Vec<&ObjectMeta> = vec![&d.secret.as_ref().unwrap().metadata];
        metas.extend(d.engine_pvcs.iter().map(|p| &p.metadata));
        metas.extend(d.services.iter().map(|p| &p.metadata));
        metas.extend(d.pods.iter().map(|p| &p.metadata));
        metas.push(&d.budget.as_ref().unwrap().metadata);
        assert_eq!(metas.len(), 8);
        for m in metas {
            assert_eq!(
                m.namespace.as_deref(),
                Some("tandem-system"),
                "{:?}",
                m.name
            );
            assert!(m.owner_references.is_none(), "{:?}", m.name);
            let l = m.labels.as_ref().unwrap();
            assert_eq!(l[NAMESPACE_LABEL], "default");
            assert_eq!(l[NAME_LABEL], "data");
            assert_eq!(l[UID_LABEL], "0c6a0d1e-0000-4000-8000-000000000001");
        }
        let claim = d.claim.unwrap();
        assert_eq!(claim.metadata.namespace.as_deref(), Some("default"));
        assert!(d.certs.any(), "a new volume gets its certificates");
    }

    #[test]
    fn no_nbd_listener_and_no_nbd_port_anywhere() {
        let mv = MirroredVolume::test().with_claim("app-data");
        let objects = render_initial(&mv, &EngineConfig::default()).unwrap();
        for o in &objects {
            let text = o.to_string();
            assert!(!text.contains("10809"), "{text}");
            assert!(!text.contains("\"nbd\""), "an nbd port: {text}");
            if o["kind"] == "Pod" {
                let args: Vec<&str> = o["spec"]["containers"][0]["args"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|a| a.as_str().unwrap())
                    .collect();
                let at = args.iter().position(|a| *a == "--nbd-listen").unwrap();
                assert_eq!(args[at + 1], "off");
                assert!(args.contains(&"--nbd-pinned-exports-only"));
            }
            if o["kind"] == "Service" {
                let ports: Vec<&str> = o["spec"]["ports"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|p| p["name"].as_str().unwrap())
                    .collect();
                assert_eq!(ports, ["grpc", "metrics"]);
            }
        }
    }

    #[test]
    fn sizes_are_validated() {
        let mut mv = MirroredVolume::test();
        assert_eq!(volume_bytes(&mv), Ok(1 << 30));
        for bad in ["512Ki", "1000000", "abc"] {
            mv.spec.size = bad.into();
            assert!(volume_bytes(&mv).is_err(), "{bad}");
        }
        mv.spec.size = "2Gi".into();
        mv.spec.replication.journal_size = Some("64Mi".into());
        assert_eq!(
            engine_pvc_bytes(&mv),
            Ok((2 << 30) + (64 << 20) + (256 << 20))
        );
    }

    #[test]
    fn placement_resolution() {
        let mv = MirroredVolume::test();
        let status = MirroredVolumeStatus::default();
        assert_eq!(
            fixed_nodes(&mv, &status).unwrap(),
            Some(["n1".to_string(), "n2".to_string()])
        );

        // Recorded nodes win over the spec (placement is immutable, selector choices are sticky).
        let recorded = MirroredVolumeStatus {
            nodes: vec!["x".into(), "y".into()],
            ..Default::default()
        };
        assert_eq!(
            fixed_nodes(&mv, &recorded).unwrap(),
            Some(["x".to_string(), "y".to_string()])
        );

        let mut sel = MirroredVolume::test();
        sel.spec.placement = Placement {
            nodes: None,
            node_selector: Some(BTreeMap::from([(
                "tandem.dev/storage".to_string(),
                "true".to_string(),
            )])),
            ..Default::default()
        };
        // A selector leaves the choice to `placement::place` (tested there).
        assert_eq!(fixed_nodes(&sel, &status).unwrap(), None);
        assert_eq!(
            selector_string(sel.spec.placement.node_selector.as_ref().unwrap()),
            "tandem.dev/storage=true"
        );

        let mut same = MirroredVolume::test();
        same.spec.placement.nodes = Some(vec!["n1".into(), "n1".into()]);
        assert!(fixed_nodes(&same, &status).is_err());
    }

    #[test]
    fn engine_pod_carries_the_cli_contract() {
        let mut mv = MirroredVolume::test();
        mv.spec.replication.mode = ReplicationMode::Sync;
        let pod = engine_pod(
            &mv,
            Slot::B,
            EngineRole::Secondary,
            "n2",
            &EngineConfig::default(),
        )
        .unwrap();
        assert_eq!(args(&pod)[0], "serve");
        assert_eq!(flag(&pod, "--volume").unwrap(), "data");
        assert_eq!(flag(&pod, "--data").unwrap(), "/var/lib/tandem/data.img");
        assert_eq!(flag(&pod, "--state-dir").unwrap(), "/var/lib/tandem/state");
        assert_eq!(flag(&pod, "--metrics-listen").unwrap(), "0.0.0.0:9501");
        assert_eq!(flag(&pod, "--log-format").unwrap(), "json");
        // NBD on the volume's socket only, pinned exports only; TLS from its Secret; the node's name.
        assert_eq!(flag(&pod, "--nbd-listen").unwrap(), "off");
        assert_eq!(flag(&pod, "--nbd-socket").unwrap(), "/run/tandem/nbd.sock");
        assert!(args(&pod).contains(&"--nbd-pinned-exports-only".to_string()));
        assert_eq!(flag(&pod, "--tls-dir").unwrap(), "/etc/tandem/tls");
        assert_eq!(flag(&pod, "--node-name").unwrap(), "$(NODE_NAME)");
        let env = &pod.spec.as_ref().unwrap().containers[0]
            .env
            .as_ref()
            .unwrap()[0];
        assert_eq!(env.name, "NODE_NAME");
        assert_eq!(
            env.value_from
                .as_ref()
                .unwrap()
                .field_ref
                .as_ref()
                .unwrap()
                .field_path,
            "spec.nodeName"
        );
        assert_eq!(
            flag(&pod, "--token-file").unwrap(),
            "/etc/tandem/token/token"
        );
        assert_eq!(flag(&pod, "--replication").unwrap(), "sync");
        assert_eq!(flag(&pod, "--lease-ms").unwrap(), "10000");
        assert_eq!(flag(&pod, "--role").unwrap(), "secondary");
        assert_eq!(
            flag(&pod, "--peer").unwrap(),
            format!(
                "{}-engine-a.tandem-system.svc.cluster.local:9500",
                key_of_test()
            )
        );
        // Optional flags only when asked for.
        assert_eq!(flag(&pod, "--journal-size"), None);
        assert_eq!(flag(&pod, "--secondary-access"), None);
        mv.spec.replication.journal_size = Some("128Mi".into());
        mv.spec.secondary_access = SecondaryAccess::ReadOnly;
        let pod = engine_pod(
            &mv,
            Slot::B,
            EngineRole::Secondary,
            "n2",
            &EngineConfig::default(),
        )
        .unwrap();
        assert_eq!(
            flag(&pod, "--journal-size").unwrap(),
            (128u64 << 20).to_string()
        );
        assert_eq!(flag(&pod, "--secondary-access").unwrap(), "read-only");
        mv.spec.secondary_access = SecondaryAccess::ReadWrite;
        let rw = engine_pod(
            &mv,
            Slot::B,
            EngineRole::Secondary,
            "n2",
            &EngineConfig::default(),
        )
        .unwrap();
        assert_eq!(flag(&rw, "--secondary-access").unwrap(), "read-write");
        mv.spec.secondary_access = SecondaryAccess::ReadOnly;

        let spec = pod.spec.as_ref().unwrap();
        let labels = pod.metadata.labels.as_ref().unwrap();
        assert_eq!(labels[SLOT_LABEL], "b");
        assert_eq!(labels[VOLUME_LABEL], key_of_test());
        assert!(pod.metadata.owner_references.is_none());
        let volume = |name: &str| {
            spec.volumes
                .as_ref()
                .unwrap()
                .iter()
                .find(|v| v.name == name)
                .unwrap()
                .clone()
        };
        // Both Secrets read-only and 0400; the host directory of the volume at /run/tandem.
        for (name, secret) in [
            ("token", format!("{}-token", key_of_test())),
            ("tls", format!("{}-tls-b", key_of_test())),
        ] {
            let s = volume(name).secret.unwrap();
            assert_eq!(s.secret_name, Some(secret));
            assert_eq!(s.default_mode, Some(0o400));
        }
        let run = volume("run").host_path.unwrap();
        assert_eq!(run.path, format!("/run/tandem/volumes/{}", key_of_test()));
        assert_eq!(run.type_.as_deref(), Some("DirectoryOrCreate"));
        let mounts = spec.containers[0].volume_mounts.as_ref().unwrap();
        let mount = |name: &str| mounts.iter().find(|m| m.name == name).unwrap();
        assert_eq!(mount("run").mount_path, "/run/tandem");
        assert_eq!(mount("tls").mount_path, "/etc/tandem/tls");
        assert_eq!(mount("tls").read_only, Some(true));
        assert_eq!(mount("token").read_only, Some(true));
        let ports: Vec<i32> = spec.containers[0]
            .ports
            .as_ref()
            .unwrap()
            .iter()
            .map(|p| p.container_port)
            .collect();
        assert_eq!(ports, [9500, 9501]);
        let sc = spec.containers[0].security_context.as_ref().unwrap();
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(spec.automount_service_account_token, Some(false));
    }

    #[test]
    fn data_dirs_carry_the_uid_and_old_volumes_keep_theirs() {
        let cfg = EngineConfig::default();
        let mv = MirroredVolume::test();
        let fresh = format!("/var/lib/tandem/default/data-{}", mv.uid().unwrap());
        assert_eq!(host_data_dir(&mv, None, &cfg).unwrap(), Some(fresh.clone()));
        // The same name again, another uid: another directory.
        let mut again = MirroredVolume::test();
        again.metadata.uid = Some("99999999-0000-4000-8000-000000000002".into());
        assert_ne!(
            host_data_dir(&again, None, &cfg).unwrap(),
            Some(fresh.clone())
        );
        // Placed by an older operator (nodes recorded, no dataDir): the old path, data kept.
        let old = MirroredVolumeStatus {
            nodes: vec!["n1".into(), "n2".into()],
            ..Default::default()
        };
        assert_eq!(
            host_data_dir(&mv, Some(&old), &cfg).unwrap().as_deref(),
            Some("/var/lib/tandem/default/data")
        );
        // Recorded: used, and the pod mounts it.
        let recorded = MirroredVolumeStatus {
            data_dir: Some(fresh.clone()),
            ..old.clone()
        };
        assert_eq!(
            host_data_dir(&mv, Some(&recorded), &cfg).unwrap(),
            Some(fresh.clone())
        );
        let pod = engine_pod(
            &mv.clone().with_status(recorded),
            Slot::A,
            EngineRole::Primary,
            "n1",
            &cfg,
        )
        .unwrap();
        let data = &pod.spec.as_ref().unwrap().volumes.as_ref().unwrap()[0];
        assert_eq!(data.host_path.as_ref().unwrap().path, fresh);
        // A recorded dir elsewhere (someone edited status) is refused, not mounted.
        for bad in [
            "/etc",
            "/var/lib/tandem/default/other",
            "/var/lib/tandem/default/data-x/../../y",
        ] {
            let edited = MirroredVolumeStatus {
                data_dir: Some(bad.into()),
                ..old.clone()
            };
            assert!(host_data_dir(&mv, Some(&edited), &cfg).is_err(), "{bad}");
        }
    }

    /// Only a primary on the snapshot's node seeds, and only until the restore is done.
    #[test]
    fn only_the_restoring_primary_seeds() {
        let cfg = EngineConfig::default();
        let restore = crate::crd::RestoreStatus {
            volume: "src".into(),
            snapshot: "s1".into(),
            node: "n1".into(),
            ..Default::default()
        };
        let with = |r: crate::crd::RestoreStatus| {
            MirroredVolume::test().with_status(MirroredVolumeStatus {
                restore: Some(r),
                ..Default::default()
            })
        };
        let seeds = |mv: &MirroredVolume, role, node: &str| {
            engine_pod(mv, Slot::A, role, node, &cfg)
                .unwrap()
                .spec
                .unwrap()
                .init_containers
                .is_some()
        };
        assert!(seeds(&with(restore.clone()), EngineRole::Primary, "n1"));
        assert!(!seeds(&with(restore.clone()), EngineRole::Secondary, "n1"));
        assert!(!seeds(&with(restore.clone()), EngineRole::Primary, "n2"));
        let done = crate::crd::RestoreStatus {
            done: true,
            ..restore
        };
        assert!(
            !seeds(&with(done), EngineRole::Primary, "n1"),
            "a restored volume never seeds again"
        );
        assert_eq!(
            tandem_api::contract::snapshot_export("v", "s"),
            "v@snapshot/s"
        );
    }

    #[test]
    fn engine_storage_variants() {
        let mut mv = MirroredVolume::test();
        mv.spec.engine_storage.host_path = Some("/var/lib/tandem/".into());
        let pod = engine_pod(
            &mv,
            Slot::A,
            EngineRole::Primary,
            "n1",
            &EngineConfig::default(),
        )
        .unwrap();
        let data = &pod.spec.as_ref().unwrap().volumes.as_ref().unwrap()[0];
        let hp = data.host_path.as_ref().unwrap();
        assert_eq!(
            hp.path,
            format!("/var/lib/tandem/default/data-{}", mv.uid().unwrap())
        );
        assert_eq!(hp.type_.as_deref(), Some("DirectoryOrCreate"));

        mv.spec.engine_storage.host_path = None;
        mv.spec.engine_storage.storage_class_name = Some("local-path".into());
        let pod = engine_pod(
            &mv,
            Slot::A,
            EngineRole::Primary,
            "n1",
            &EngineConfig::default(),
        )
        .unwrap();
        let data = &pod.spec.as_ref().unwrap().volumes.as_ref().unwrap()[0];
        assert_eq!(
            data.persistent_volume_claim.as_ref().unwrap().claim_name,
            format!("{}-engine-a-data", key_of_test())
        );
        let pvc = engine_pvc(&mv, Slot::A, "local-path", &EngineConfig::default()).unwrap();
        let req = &pvc
            .spec
            .as_ref()
            .unwrap()
            .resources
            .as_ref()
            .unwrap()
            .requests
            .as_ref()
            .unwrap()["storage"];
        assert_eq!(req.0, "1312Mi");

        mv.spec.engine_storage.storage_class_name = None;
        assert!(engine_pod(
            &mv,
            Slot::A,
            EngineRole::Primary,
            "n1",
            &EngineConfig::default()
        )
        .is_err());
    }

    #[test]
    fn service_selects_one_slot_and_publishes_not_ready() {
        let svc = engine_service(&MirroredVolume::test(), Slot::A, &EngineConfig::default());
        assert_eq!(svc.metadata.namespace.as_deref(), Some("tandem-system"));
        let spec = svc.spec.unwrap();
        let selector = spec.selector.unwrap();
        assert_eq!(selector[SLOT_LABEL], "a");
        assert_eq!(selector[VOLUME_LABEL], key_of_test());
        assert_eq!(spec.publish_not_ready_addresses, Some(true));
        let ports: Vec<i32> = spec.ports.unwrap().iter().map(|p| p.port).collect();
        assert_eq!(ports, [9500, 9501], "gRPC and metrics only, no NBD");
    }

    #[test]
    fn persistent_volume_matches_the_csi_contract() {
        let mut mv = MirroredVolume::test().with_claim("app-data");
        mv.spec.failover.policy = FailoverPolicy::ForcePromote;
        mv.spec.fs_type = FsType::Xfs;
        let pv = persistent_volume(&mv, &observed().nodes, &EngineConfig::default()).unwrap();
        let spec = pv.spec.unwrap();
        let csi = spec.csi.unwrap();
        assert_eq!(csi.driver, "csi.tandem.dev");
        assert_eq!(csi.volume_handle, "default/data");
        assert_eq!(csi.fs_type.as_deref(), Some("xfs"));
        let attrs = csi.volume_attributes.unwrap();
        assert_eq!(attrs[ATTR_VOLUME], "data");
        assert_eq!(attrs[ATTR_TAKEOVER_POLICY], "force");
        assert_eq!(attrs[ATTR_FAILOVER_POLICY], "ForcePromote");
        assert_eq!(attrs[ATTR_PEER_TIMEOUT], "30");
        assert_eq!(attrs[ATTR_SECONDARY_ACCESS], "None");
        assert_eq!(attrs[ATTR_SECONDARY_READ_MODE], "Snapshot");
        let k = key_of_test();
        assert_eq!(
            attrs[ATTR_NBD],
            format!(
                "n1=unix:/run/tandem/volumes/{k}/nbd.sock,n2=unix:/run/tandem/volumes/{k}/nbd.sock"
            )
        );
        assert_eq!(
            attrs[ATTR_ENGINES],
            format!("n1={k}-engine-a.tandem-system.svc.cluster.local:9500,n2={k}-engine-b.tandem-system.svc.cluster.local:9500")
        );
        let secret_ref = csi.node_stage_secret_ref.unwrap();
        assert_eq!(secret_ref.name, Some(format!("{k}-csi")));
        assert_eq!(secret_ref.namespace.as_deref(), Some("tandem-system"));
        assert_eq!(pv.metadata.name.as_deref(), Some("tandem.default.data"));
        assert_eq!(pv.metadata.labels.as_ref().unwrap()[NAME_LABEL], "data");
        assert_eq!(spec.storage_class_name.as_deref(), Some(""));
        assert_eq!(
            spec.persistent_volume_reclaim_policy.as_deref(),
            Some("Retain")
        );
        assert_eq!(spec.claim_ref.unwrap().name.as_deref(), Some("app-data"));
        let term = &spec
            .node_affinity
            .unwrap()
            .required
            .unwrap()
            .node_selector_terms[0];
        assert_eq!(
            term.match_expressions.as_ref().unwrap()[0]
                .values
                .as_deref(),
            Some(&[key_of_test()][..])
        );
        assert!(pv.metadata.owner_references.is_none());

        mv.spec.volume_mode = VolumeMode::Block;
        let pv = persistent_volume(&mv, &observed().nodes, &EngineConfig::default()).unwrap();
        let spec = pv.spec.unwrap();
        assert_eq!(spec.volume_mode.as_deref(), Some("Block"));
        assert_eq!(spec.csi.unwrap().fs_type, None);
    }

    /// The PV names no node: it selects the volume's node label, which the operator moves with the
    /// engines, so its (immutable) affinity stays right after a live move.
    #[test]
    fn the_pv_follows_the_volumes_node_label() {
        let mv = MirroredVolume::test();
        let pv = persistent_volume(&mv, &observed().nodes, &EngineConfig::default()).unwrap();
        let terms = pv.spec.unwrap().node_affinity.unwrap().required.unwrap();
        let req = &terms.node_selector_terms[0]
            .match_expressions
            .as_ref()
            .unwrap()[0];
        let (label, value) = node_label(&mv);
        assert_eq!(label, names::node_label("default", "data"));
        assert_eq!(label, format!("tandem.dev/v-{}", key_of_test()));
        let longest = names::node_label(&"n".repeat(63), &"v".repeat(63));
        assert!(longest.len() - "tandem.dev/".len() <= 63, "{longest}");
        assert_eq!(
            (req.key.as_str(), req.operator.as_str()),
            (label.as_str(), "In")
        );
        assert_eq!(req.values.as_deref(), Some(&[value][..]));
        assert_eq!(terms.node_selector_terms.len(), 1);
        assert_ne!(label, names::node_label("default", "other"));
    }

    #[test]
    fn claim_is_prebound_and_classless() {
        assert!(claim(&MirroredVolume::test()).is_none());
        let pvc = claim(&MirroredVolume::test().with_claim("app-data")).unwrap();
        let spec = pvc.spec.unwrap();
        assert_eq!(spec.volume_name.as_deref(), Some("tandem.default.data"));
        assert_eq!(spec.storage_class_name.as_deref(), Some(""));
        assert_eq!(pvc.metadata.namespace.as_deref(), Some("default"));
    }

    #[test]
    fn desired_creates_only_what_is_missing() {
        let mv = MirroredVolume::test().with_claim("app-data");
        let status = MirroredVolumeStatus::default();
        let d = desired(
            &mv,
            &status,
            &observed(),
            &EngineConfig::default(),
            Some("tok"),
            &[],
        )
        .unwrap();
        assert!(d.secret.is_some());
        assert_eq!(d.services.len(), 2);
        let roles: Vec<String> = d.pods.iter().map(|p| flag(p, "--role").unwrap()).collect();
        assert_eq!(roles, ["primary", "secondary"]);
        assert!(d.pv.is_some() && d.claim.is_some());
        assert!(d.engine_pvcs.is_empty());

        let mut o = observed();
        o.secret_exists = true;
        o.claim_exists = true;
        o.pv = Some(PvObs {
            capacity: Some("1Gi".into()),
            claim: None,
            follows_label: true,
        });
        o.pods[1] = Some(crate::observed::PodObs::default());
        let d = desired(
            &mv,
            &status,
            &o,
            &EngineConfig::default(),
            Some("tok"),
            &[Slot::A],
        )
        .unwrap();
        assert!(
            d.secret.is_none() && d.pv.is_none() && d.claim.is_none() && d.pv_capacity.is_none()
        );
        assert!(d.pods.is_empty(), "slot a is being replaced, slot b exists");

        // Growth patches the PV capacity once the engines serve it, not before.
        let mut grown = mv.clone();
        grown.spec.size = "2Gi".into();
        let mut serving = status.clone();
        serving.capacity_bytes = 1 << 30;
        let d = desired(&grown, &serving, &o, &EngineConfig::default(), None, &[]).unwrap();
        assert_eq!(d.pv_capacity, None, "the engines still serve 1Gi");
        serving.capacity_bytes = 3 << 29;
        let d = desired(&grown, &serving, &o, &EngineConfig::default(), None, &[]).unwrap();
        assert_eq!(d.pv_capacity.as_deref(), Some("1610612736"), "half way");
        serving.capacity_bytes = 2 << 30;
        let d = desired(&grown, &serving, &o, &EngineConfig::default(), None, &[]).unwrap();
        assert_eq!(d.pv_capacity.as_deref(), Some("2Gi"));
        // After a takeover to slot b, a recreated slot a is a secondary.
        let mut after = status.clone();
        crate::failover::set_primary(&mut after, &o, Slot::B);
        o.pods = [None, Some(crate::observed::PodObs::default())];
        let d = desired(&mv, &after, &o, &EngineConfig::default(), None, &[]).unwrap();
        assert_eq!(flag(&d.pods[0], "--role").as_deref(), Some("secondary"));
    }

    #[test]
    fn engine_pvcs_with_a_storage_class() {
        let mut mv = MirroredVolume::test();
        mv.spec.engine_storage.host_path = None;
        mv.spec.engine_storage.storage_class_name = Some("local-path".into());
        let mut o = observed();
        o.engine_pvcs = [true, false];
        let d = desired(
            &mv,
            &MirroredVolumeStatus::default(),
            &o,
            &EngineConfig::default(),
            None,
            &[],
        )
        .unwrap();
        assert_eq!(d.engine_pvcs.len(), 1);
        assert_eq!(
            d.engine_pvcs[0].metadata.name,
            Some(format!("{}-engine-b-data", key_of_test()))
        );
        assert!(d.secret.is_none(), "no token given, no secret");
    }
}

/// The objects the operator creates for a new volume, as a user would see them (for `tandem-operator
/// render`): the token Secret (token redacted), the engine TLS Secrets and the CSI Secret (certificates
/// and keys redacted), engine PVCs, Services, the PodDisruptionBudget, both engine pods, the PV and the
/// claim.
/// Nodes are taken from `placement.nodes` (hostnames = node names); a selector placement cannot be
/// rendered offline.
pub fn render_initial(
    mv: &MirroredVolume,
    cfg: &EngineConfig,
) -> Result<Vec<serde_json::Value>, InvalidSpec> {
    let nodes = fixed_nodes(mv, &MirroredVolumeStatus::default())?.ok_or_else(|| {
        InvalidSpec::new(
            "render needs placement.nodes: a nodeSelector is resolved against the cluster's nodes",
        )
    })?;
    let node = |name: &str| NodeObs {
        name: name.to_string(),
        exists: true,
        ready: true,
        out_of_service: false,
        labeled: true,
        not_ready_since: None,
        unschedulable: false,
    };
    let observed = Observed {
        now: k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
        nodes: [node(&nodes[0]), node(&nodes[1])],
        pods: [None, None],
        engines: [None, None],
        secret_exists: false,
        token: Some("<generated-at-creation>".to_string()),
        pv: None,
        claim_exists: false,
        engine_pvcs: [false, false],
        workloads: vec![],
        attachments: vec![],
        witness: crate::witness::LeaseClock::long_ago(10_000),
        certs: Default::default(),
        conflict: None,
        moving: Default::default(),
    };
    let d = desired(
        mv,
        &MirroredVolumeStatus::default(),
        &observed,
        cfg,
        observed.token.as_deref(),
        &[],
    )?;
    let mut out = Vec::new();
    let mut push = |v: Result<serde_json::Value, serde_json::Error>| -> Result<(), InvalidSpec> {
        out.push(v.map_err(|e| InvalidSpec::new(e.to_string()))?);
        Ok(())
    };
    if let Some(s) = &d.secret {
        push(serde_json::to_value(s))?;
    }
    let redacted = Issued {
        cert_pem: "<minted-at-creation>".into(),
        key_pem: "<minted-at-creation>".into(),
        not_after: std::time::SystemTime::UNIX_EPOCH,
    };
    let ca = "<the operator's CA>";
    for slot in Slot::BOTH {
        push(serde_json::to_value(engine_tls_secret(
            mv, slot, cfg, ca, &redacted,
        )))?;
    }
    let leaves: Vec<(String, Issued)> = nodes
        .iter()
        .map(|n| (n.clone(), redacted.clone()))
        .collect();
    let token = observed.token.as_deref().unwrap_or_default();
    push(serde_json::to_value(csi_secret(
        mv, cfg, token, ca, &leaves,
    )))?;
    for p in &d.engine_pvcs {
        push(serde_json::to_value(p))?;
    }
    for s in &d.services {
        push(serde_json::to_value(s))?;
    }
    if let Some(b) = &d.budget {
        push(serde_json::to_value(b))?;
    }
    for p in &d.pods {
        push(serde_json::to_value(p))?;
    }
    if let Some(pv) = &d.pv {
        push(serde_json::to_value(pv))?;
    }
    if let Some(c) = &d.claim {
        push(serde_json::to_value(c))?;
    }
    Ok(out)
}

#[cfg(test)]
mod render_tests {
    use super::*;

    #[test]
    fn renders_every_object_of_a_new_volume() {
        let mv = MirroredVolume::test().with_claim("app-data");
        let objs = render_initial(&mv, &EngineConfig::default()).unwrap();
        let kinds: Vec<&str> = objs.iter().map(|o| o["kind"].as_str().unwrap()).collect();
        assert_eq!(
            kinds,
            [
                "Secret",
                "Secret",
                "Secret",
                "Secret",
                "Service",
                "Service",
                "PodDisruptionBudget",
                "Pod",
                "Pod",
                "PersistentVolume",
                "PersistentVolumeClaim"
            ]
        );
        let mut sel = mv.clone();
        sel.spec.placement.nodes = None;
        sel.spec.placement.node_selector = Some(BTreeMap::new());
        assert!(render_initial(&sel, &EngineConfig::default()).is_err());
    }
}
