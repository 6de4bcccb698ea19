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
        Affinity, CSIPersistentVolumeSource, Capabilities, Container, ContainerPort,
        HostPathVolumeSource, NodeAffinity, NodeSelector, NodeSelectorRequirement,
        NodeSelectorTerm, ObjectReference, PersistentVolume, PersistentVolumeClaim,
        PersistentVolumeClaimSpec, PersistentVolumeClaimVolumeSource, PersistentVolumeSpec, Pod,
        PodSpec, Probe, ResourceRequirements, Secret, SecretReference, SecretVolumeSource,
        SecurityContext, Service, ServicePort, ServiceSpec, TCPSocketAction, Volume, VolumeMount,
        VolumeNodeAffinity, VolumeResourceRequirements,
    },
    apimachinery::pkg::{
        api::resource::Quantity, apis::meta::v1::ObjectMeta, util::intstr::IntOrString,
    },
    ByteString,
};
use kube::{Resource, ResourceExt};

use crate::{
    crd::{
        parse_quantity, EngineRole, MirroredVolume, MirroredVolumeStatus, ReplicationMode,
        SecondaryAccess, Slot, CSI_DRIVER,
    },
    failover::primary_slot,
    observed::{NodeObs, Observed, DISRUPTION_LABEL, ROLE_ANNOTATION, SLOT_LABEL, VOLUME_LABEL},
};

/// Engine ports (DESIGN.md contract).
pub const NBD_PORT: u16 = 10809;
pub const GRPC_PORT: u16 = 9500;
pub const METRICS_PORT: u16 = 9501;

/// PV volume attributes and the token's key: the contract with the CSI plugin.
pub use tandem_api::contract::{
    ATTR_ENGINES, ATTR_FAILOVER_POLICY, ATTR_NBD, ATTR_PEER_TIMEOUT, ATTR_SECONDARY_ACCESS,
    ATTR_TAKEOVER_POLICY, ATTR_VOLUME, SECRET_TOKEN_KEY,
};

/// Where the engine keeps everything inside its pod.
const DATA_MOUNT: &str = "/var/lib/tandem";
const TOKEN_MOUNT: &str = "/etc/tandem/token";
/// Extra room in an engine PVC beyond the volume and journal: meta, tables, overlay headroom.
const ENGINE_PVC_SLACK: u64 = 256 << 20;
/// Journal size assumed for PVC sizing when the spec leaves it to the engine (the engine's default).
const DEFAULT_JOURNAL: u64 = 64 << 20;

/// Settings that come from the operator's deployment, not from the volume.
#[derive(Clone, Debug, PartialEq)]
pub struct EngineConfig {
    pub image: String,
    pub image_pull_policy: Option<String>,
    /// Cluster DNS domain for engine addresses.
    pub cluster_domain: String,
    /// Priority class for engine pods (the chart sets one so engines are not the first to be evicted).
    pub priority_class: Option<String>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            image: "tandem-engine:dev".to_string(),
            image_pull_policy: None,
            cluster_domain: "cluster.local".to_string(),
            priority_class: None,
        }
    }
}

/// Deterministic object names for one volume.
pub mod names {
    use crate::crd::Slot;

    pub fn engine(volume: &str, slot: Slot) -> String {
        format!("{volume}-engine-{}", slot.as_str())
    }
    pub fn secret(volume: &str) -> String {
        format!("{volume}-token")
    }
    pub fn pv(namespace: &str, volume: &str) -> String {
        format!("tandem-{namespace}-{volume}")
    }
    pub fn engine_pvc(volume: &str, slot: Slot) -> String {
        format!("{volume}-engine-{}-data", slot.as_str())
    }
}

/// gRPC address of a slot's engine, through its Service.
pub fn engine_address(mv: &MirroredVolume, slot: Slot, cfg: &EngineConfig) -> String {
    format!(
        "{}.{}.svc.{}:{GRPC_PORT}",
        names::engine(&mv.name_any(), slot),
        mv.namespace().unwrap_or_default(),
        cfg.cluster_domain
    )
}

/// Labels on every object of the volume.
pub fn labels(mv: &MirroredVolume) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/name".to_string(),
            "tandem-engine".to_string(),
        ),
        (
            "app.kubernetes.io/managed-by".to_string(),
            "tandem-operator".to_string(),
        ),
        (VOLUME_LABEL.to_string(), mv.name_any()),
    ])
}

fn slot_labels(mv: &MirroredVolume, slot: Slot) -> BTreeMap<String, String> {
    let mut l = labels(mv);
    l.insert(SLOT_LABEL.to_string(), slot.as_str().to_string());
    l
}

fn meta(mv: &MirroredVolume, name: String, labels: BTreeMap<String, String>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: mv.namespace(),
        labels: Some(labels),
        owner_references: mv.controller_owner_ref(&()).map(|o| vec![o]),
        ..Default::default()
    }
}

/// The spec is invalid in a way the schema cannot express.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidSpec(pub String);

/// Volume size in bytes: a binary quantity, at least 1 MiB and a multiple of 4 KiB.
pub fn volume_bytes(mv: &MirroredVolume) -> Result<u64, InvalidSpec> {
    let bytes = parse_quantity(&mv.spec.size)
        .ok_or_else(|| InvalidSpec(format!("size {:?} is not a binary quantity", mv.spec.size)))?;
    if bytes < (1 << 20) || bytes % 4096 != 0 {
        return Err(InvalidSpec(format!(
            "size {} must be at least 1Mi and a multiple of 4Ki",
            mv.spec.size
        )));
    }
    Ok(bytes)
}

/// Resolves the two nodes: the status keeps them once chosen; otherwise `placement.nodes`, or the first two
/// ready nodes (by name) matching `placement.nodeSelector`.
pub fn choose_nodes(
    mv: &MirroredVolume,
    status: &MirroredVolumeStatus,
    candidates: &[NodeObs],
) -> Result<[String; 2], InvalidSpec> {
    if let [a, b] = status.nodes.as_slice() {
        return Ok([a.clone(), b.clone()]);
    }
    if let Some(nodes) = &mv.spec.placement.nodes {
        return match nodes.as_slice() {
            [a, b] if a != b => Ok([a.clone(), b.clone()]),
            _ => Err(InvalidSpec(
                "placement.nodes must name two distinct nodes".to_string(),
            )),
        };
    }
    if mv.spec.placement.node_selector.is_some() {
        let mut ready: Vec<&NodeObs> = candidates.iter().filter(|n| !n.is_lost()).collect();
        ready.sort_by(|x, y| x.name.cmp(&y.name));
        return match ready.as_slice() {
            [a, b, ..] => Ok([a.name.clone(), b.name.clone()]),
            _ => Err(InvalidSpec(format!(
                "placement.nodeSelector matches {} ready node(s); two are needed",
                ready.len()
            ))),
        };
    }
    Err(InvalidSpec(
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
    let name = names::engine(&mv.name_any(), slot);
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
        "--nbd-listen".into(),
        format!("0.0.0.0:{NBD_PORT}"),
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
        "--replication".into(),
        match mv.spec.replication.mode {
            ReplicationMode::Async => "async".into(),
            ReplicationMode::Sync => "sync".into(),
        },
    ];
    if let Some(journal) = &mv.spec.replication.journal_size {
        let bytes = parse_quantity(journal).ok_or_else(|| {
            InvalidSpec(format!(
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
    if mv.spec.secondary_access == SecondaryAccess::ReadOnly {
        args.push("--secondary-access".into());
        args.push("read-only".into());
    }

    let data_volume = match (
        &mv.spec.engine_storage.host_path,
        &mv.spec.engine_storage.storage_class_name,
    ) {
        (Some(path), _) => Volume {
            name: "data".into(),
            host_path: Some(HostPathVolumeSource {
                path: format!(
                    "{}/{}/{}",
                    path.trim_end_matches('/'),
                    mv.namespace().unwrap_or_default(),
                    mv.name_any()
                ),
                type_: Some("DirectoryOrCreate".into()),
            }),
            ..Default::default()
        },
        (None, Some(_)) => Volume {
            name: "data".into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: names::engine_pvc(&mv.name_any(), slot),
                read_only: None,
            }),
            ..Default::default()
        },
        (None, None) => {
            return Err(InvalidSpec(
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
    let mut pod_labels = slot_labels(mv, slot);
    // Born under the volume's PodDisruptionBudget: the operator lifts it once the pod is an in-sync secondary.
    pod_labels.insert(DISRUPTION_LABEL.to_string(), "false".to_string());
    let mut metadata = meta(mv, name, pod_labels);
    metadata.annotations = Some(BTreeMap::from([(
        ROLE_ANNOTATION.to_string(),
        role.flag().to_string(),
    )]));
    Ok(Pod {
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
                ports: Some(vec![
                    port("nbd", NBD_PORT),
                    port("grpc", GRPC_PORT),
                    port("metrics", METRICS_PORT),
                ]),
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
                Volume {
                    name: "token".into(),
                    secret: Some(SecretVolumeSource {
                        secret_name: Some(names::secret(&mv.name_any())),
                        default_mode: Some(0o400),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            ]),
            ..Default::default()
        }),
        status: None,
    })
}

/// The Service in front of a slot's engine. Not-ready addresses are published: the peer must reach an
/// engine that is starting, and the old primary while it drains.
pub fn engine_service(mv: &MirroredVolume, slot: Slot) -> Service {
    let port = |name: &str, p: u16| ServicePort {
        name: Some(name.into()),
        port: i32::from(p),
        target_port: Some(IntOrString::String(name.into())),
        protocol: Some("TCP".into()),
        ..Default::default()
    };
    let mut selector = BTreeMap::new();
    selector.insert(VOLUME_LABEL.to_string(), mv.name_any());
    selector.insert(SLOT_LABEL.to_string(), slot.as_str().to_string());
    Service {
        metadata: meta(
            mv,
            names::engine(&mv.name_any(), slot),
            slot_labels(mv, slot),
        ),
        spec: Some(ServiceSpec {
            selector: Some(selector),
            ports: Some(vec![
                port("nbd", NBD_PORT),
                port("grpc", GRPC_PORT),
                port("metrics", METRICS_PORT),
            ]),
            publish_not_ready_addresses: Some(true),
            type_: Some("ClusterIP".into()),
            ..Default::default()
        }),
        status: None,
    }
}

/// The token Secret (key `token`), created once; the token itself comes from the caller.
pub fn token_secret(mv: &MirroredVolume, token: &str) -> Secret {
    Secret {
        metadata: meta(mv, names::secret(&mv.name_any()), labels(mv)),
        data: Some(BTreeMap::from([(
            SECRET_TOKEN_KEY.to_string(),
            ByteString(token.as_bytes().to_vec()),
        )])),
        type_: Some("Opaque".into()),
        ..Default::default()
    }
}

/// `node=host:port,node=host:port` for the CSI plugin: the engines' gRPC addresses.
pub fn engines_attribute(mv: &MirroredVolume, nodes: &[String; 2], cfg: &EngineConfig) -> String {
    Slot::BOTH
        .iter()
        .map(|s| format!("{}={}", nodes[s.index()], engine_address(mv, *s, cfg)))
        .collect::<Vec<_>>()
        .join(",")
}

/// `node=host:port,node=host:port`: the engines' NBD addresses (same Services, NBD port).
pub fn nbd_attribute(mv: &MirroredVolume, nodes: &[String; 2], cfg: &EngineConfig) -> String {
    Slot::BOTH
        .iter()
        .map(|s| {
            let grpc = engine_address(mv, *s, cfg);
            let host = grpc.rsplit_once(':').map_or(grpc.as_str(), |(h, _)| h);
            format!("{}={host}:{NBD_PORT}", nodes[s.index()])
        })
        .collect::<Vec<_>>()
        .join(",")
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
    let hostnames: Vec<String> = nodes
        .iter()
        .map(|n| n.hostname.clone().unwrap_or_else(|| n.name.clone()))
        .collect();
    let mut attributes = BTreeMap::new();
    attributes.insert(ATTR_VOLUME.to_string(), name.clone());
    attributes.insert(
        ATTR_ENGINES.to_string(),
        engines_attribute(mv, &node_names, cfg),
    );
    attributes.insert(ATTR_NBD.to_string(), nbd_attribute(mv, &node_names, cfg));
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
        match mv.spec.secondary_access {
            crate::crd::SecondaryAccess::ReadOnly => "ReadOnly",
            crate::crd::SecondaryAccess::None => "None",
        }
        .to_string(),
    );
    let peer_timeout = crate::crd::parse_duration(&mv.spec.failover.peer_timeout)
        .unwrap_or(std::time::Duration::from_secs(30));
    attributes.insert(
        ATTR_PEER_TIMEOUT.to_string(),
        peer_timeout.as_millis().div_ceil(1000).max(1).to_string(),
    );
    let mut pv_labels = labels(mv);
    pv_labels.insert("tandem.dev/namespace".to_string(), namespace.clone());
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
                    name: Some(names::secret(&name)),
                    namespace: Some(namespace.clone()),
                }),
                ..Default::default()
            }),
            node_affinity: Some(VolumeNodeAffinity {
                required: Some(NodeSelector {
                    node_selector_terms: vec![NodeSelectorTerm {
                        match_expressions: Some(vec![NodeSelectorRequirement {
                            key: "kubernetes.io/hostname".into(),
                            operator: "In".into(),
                            values: Some(hostnames),
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
        metadata: meta(mv, c.name.clone(), labels(mv)),
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
            InvalidSpec(format!(
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
) -> Result<PersistentVolumeClaim, InvalidSpec> {
    let bytes = engine_pvc_bytes(mv)?;
    Ok(PersistentVolumeClaim {
        metadata: meta(
            mv,
            names::engine_pvc(&mv.name_any(), slot),
            slot_labels(mv, slot),
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
    let bytes = volume_bytes(mv)?;
    let mut out = Desired::default();
    if !observed.secret_exists {
        if let Some(t) = token {
            out.secret = Some(token_secret(mv, t));
        }
    }
    if let Some(class) = &mv.spec.engine_storage.storage_class_name {
        for slot in Slot::BOTH {
            if !observed.engine_pvcs[slot.index()] {
                out.engine_pvcs.push(engine_pvc(mv, slot, class)?);
            }
        }
    }
    out.services = Slot::BOTH.iter().map(|s| engine_service(mv, *s)).collect();
    out.budget = Some(crate::disruption::budget(mv));
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
    match &observed.pv {
        None => out.pv = Some(persistent_volume(mv, &observed.nodes, cfg)?),
        Some(pv) => {
            let current = pv.capacity.as_deref().and_then(parse_quantity).unwrap_or(0);
            if current < bytes {
                out.pv_capacity = Some(mv.spec.size.clone());
            }
        }
    }
    if mv.spec.claim.is_some() && !observed.claim_exists {
        out.claim = claim(mv);
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
            hostname: Some(format!("host-{name}")),
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

    #[test]
    fn names_are_deterministic() {
        assert_eq!(names::engine("data", Slot::B), "data-engine-b");
        assert_eq!(names::secret("data"), "data-token");
        assert_eq!(names::pv("ns", "data"), "tandem-ns-data");
        assert_eq!(names::engine_pvc("data", Slot::A), "data-engine-a-data");
        assert_eq!(
            engine_address(&MirroredVolume::test(), Slot::A, &EngineConfig::default()),
            "data-engine-a.default.svc.cluster.local:9500"
        );
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
            choose_nodes(&mv, &status, &[]).unwrap(),
            ["n1".to_string(), "n2".to_string()]
        );

        // Recorded nodes win over the spec (placement is immutable, selector choices are sticky).
        let recorded = MirroredVolumeStatus {
            nodes: vec!["x".into(), "y".into()],
            ..Default::default()
        };
        assert_eq!(
            choose_nodes(&mv, &recorded, &[]).unwrap(),
            ["x".to_string(), "y".to_string()]
        );

        let mut sel = MirroredVolume::test();
        sel.spec.placement = Placement {
            nodes: None,
            node_selector: Some(BTreeMap::from([(
                "tandem.dev/storage".to_string(),
                "true".to_string(),
            )])),
        };
        let candidates = [
            node("c", true),
            node("a", false),
            node("b", true),
            node("d", true),
        ];
        assert_eq!(
            choose_nodes(&sel, &status, &candidates).unwrap(),
            ["b".to_string(), "c".to_string()]
        );
        assert!(choose_nodes(&sel, &status, &candidates[..2]).is_err());
        assert_eq!(
            selector_string(sel.spec.placement.node_selector.as_ref().unwrap()),
            "tandem.dev/storage=true"
        );

        let mut same = MirroredVolume::test();
        same.spec.placement.nodes = Some(vec!["n1".into(), "n1".into()]);
        assert!(choose_nodes(&same, &status, &[]).is_err());
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
        assert_eq!(
            flag(&pod, "--token-file").unwrap(),
            "/etc/tandem/token/token"
        );
        assert_eq!(flag(&pod, "--replication").unwrap(), "sync");
        assert_eq!(flag(&pod, "--lease-ms").unwrap(), "10000");
        assert_eq!(flag(&pod, "--role").unwrap(), "secondary");
        assert_eq!(
            flag(&pod, "--peer").unwrap(),
            "data-engine-a.default.svc.cluster.local:9500"
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

        let spec = pod.spec.as_ref().unwrap();
        let labels = pod.metadata.labels.as_ref().unwrap();
        assert_eq!(labels[SLOT_LABEL], "b");
        assert_eq!(labels[VOLUME_LABEL], "data");
        assert_eq!(
            pod.metadata.owner_references.as_ref().unwrap()[0].controller,
            Some(true)
        );
        let token = spec
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .find(|v| v.name == "token")
            .unwrap();
        assert_eq!(
            token.secret.as_ref().unwrap().secret_name.as_deref(),
            Some("data-token")
        );
        let sc = spec.containers[0].security_context.as_ref().unwrap();
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(spec.automount_service_account_token, Some(false));
    }

    #[test]
    fn engine_storage_variants() {
        let mut mv = MirroredVolume::test();
        mv.spec.engine_storage.host_path = Some("/srv/tandem/".into());
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
        assert_eq!(hp.path, "/srv/tandem/default/data");
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
            "data-engine-a-data"
        );
        let pvc = engine_pvc(&mv, Slot::A, "local-path").unwrap();
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
        assert_eq!(req.0, "1344Mi");

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
        let svc = engine_service(&MirroredVolume::test(), Slot::A);
        let spec = svc.spec.unwrap();
        assert_eq!(spec.selector.unwrap()[SLOT_LABEL], "a");
        assert_eq!(spec.publish_not_ready_addresses, Some(true));
        let ports: Vec<i32> = spec.ports.unwrap().iter().map(|p| p.port).collect();
        assert_eq!(ports, [10809, 9500, 9501]);
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
        assert_eq!(
            attrs[ATTR_NBD],
            "n1=data-engine-a.default.svc.cluster.local:10809,n2=data-engine-b.default.svc.cluster.local:10809"
        );
        assert_eq!(
            attrs[ATTR_ENGINES],
            "n1=data-engine-a.default.svc.cluster.local:9500,n2=data-engine-b.default.svc.cluster.local:9500"
        );
        assert_eq!(
            csi.node_stage_secret_ref.unwrap().name.as_deref(),
            Some("data-token")
        );
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
            Some(&["host-n1".to_string(), "host-n2".to_string()][..])
        );
        assert!(pv.metadata.owner_references.is_none());

        mv.spec.volume_mode = VolumeMode::Block;
        let pv = persistent_volume(&mv, &observed().nodes, &EngineConfig::default()).unwrap();
        let spec = pv.spec.unwrap();
        assert_eq!(spec.volume_mode.as_deref(), Some("Block"));
        assert_eq!(spec.csi.unwrap().fs_type, None);
    }

    #[test]
    fn claim_is_prebound_and_classless() {
        assert!(claim(&MirroredVolume::test()).is_none());
        let pvc = claim(&MirroredVolume::test().with_claim("app-data")).unwrap();
        let spec = pvc.spec.unwrap();
        assert_eq!(spec.volume_name.as_deref(), Some("tandem-default-data"));
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

        // Growth patches the PV capacity.
        let mut grown = mv.clone();
        grown.spec.size = "2Gi".into();
        let d = desired(&grown, &status, &o, &EngineConfig::default(), None, &[]).unwrap();
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
            d.engine_pvcs[0].metadata.name.as_deref(),
            Some("data-engine-b-data")
        );
        assert!(d.secret.is_none(), "no token given, no secret");
    }
}

/// The objects the operator creates for a new volume, as a user would see them (for `tandem-operator
/// render`): both engine pods, Services, the Secret (token redacted), engine PVCs, the PV and the claim.
/// Nodes are taken from `placement.nodes` (hostnames = node names); a selector placement cannot be
/// rendered offline.
pub fn render_initial(
    mv: &MirroredVolume,
    cfg: &EngineConfig,
) -> Result<Vec<serde_json::Value>, InvalidSpec> {
    let nodes = choose_nodes(mv, &MirroredVolumeStatus::default(), &[])?;
    let node = |name: &str| NodeObs {
        name: name.to_string(),
        exists: true,
        ready: true,
        out_of_service: false,
        hostname: None,
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
        out.push(v.map_err(|e| InvalidSpec(e.to_string()))?);
        Ok(())
    };
    if let Some(s) = &d.secret {
        push(serde_json::to_value(s))?;
    }
    for p in &d.engine_pvcs {
        push(serde_json::to_value(p))?;
    }
    for s in &d.services {
        push(serde_json::to_value(s))?;
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
                "Service",
                "Service",
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
