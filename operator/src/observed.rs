//! What the reconciler saw of the world, reduced to the facts the pure planning code needs.
//!
//! Building these from API objects is the only place that knows Kubernetes' shapes (`from_pod`, `from_node`);
//! the planning and failover code works on these plain values and is tested without any API server.

use k8s_openapi::{
    api::core::v1::{Node, Pod},
    jiff::Timestamp,
};

use crate::{
    crd::{EngineRole, Slot},
    engine::{EngineError, EngineState, MoveProgress},
    witness::LeaseClock,
};

/// Taint with which an administrator (or a fencing agent) declares a node shut down.
pub const OUT_OF_SERVICE_TAINT: &str = "node.kubernetes.io/out-of-service";
/// Taint the node controller puts on a cordoned node (mirrors `spec.unschedulable`).
pub const UNSCHEDULABLE_TAINT: &str = "node.kubernetes.io/unschedulable";
/// Label on engine pods: `"false"` puts the pod under the volume's PodDisruptionBudget (never evicted),
/// `"true"` lets a drain evict it.
pub const DISRUPTION_LABEL: &str = "tandem.dev/disruption-allowed";
/// Annotation on engine pods: the `--role` the pod was started with.
pub const ROLE_ANNOTATION: &str = "tandem.dev/role";
/// Annotation on a live move's new engine PVC: the move's `startedAt`, which tells it from a claim of
/// the same name left by an earlier attempt.
pub const MOVE_ANNOTATION: &str = "tandem.dev/move-started-at";
/// Label on everything the operator creates for a volume: the volume's key (`plan::names::key`), unique
/// in the operator's namespace; selectors use it.
pub const VOLUME_LABEL: &str = "tandem.dev/volume";
/// Owner labels on everything the operator creates for a volume: its namespace, name and uid.
pub const NAMESPACE_LABEL: &str = "tandem.dev/volume-namespace";
pub const NAME_LABEL: &str = "tandem.dev/volume-name";
pub const UID_LABEL: &str = "tandem.dev/volume-uid";
/// Label on engine pods and services: the slot (`a` or `b`).
pub const SLOT_LABEL: &str = "tandem.dev/slot";

/// An engine pod.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct PodObs {
    pub name: String,
    pub node: Option<String>,
    /// `Pending`, `Running`, `Failed`, ...
    pub phase: String,
    pub ready: bool,
    /// When the pod's Ready condition last became False (None when ready or unknown).
    pub not_ready_since: Option<Timestamp>,
    /// The pod has a deletion timestamp.
    pub deleting: bool,
    /// The `--role` it was started with.
    pub role: Option<EngineRole>,
    /// Its `tandem.dev/disruption-allowed` label (None: absent or not a boolean).
    pub disruption_allowed: Option<bool>,
}

impl PodObs {
    /// Reads the facts from a Pod object.
    pub fn from_pod(pod: &Pod) -> Self {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let status = pod.status.as_ref();
        let ready_cond = status
            .and_then(|s| s.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"));
        let ready = ready_cond.is_some_and(|c| c.status == "True");
        let not_ready_since = if ready {
            None
        } else {
            ready_cond
                .and_then(|c| c.last_transition_time.as_ref())
                .map(|t| t.0)
                .or_else(|| pod.metadata.creation_timestamp.as_ref().map(|t| t.0))
        };
        let role = pod
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(ROLE_ANNOTATION))
            .map(|r| match r.as_str() {
                "primary" => EngineRole::Primary,
                "secondary" => EngineRole::Secondary,
                _ => EngineRole::Unknown,
            });
        let disruption_allowed = pod
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(DISRUPTION_LABEL))
            .and_then(|v| v.parse().ok());
        PodObs {
            name,
            node: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
            phase: status.and_then(|s| s.phase.clone()).unwrap_or_default(),
            ready,
            not_ready_since,
            deleting: pod.metadata.deletion_timestamp.is_some(),
            role,
            disruption_allowed,
        }
    }

    /// The pod will never serve again: it failed, finished or is being deleted.
    pub fn is_gone(&self) -> bool {
        self.deleting || self.phase == "Failed" || self.phase == "Succeeded"
    }
}

/// A node the volume cares about.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeObs {
    pub name: String,
    /// False when the Node object does not exist (deleted from the cluster).
    pub exists: bool,
    /// The Ready condition is True.
    pub ready: bool,
    /// The node carries the out-of-service taint: it is confirmed down.
    pub out_of_service: bool,
    /// It carries the volume's node label (`plan::node_label`), which PVs select.
    pub labeled: bool,
    /// When its Ready condition last turned away from True (None when Ready or unknown).
    pub not_ready_since: Option<Timestamp>,
    /// Cordoned (`spec.unschedulable` or the unschedulable taint): a drain is coming.
    pub unschedulable: bool,
}

impl NodeObs {
    pub fn missing(name: &str) -> Self {
        NodeObs {
            name: name.to_string(),
            exists: false,
            ready: false,
            out_of_service: false,
            labeled: false,
            not_ready_since: None,
            unschedulable: false,
        }
    }

    /// [`Self::from_node`], and whether it carries `label` (the volume's node label key).
    pub fn for_volume(node: &Node, label: &str) -> Self {
        let mut obs = Self::from_node(node);
        obs.labeled = node
            .metadata
            .labels
            .as_ref()
            .is_some_and(|l| l.contains_key(label));
        obs
    }

    pub fn from_node(node: &Node) -> Self {
        let name = node.metadata.name.clone().unwrap_or_default();
        let ready_cond = node
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"));
        let ready = ready_cond.is_some_and(|c| c.status == "True");
        let not_ready_since = ready_cond
            .filter(|_| !ready)
            .and_then(|c| c.last_transition_time.as_ref())
            .map(|t| t.0);
        let tainted = |key: &str| {
            node.spec
                .as_ref()
                .and_then(|s| s.taints.as_ref())
                .is_some_and(|ts| ts.iter().any(|t| t.key == key))
        };
        let out_of_service = tainted(OUT_OF_SERVICE_TAINT);
        let unschedulable = tainted(UNSCHEDULABLE_TAINT)
            || node
                .spec
                .as_ref()
                .and_then(|s| s.unschedulable)
                .unwrap_or(false);
        NodeObs {
            name,
            exists: true,
            ready,
            out_of_service,
            labeled: false,
            not_ready_since,
            unschedulable,
        }
    }

    /// The node is gone or not Ready (the node lifecycle controller already waited its grace period).
    pub fn is_lost(&self) -> bool {
        !self.exists || !self.ready || self.out_of_service
    }
}

/// The PersistentVolume, when it exists.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct PvObs {
    pub capacity: Option<String>,
    /// The claim bound (or pre-bound) to it: (namespace, name).
    pub claim: Option<(String, String)>,
    /// Its node affinity selects the volume's node label (or nothing): workloads follow a live move.
    /// False for a PV made before the label (`kubernetes.io/hostname` or the CSI topology key): its
    /// affinity is immutable and would strand workloads, so a move is refused (`crate::moving`).
    pub follows_label: bool,
}

/// A workload pod that uses the volume and sits on a lost node (or on a node whose engine restart ended
/// in a takeover).
#[derive(Clone, Debug, PartialEq, Default)]
pub struct WorkloadPod {
    pub namespace: String,
    pub name: String,
    pub node: String,
    pub created: Option<Timestamp>,
    /// It has a deletion timestamp.
    pub deleting: bool,
}

/// Everything one reconcile observed, per slot where it applies.
#[derive(Clone, Debug, PartialEq)]
pub struct Observed {
    pub now: Timestamp,
    /// Nodes of slot a and b.
    pub nodes: [NodeObs; 2],
    pub pods: [Option<PodObs>; 2],
    /// Engine Status answers; None = unreachable or not asked.
    pub engines: [Option<EngineState>; 2],
    pub secret_exists: bool,
    /// The volume token: the Secret's, or a fresh one to create the Secret with.
    pub token: Option<String>,
    pub pv: Option<PvObs>,
    /// The claim of `spec.claim` exists.
    pub claim_exists: bool,
    /// The engines' own PVCs exist (StorageClass storage only).
    pub engine_pvcs: [bool; 2],
    /// Workload pods of the volume's claim on lost engine nodes, and on the node of `status.workloadRestart`.
    pub workloads: Vec<WorkloadPod>,
    /// VolumeAttachments of the volume's PV: (name, node).
    pub attachments: Vec<(String, String)>,
    /// The operator's own clock as the witness: how long since it last sent this volume a lease grant.
    pub witness: LeaseClock,
    /// The volume's certificates as found in its Secrets.
    pub certs: CertsObs,
    /// An object in the way (a PV or an object of the key that belongs to another volume): nothing is
    /// created or changed while it is there.
    pub conflict: Option<crate::plan::InvalidSpec>,
    /// What a live move recorded in `status.move` left in the world (`crate::moving`).
    pub moving: MoveObs,
}

/// A live move's objects and the primary's answer, looked up only while `status.move` is under way.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MoveObs {
    /// The new engine's pod.
    pub pod: Option<PodObs>,
    /// The new engine's Status (None: not asked, or no answer).
    pub engine: Option<EngineState>,
    /// The primary's GetMove answer, or why there is none.
    pub progress: Option<Result<MoveProgress, String>>,
    /// The move's wipe pod of this phase (the new node's before it starts, the old node's after).
    pub wipe: Option<PodObs>,
    /// The old instance's pod is still there (Finishing deletes it first).
    pub old_pod: bool,
    /// The node `spec.placement.nodes` asks for, when it differs from the recorded one (None: not
    /// asked for).
    pub target_node: Option<NodeObs>,
    /// The node being left, while Finishing (it loses the volume's node label; when it is lost the
    /// move finishes without its wipe).
    pub old_node: Option<NodeObs>,
    /// The new instance's PVC (StorageClass storage, looked at while Preparing).
    pub pvc: MovePvc,
}

/// A live move's new engine PVC as seen while Preparing.
#[derive(Clone, Debug, PartialEq, Default)]
pub enum MovePvc {
    /// Not looked at (hostPath storage, or another phase).
    #[default]
    Unknown,
    Absent,
    Present {
        /// It has a deletion timestamp.
        deleting: bool,
        /// Its [`MOVE_ANNOTATION`] (None: absent).
        started_at: Option<String>,
    },
}

impl MovePvc {
    pub fn of(pvc: Option<&k8s_openapi::api::core::v1::PersistentVolumeClaim>) -> Self {
        match pvc {
            None => Self::Absent,
            Some(p) => Self::Present {
                deleting: p.metadata.deletion_timestamp.is_some(),
                started_at: p
                    .metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(MOVE_ANNOTATION))
                    .cloned(),
            },
        }
    }
}

impl MoveObs {
    /// The GetMove answer as observed: the error as text (it is shown, never matched on).
    pub fn progress_of(r: Result<MoveProgress, EngineError>) -> Result<MoveProgress, String> {
        r.map_err(|e| e.to_string())
    }
}

/// Expiry of each certificate Secret of the volume; `None` when missing, unreadable, issued by another
/// CA or for another identity (each of which means: issue it again).
#[derive(Clone, Debug, PartialEq, Default)]
pub struct CertsObs {
    /// The engine TLS Secrets of slot a and b.
    pub engine: [Option<Timestamp>; 2],
    /// The CSI Secret: the earlier of its two nodes' certificates (`None` also when its token is stale).
    pub csi: Option<Timestamp>,
}

impl CertsObs {
    /// The earliest expiry of them all (for status), when all exist.
    pub fn earliest(&self) -> Option<Timestamp> {
        let [a, b] = self.engine;
        Some(a?.min(b?).min(self.csi?))
    }
}

impl Observed {
    pub fn node(&self, slot: Slot) -> &NodeObs {
        &self.nodes[slot.index()]
    }
    pub fn pod(&self, slot: Slot) -> Option<&PodObs> {
        self.pods[slot.index()].as_ref()
    }
    pub fn engine(&self, slot: Slot) -> Option<&EngineState> {
        self.engines[slot.index()].as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        NodeCondition, NodeSpec, NodeStatus, PodCondition, PodStatus, Taint,
    };

    #[test]
    fn pod_facts() {
        let mut pod = Pod::default();
        pod.metadata.name = Some("v-engine-a".into());
        pod.metadata.annotations =
            Some([(ROLE_ANNOTATION.to_string(), "primary".to_string())].into());
        pod.status = Some(PodStatus {
            phase: Some("Running".into()),
            conditions: Some(vec![PodCondition {
                type_: "Ready".into(),
                status: "True".into(),
                ..Default::default()
            }]),
            ..Default::default()
        });
        let obs = PodObs::from_pod(&pod);
        assert!(obs.ready);
        assert_eq!(obs.role, Some(EngineRole::Primary));
        assert!(!obs.is_gone());
        assert_eq!(obs.not_ready_since, None);
        assert_eq!(obs.disruption_allowed, None);
        pod.metadata.labels = Some([(DISRUPTION_LABEL.to_string(), "true".to_string())].into());
        assert_eq!(PodObs::from_pod(&pod).disruption_allowed, Some(true));
    }

    #[test]
    fn node_facts() {
        let mut node = Node::default();
        node.metadata.name = Some("n1".into());
        node.status = Some(NodeStatus {
            conditions: Some(vec![NodeCondition {
                type_: "Ready".into(),
                status: "Unknown".into(),
                ..Default::default()
            }]),
            ..Default::default()
        });
        let obs = NodeObs::from_node(&node);
        assert!(obs.is_lost());
        assert!(!obs.out_of_service);
        node.spec = Some(NodeSpec {
            taints: Some(vec![Taint {
                key: OUT_OF_SERVICE_TAINT.into(),
                effect: "NoExecute".into(),
                value: Some("nodeshutdown".into()),
                ..Default::default()
            }]),
            ..Default::default()
        });
        assert!(NodeObs::from_node(&node).out_of_service);
        assert!(!NodeObs::from_node(&node).unschedulable);
        node.spec.as_mut().unwrap().unschedulable = Some(true);
        assert!(NodeObs::from_node(&node).unschedulable);
        assert!(NodeObs::missing("x").is_lost());
    }
}
