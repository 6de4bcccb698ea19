//! The `MirroredVolume` custom resource (`tandem.dev/v1alpha1`), DESIGN.md §5.
//!
//! The spec is what a user asks for; the status is what the operator observed and decided. Server-side
//! validation lives in the schema (patterns, enums) and in CEL rules (`x-kubernetes-validations`): size can
//! only grow, engine storage is immutable, the two nodes are distinct, and `placement.nodes` changes by
//! at most one node per edit (a live move, `crate::moving`; a `nodeSelector` placement is immutable).

use std::collections::BTreeMap;

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Finalizer the operator puts on every MirroredVolume; removed once `cleanup` tore everything down.
pub const VOLUME_FINALIZER: &str = "mirroredvolumes.tandem.dev";
/// The CSI driver name (DESIGN.md §1), shared with the CSI plugin.
pub use tandem_api::contract::CSI_DRIVER;

/// A block volume kept on two nodes by a pair of Tandem engines, one primary and one secondary.
#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[cfg_attr(test, derive(Default))]
#[kube(
    group = "tandem.dev",
    version = "v1alpha1",
    kind = "MirroredVolume",
    plural = "mirroredvolumes",
    shortname = "mv",
    category = "tandem",
    namespaced,
    status = "MirroredVolumeStatus",
    derive = "PartialEq",
    doc = "A block volume mirrored by two Tandem engines on two nodes, with constant-time failover.",
    validation = Rule::new("size(self.metadata.name) <= 40").message("name must be at most 40 characters (it prefixes pod and service names)"),
    validation = Rule::new("!has(self.spec.secondaryReadMode) || self.spec.secondaryReadMode != 'Current' || (has(self.spec.secondaryAccess) && self.spec.secondaryAccess == 'ReadWrite')").message("secondaryReadMode Current needs secondaryAccess ReadWrite"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Primary", type_ = "string", json_path = ".status.primary.node"),
    printcolumn(name = "Secondary", type_ = "string", json_path = ".status.secondary.node"),
    printcolumn(name = "Lag", type_ = "string", json_path = ".status.replication.lag"),
    printcolumn(name = "Epoch", type_ = "integer", json_path = ".status.epoch", priority = 1),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct MirroredVolumeSpec {
    /// Capacity as a binary quantity (`512Mi`, `10Gi`). It can grow but never shrink.
    #[x_kube(validation = Rule::new("quantity(self).compareTo(quantity(oldSelf)) >= 0").message("size can grow but never shrink"))]
    #[schemars(regex(pattern = r"^[1-9][0-9]{0,15}(Ki|Mi|Gi|Ti)?$"), length(max = 20))]
    pub size: String,

    /// How writes reach the secondary.
    #[serde(default)]
    pub replication: Replication,

    /// Where the two engines run. `nodes` may change one node per edit: the engine on the replaced node
    /// moves live to the new one (`status.move`); a `nodeSelector` placement is immutable.
    pub placement: Placement,

    /// Where each engine keeps its data file, journal and tables. Immutable.
    pub engine_storage: EngineStorage,

    /// What the operator does when the primary engine or its node is lost.
    #[serde(default)]
    pub failover: Failover,

    /// Whether hosts may read the secondary's copy.
    #[serde(default)]
    pub secondary_access: SecondaryAccess,

    /// What a read-only stage on the secondary's node reads: a point-in-time view (`Snapshot`, the
    /// default: a consistent image for backups) or, with `secondaryAccess: ReadWrite`, the live
    /// secondary (`Current`: every write acknowledged before the read, like the primary's node).
    #[serde(default)]
    pub secondary_read_mode: SecondaryReadMode,

    /// The node that should hold the primary. Naming the secondary's node asks for a planned switchover
    /// (handoff, drain, merge; the old primary then replicates back as the secondary), carried out once
    /// per value; `status.switchover` shows its phases. A node that holds no engine of the volume is
    /// refused. Unset: the primary stays where it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub primary_node: Option<String>,

    /// When a switchover asked by `primaryNode` may start.
    #[serde(default)]
    pub switchover_policy: SwitchoverPolicy,

    /// Filesystem (default) or Block; copied to the PersistentVolume and the claim.
    #[serde(default)]
    pub volume_mode: VolumeMode,

    /// Filesystem the CSI plugin creates on first use (Filesystem mode only).
    #[serde(default)]
    pub fs_type: FsType,

    /// When set, the operator also creates a PersistentVolumeClaim bound to the volume's PersistentVolume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim: Option<ClaimSpec>,

    /// Where the volume's first content comes from: a snapshot of, or a clone of, another volume in
    /// the same namespace. Unset: zeros. Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self == oldSelf").message("source is immutable"))]
    pub source: Option<VolumeSource>,

    /// Set by the CSI controller for a dynamically provisioned volume: the PersistentVolume the
    /// external-provisioner creates from CreateVolume's answer. The operator then creates no
    /// PersistentVolume of its own. Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("persistentVolumeName is immutable"))]
    pub persistent_volume_name: Option<String>,
}

/// A volume's initial content (`spec.source`): exactly one of `snapshot` or `volume`.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.snapshot) != has(self.volume)").message("set exactly one of snapshot or volume"))]
pub struct VolumeSource {
    /// A snapshot taken by a volume's engine (CSI CreateSnapshot or `tandem-engine snapshot create`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<SnapshotSource>,
    /// Another MirroredVolume in the same namespace, cloned as it is when this volume is created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub volume: Option<String>,
}

/// A snapshot to restore from.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotSource {
    /// The MirroredVolume the snapshot was taken of (same namespace).
    #[schemars(length(min = 1, max = 63))]
    pub volume: String,
    /// The snapshot's id on that volume's engines.
    #[schemars(regex(pattern = r"^[a-zA-Z0-9._-]{1,128}$"))]
    pub id: String,
}

/// Replication settings.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Replication {
    /// `Async` acknowledges host writes once they are durable locally; `Sync` waits for the secondary too.
    #[serde(default)]
    pub mode: ReplicationMode,
    /// Journal bound (binary quantity). Unset: the engine's default. Also sizes the engines' own PVCs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[1-9][0-9]{0,15}(Ki|Mi|Gi|Ti)?$"), length(max = 20))]
    pub journal_size: Option<String>,
}

/// Replication mode.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum ReplicationMode {
    #[default]
    Async,
    Sync,
}

/// Node placement: either two named nodes or a selector the operator picks two distinct nodes from.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("has(self.nodes) != has(self.nodeSelector)").message("set exactly one of nodes or nodeSelector"),
    validation = Rule::new("!has(self.nodes) || (!has(self.allowedNodes) && !has(self.preferredPrimary))").message("allowedNodes and preferredPrimary go with nodeSelector"),
    validation = Rule::new("has(self.nodes) == has(oldSelf.nodes)").message("placement cannot switch between nodes and nodeSelector"),
    validation = Rule::new("has(self.nodes) ? (self.nodes[0] == oldSelf.nodes[0] || self.nodes[1] == oldSelf.nodes[1]) : self == oldSelf").message("placement.nodes may change one node per edit (a live move of that engine); a nodeSelector placement is immutable")
)]
pub struct Placement {
    /// Exactly two distinct node names; the first one starts as the primary. Replacing one of them moves
    /// that engine live to the new node (`status.move`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.size() == 2 && self[0] != self[1]").message("nodes must name two distinct nodes"))]
    #[schemars(length(min = 2, max = 2), inner(length(min = 1, max = 253)))]
    pub nodes: Option<Vec<String>>,
    /// Node labels; the operator picks two distinct matching nodes (anti-affinity) and records them in status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "node_selector_schema")]
    pub node_selector: Option<BTreeMap<String, String>>,
    /// With `nodeSelector` only: the engines may run only on these nodes (CSI CreateVolume's
    /// accessibility requirements). Unset: any node the selector matches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1000), inner(length(min = 1, max = 253)))]
    pub allowed_nodes: Option<Vec<String>>,
    /// With `nodeSelector` only: the node that should hold the primary when it fits (the node the
    /// scheduler chose for the first consumer, `volumeBindingMode: WaitForFirstConsumer`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub preferred_primary: Option<String>,
}

/// Storage for the engines' own files.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("has(self.hostPath) != has(self.storageClassName)").message("set exactly one of hostPath or storageClassName"),
    validation = Rule::new("self == oldSelf").message("engineStorage is immutable")
)]
pub struct EngineStorage {
    /// A directory on each node; the engine uses `<hostPath>/<namespace>/<name>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^/"), length(max = 1024))]
    pub host_path: Option<String>,
    /// A StorageClass for one PersistentVolumeClaim per engine (it must provide node-local storage
    /// reachable from the engine's node, e.g. a local-path provisioner).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub storage_class_name: Option<String>,
}

/// Failover settings.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.policy != 'MaxLoss' || has(self.maxLossBytes)").message("policy MaxLoss needs maxLossBytes")
)]
pub struct Failover {
    /// When the old primary is lost and cannot hand over: `WaitForPrimary` never promotes without its
    /// differential table (no lost writes); `ForcePromote` promotes once its lease has run out and reports
    /// what was lost; `MaxLoss` does the same only while the secondary's last known backlog is at most
    /// `maxLossBytes`. In Sync mode an in-sync secondary is promoted whatever the policy (nothing to lose).
    #[serde(default)]
    pub policy: FailoverPolicy,
    /// `MaxLoss` only: the most acknowledged data (binary quantity) a forced promotion may lose.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]{1,16}(Ki|Mi|Gi|Ti)?$"), length(max = 20))]
    pub max_loss_bytes: Option<String>,
    /// The primary's write lease in milliseconds (engine `--lease-ms`): a primary cut off from its peer and
    /// from the operator stops acknowledging writes within it, and no forced promotion happens before it
    /// has provably run out. 0 turns leases off (then nothing is promoted by force safely: avoid with
    /// ForcePromote).
    #[serde(default = "default_lease_ms")]
    #[schemars(range(max = 600000))]
    pub lease_ms: u32,
    /// How long the engine keeps trying the old primary during a takeover, and how long an engine that is
    /// no longer primary may stay unready before it is restarted (`500ms`, `30s`, `2m`). A primary on a
    /// Ready node gets `engineRestartGrace` instead.
    #[serde(default = "default_peer_timeout")]
    #[schemars(regex(pattern = r"^[0-9]{1,6}(ms|s|m)$"))]
    pub peer_timeout: String,
    /// Release (force-delete) workload pods and VolumeAttachments stuck on a lost node once its writes are
    /// fenced, so they reschedule at once; and restart (delete) workload pods on a live node whose primary
    /// engine did not come back within `engineRestartGrace` (their attachment is pinned to the old epoch).
    #[serde(default = "default_true")]
    pub release_workloads: bool,
    /// How long a primary engine whose node is Ready may be away (pod deleted, failed or unready) before
    /// the operator takes over. Within it the operator recreates the pod on the same node and state dir,
    /// and the workload there sees a stall, not an error. Default `60s`.
    #[serde(default = "default_engine_restart_grace")]
    #[schemars(regex(pattern = r"^[0-9]{1,6}(ms|s|m)$"))]
    pub engine_restart_grace: String,
}

impl Default for Failover {
    fn default() -> Self {
        Self {
            policy: FailoverPolicy::default(),
            max_loss_bytes: None,
            lease_ms: default_lease_ms(),
            peer_timeout: default_peer_timeout(),
            release_workloads: true,
            engine_restart_grace: default_engine_restart_grace(),
        }
    }
}

impl Failover {
    /// `maxLossBytes` in bytes (`None`: unset or not a quantity; the schema rejects the latter).
    pub fn max_loss(&self) -> Option<u64> {
        self.max_loss_bytes.as_deref().and_then(parse_quantity)
    }
}

/// The engine's own default lease.
pub const DEFAULT_LEASE_MS: u32 = 10_000;

fn default_lease_ms() -> u32 {
    DEFAULT_LEASE_MS
}

/// Two kubelet crash-loop restarts (10 s + 20 s back-off) plus an engine start, or a recreated pod on a node
/// that has the image: an engine that is coming back is back well within a minute.
fn default_engine_restart_grace() -> String {
    "60s".to_string()
}

fn default_peer_timeout() -> String {
    "30s".to_string()
}

fn default_true() -> bool {
    true
}

/// Takeover policy when the old primary cannot be reached (DESIGN.md §4 step 7).
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum FailoverPolicy {
    #[default]
    WaitForPrimary,
    ForcePromote,
    MaxLoss,
}

impl FailoverPolicy {
    /// The value of the PV attribute `tandem.dev/takeover-policy` the CSI plugin reads. `MaxLoss` is
    /// decided by the operator alone (it knows the backlog and the lease): the plugin only waits.
    pub fn csi_value(self) -> &'static str {
        match self {
            FailoverPolicy::WaitForPrimary | FailoverPolicy::MaxLoss => "wait",
            FailoverPolicy::ForcePromote => "force",
        }
    }

    /// The value of the PV attribute `tandem.dev/failover-policy` (`WaitForPrimary` | `ForcePromote`).
    pub fn csi_name(self) -> &'static str {
        match self {
            FailoverPolicy::WaitForPrimary | FailoverPolicy::MaxLoss => "WaitForPrimary",
            FailoverPolicy::ForcePromote => "ForcePromote",
        }
    }
}

/// When a switchover may start. Neither ever forces: both engines must answer, the old primary hands
/// its table over and nothing acknowledged is lost.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum SwitchoverPolicy {
    /// Postponed until the primary reports the secondary in sync (nothing pending): a short handover.
    #[default]
    WhenInSync,
    /// As soon as the secondary is a streaming mirror (Synced or Replicating): the new primary drains
    /// the backlog from the old one, serving reads of blocks not yet drained through it.
    Immediate,
}

/// Phases of a switchover asked by `spec.primaryNode` (`status.switchover.phase`).
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum SwitchoverPhase {
    /// Asked; waits for the pair (established, both engines answering, nothing else taking over).
    #[default]
    Pending,
    /// Postponed by `switchoverPolicy` until the secondary is in sync (or streaming).
    WaitingForSync,
    /// The secondary is asked to take over by handoff.
    HandingOver,
    /// The new primary drains the old one's backlog.
    Draining,
    /// The new primary merges the drained blocks.
    Merging,
    /// The primary is on the asked node and the old primary answers as the secondary.
    Done,
    /// The asked node holds no engine of the volume.
    Refused,
}

impl SwitchoverPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            SwitchoverPhase::Pending => "Pending",
            SwitchoverPhase::WaitingForSync => "WaitingForSync",
            SwitchoverPhase::HandingOver => "HandingOver",
            SwitchoverPhase::Draining => "Draining",
            SwitchoverPhase::Merging => "Merging",
            SwitchoverPhase::Done => "Done",
            SwitchoverPhase::Refused => "Refused",
        }
    }
}

/// Host access to the secondary's copy (engine flag `--secondary-access`).
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum SecondaryAccess {
    /// The secondary serves no host.
    #[default]
    None,
    /// Point-in-time views on the secondary (a read-only stage there, e.g. a backup).
    ReadOnly,
    /// Views, and read-write sessions on the secondary: writes forwarded to the primary, current
    /// reads (a MULTI_NODE_MULTI_WRITER block volume used on both nodes).
    ReadWrite,
}

impl SecondaryAccess {
    /// The engine's `--secondary-access` value.
    pub fn engine_flag(self) -> &'static str {
        match self {
            SecondaryAccess::None => "none",
            SecondaryAccess::ReadOnly => "read-only",
            SecondaryAccess::ReadWrite => "read-write",
        }
    }

    /// The PV attribute's value (`contract::ATTR_SECONDARY_ACCESS`).
    pub fn attribute(self) -> &'static str {
        match self {
            SecondaryAccess::None => "None",
            SecondaryAccess::ReadOnly => "ReadOnly",
            SecondaryAccess::ReadWrite => "ReadWrite",
        }
    }
}

/// What a read-only stage on the secondary's node reads (`contract::ATTR_SECONDARY_READ_MODE`).
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum SecondaryReadMode {
    /// A point-in-time view taken at the stage, deleted at unstage.
    #[default]
    Snapshot,
    /// The live secondary (needs `secondaryAccess: ReadWrite`).
    Current,
}

impl SecondaryReadMode {
    /// The PV attribute's value.
    pub fn attribute(self) -> &'static str {
        match self {
            SecondaryReadMode::Snapshot => "Snapshot",
            SecondaryReadMode::Current => "Current",
        }
    }
}

/// Kubernetes volume mode.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum VolumeMode {
    #[default]
    Filesystem,
    Block,
}

impl VolumeMode {
    pub fn as_str(self) -> &'static str {
        match self {
            VolumeMode::Filesystem => "Filesystem",
            VolumeMode::Block => "Block",
        }
    }
}

/// Filesystem type for Filesystem volumes.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum FsType {
    #[default]
    Ext4,
    Xfs,
}

impl FsType {
    pub fn as_str(self) -> &'static str {
        match self {
            FsType::Ext4 => "ext4",
            FsType::Xfs => "xfs",
        }
    }
}

/// The claim the operator creates and binds to the volume.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClaimSpec {
    /// Name of the PersistentVolumeClaim, in the MirroredVolume's namespace.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// Lifecycle phase (DESIGN.md §5).
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum Phase {
    #[default]
    Creating,
    Syncing,
    Synced,
    Degraded,
    TakingOver,
    Reversing,
    Failed,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Creating => "Creating",
            Phase::Syncing => "Syncing",
            Phase::Synced => "Synced",
            Phase::Degraded => "Degraded",
            Phase::TakingOver => "TakingOver",
            Phase::Reversing => "Reversing",
            Phase::Failed => "Failed",
        }
    }
}

/// One of the two engine slots. Slot `a` runs on the first placement node, `b` on the second; roles move
/// between slots on takeover, the slots never move.
#[derive(
    Deserialize,
    Serialize,
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Slot {
    #[default]
    A,
    B,
}

impl Slot {
    pub const BOTH: [Slot; 2] = [Slot::A, Slot::B];

    pub fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }
    pub fn index(self) -> usize {
        match self {
            Slot::A => 0,
            Slot::B => 1,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Slot::A => "a",
            Slot::B => "b",
        }
    }
}

/// Engine role as the operator wants it (and as engines report it).
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum EngineRole {
    Primary,
    Secondary,
    Fenced,
    Unknown,
}

impl EngineRole {
    /// The value of the engine's `--role` flag.
    pub fn flag(self) -> &'static str {
        match self {
            EngineRole::Primary => "primary",
            _ => "secondary",
        }
    }
}

/// Observed state of a MirroredVolume.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MirroredVolumeStatus {
    #[serde(default)]
    pub phase: Phase,
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The pair's epoch: bumped by every takeover; engines refuse requests from older epochs.
    #[serde(default)]
    pub epoch: u64,
    /// The two nodes the engines are pinned to, slot a then slot b (resolved from the placement once).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<String>,
    /// The engines' own directory on both nodes (hostPath storage), recorded when the volume is first
    /// placed: `<hostPath>/<namespace>/<name>-<uid>`, so a later volume of the same name never opens
    /// it. The deletion wipes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<String>,
    /// A restore from `spec.source` in progress or done (so an operator restart resumes it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore: Option<RestoreStatus>,
    /// The size in bytes both engines serve (issue 14): below `spec.size` while an expansion is under
    /// way; the CSI controller's ControllerExpandVolume returns once it reaches the requested size.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub capacity_bytes: u64,
    /// Why the operator could not place the engines (no pair of nodes fits), or how it placed them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<PlacementStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary: Option<EngineStatusRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secondary: Option<EngineStatusRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication: Option<ReplicationStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub takeover: Option<TakeoverStatus>,
    /// Nodes found lost, with the epoch at the time: writers there are fenced once the epoch moved past it
    /// (or the node carries the `node.kubernetes.io/out-of-service` taint).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lost_nodes: Vec<LostNode>,
    /// The primary engine is away on a live node and is being restarted there (no takeover yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine_restart: Option<EngineRestart>,
    /// A takeover ended an engine restart that took too long: workload pods on that node staged before it
    /// are pinned to the old epoch and are restarted so they stage on the new primary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_restart: Option<WorkloadRestart>,
    /// The switchover asked by `spec.primaryNode`: where it stands (kept once Done, so a restarted
    /// operator neither repeats nor forgets it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switchover: Option<SwitchoverStatus>,
    /// A live move of an engine asked by an edit of `spec.placement.nodes` (kept once Done or Failed,
    /// so a restarted operator resumes it and never repeats it).
    #[serde(default, skip_serializing_if = "Option::is_none", rename = "move")]
    pub moving: Option<MoveStatus>,
    /// Per slot (a, b): which engine instance serves it. 0 is `<key>-engine-<slot>`, n > 0
    /// `<key>-engine-<slot>-m<n>`; each live move starts the next (absent: both 0).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub slot_generations: Vec<u32>,
    /// The operator's last write-lease grant (it is the pair's witness).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<LeaseGrant>,
    /// Sync mode: the operator consented that the primary acknowledge writes without its lost secondary.
    /// While set, a forced promotion of that secondary may lose writes: it is treated as Async.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync_fallback: Option<SyncFallback>,
    /// Why the promotion of the secondary over a lost primary waits, while it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promotion_wait: Option<PromotionWait>,
    /// The volume's certificates (engine TLS and CSI Secrets), minted by the operator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificates: Option<CertificateStatus>,
    /// Ready, Synced, Degraded, TakeoverInProgress (and NodeDrain while an engine node is cordoned).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
}

/// Where a new volume's first content comes from, as resolved (`status.restore`).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestoreStatus {
    /// The source MirroredVolume (same namespace).
    pub volume: String,
    /// The snapshot on its engine: `spec.source.snapshot.id`, or `clone-<uid>` made for a clone.
    pub snapshot: String,
    /// The node whose source engine holds the snapshot: the new primary runs there and reads it
    /// through that engine's socket.
    pub node: String,
    /// The operator took the snapshot (a clone) and deletes it once the new volume serves.
    #[serde(default)]
    pub clone: bool,
    /// The new primary serves the restored data: no engine pod seeds again.
    #[serde(default)]
    pub done: bool,
    /// The clone's snapshot is deleted from the source.
    #[serde(default)]
    pub snapshot_deleted: bool,
}

/// The operator's placement decision (`status.placement`).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PlacementStatus {
    /// `Placed`, or why no pair fits (`NoPairFits`, `SnapshotNodeUnavailable`, ...).
    pub reason: String,
    /// For humans: the nodes chosen and why, or what is missing.
    pub message: String,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// When the volume's certificates run out; they are issued again when a third of their lifetime is left.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CertificateStatus {
    /// The earliest expiry among them (RFC 3339).
    pub not_after: String,
}

/// One engine of the pair as seen by the operator.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EngineStatusRef {
    pub slot: Slot,
    pub node: String,
    pub pod: String,
    pub role: EngineRole,
    /// gRPC address (`host:port`).
    pub address: String,
    /// Whether the engine answered its last Status call.
    #[serde(default)]
    pub reachable: bool,
    /// What the engine answered in the operator's last Status call (absent while it does not
    /// answer): what `kubectl tandem` shows and draws its progress bars from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reported: Option<EngineReport>,
}

/// One engine's own view, from its `Status` reply.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EngineReport {
    pub epoch: u64,
    /// The pair state (`Synced`, `Resyncing`, `Replicating`, ...).
    pub pair_state: String,
    /// `draining`, `merging`, `fenced`; empty when no takeover runs.
    #[serde(default)]
    pub takeover_phase: String,
    /// Blocks not yet replicated to the peer.
    #[serde(default)]
    pub pending_blocks: u64,
    /// Resync progress of the peer, 0..1.
    #[serde(default)]
    pub resync_progress: f64,
    /// Takeover areas: blocks still owed by the old primary (drain), and blocks in the overlay
    /// not yet merged into the data file.
    #[serde(default)]
    pub peer_pending_blocks: u64,
    #[serde(default)]
    pub overlay_blocks: u64,
}

/// Replication lag as the primary reports it.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplicationStatus {
    pub pending_blocks: u64,
    pub pending_bytes: u64,
    pub lag_seconds: f64,
    /// Human summary for `kubectl get` (`0B`, `48KiB/1.2s`).
    pub lag: String,
    /// Resync progress of the secondary, 0..1.
    #[serde(default)]
    pub resync_progress: f64,
    #[serde(default)]
    pub peer_connected: bool,
}

/// The last (or current) takeover.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TakeoverStatus {
    /// Why the operator started it (`PrimaryPodLost`, `PrimaryNodeLost`, ...).
    pub reason: String,
    pub from_node: String,
    pub to_node: String,
    /// When the operator first saw the primary lost (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<String>,
    /// Engine-side time from request to readiness.
    #[serde(default)]
    pub ready_ms: u64,
    /// Blocks still owed by the old primary (drained in the background or read through).
    #[serde(default)]
    pub pending_blocks: u64,
    /// What the old primary owed when the new one became ready: the drain's length.
    #[serde(default)]
    pub drain_total_blocks: u64,
    #[serde(default)]
    pub proxied_reads: u64,
    /// Forced promotion only: blocks whose newest content was lost, and the lost sequence range.
    #[serde(default)]
    pub lost_blocks: u64,
    #[serde(default)]
    pub lost_seq_from: u64,
    #[serde(default)]
    pub lost_seq_to: u64,
    /// How the old primary's writes were stopped: `Handoff` (it answered and is fenced) or
    /// `LeaseExpired` (a forced promotion after its lease provably ran out). Unset: not known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fence: Option<String>,
    /// Attempts so far (a `WaitForPrimary` takeover is retried while the old primary is unreachable).
    #[serde(default)]
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// The engine's stable reason for the last failure (`HandoffBlocked`, `StaleEpoch`, ...), when it gave one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_reason: Option<String>,
}

/// A write lease the operator granted.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LeaseGrant {
    /// The node of the engine it was granted to.
    pub node: String,
    /// RFC 3339 time of the grant.
    pub at: String,
    pub lease_ms: u32,
    /// Sync mode: it consented to acknowledging writes without the peer.
    #[serde(default)]
    pub allow_async: bool,
    /// Why the grant failed, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The operator's consent to a Sync pair running alone.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SyncFallback {
    /// RFC 3339 time of the first consent.
    pub since: String,
    /// The primary's node that acknowledges alone.
    pub node: String,
    /// Why the secondary counted as lost.
    pub reason: String,
}

/// Why a promotion waits.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PromotionWait {
    /// `LeaseHeld`, `WaitForPrimary`, `MaxLossExceeded`.
    pub reason: String,
    pub message: String,
}

/// A node the operator considers lost.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LostNode {
    pub node: String,
    /// The epoch when the loss was first seen.
    pub epoch: u64,
    pub since: String,
    /// Workload pods already released from this node.
    #[serde(default)]
    pub released: bool,
}

/// A primary engine being restarted on its live node.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EngineRestart {
    pub slot: Slot,
    pub node: String,
    /// When the engine was first seen away (RFC 3339); the grace runs from here.
    pub since: String,
    /// What was seen: pod deleted, failed, missing or unready.
    pub reason: String,
}

/// Workload pods to restart after a takeover from a live node.
/// `status.switchover`.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SwitchoverStatus {
    pub phase: SwitchoverPhase,
    /// The primary's node when it was asked.
    pub from: String,
    /// The asked node (`spec.primaryNode`).
    pub to: String,
    #[serde(default)]
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<String>,
    /// The epoch the handover gave the new primary (0 before it).
    #[serde(default)]
    pub epoch: u64,
}

/// Phases of a live move (`status.move.phase`).
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum MovePhase {
    /// Asked; waits for the pair (both engines answering, in sync, nothing else taking over), or for
    /// the switchover that first makes the moved engine the secondary.
    #[default]
    Pending,
    /// The new node's copy of the volume's directories is being wiped, so the new engine starts empty.
    Preparing,
    /// The new engine pod starts on the new node.
    Starting,
    /// The primary copies the volume to the new engine while the old secondary stays replicated.
    Copying,
    /// The copy is done; the primary switches its secondary to the new engine.
    CuttingOver,
    /// The new engine is the secondary; the old pod is gone and the old node's files are being wiped.
    Finishing,
    /// The engine runs on the new node and the old node holds nothing of the volume.
    Done,
    /// The move was rolled back (the primary aborted it, or the new engine was lost): the old pair
    /// serves as before. Change `placement.nodes` again to retry.
    Failed,
    /// The edit cannot be carried out (see the message); nothing was changed.
    Refused,
}

impl MovePhase {
    pub fn as_str(self) -> &'static str {
        match self {
            MovePhase::Pending => "Pending",
            MovePhase::Preparing => "Preparing",
            MovePhase::Starting => "Starting",
            MovePhase::Copying => "Copying",
            MovePhase::CuttingOver => "CuttingOver",
            MovePhase::Finishing => "Finishing",
            MovePhase::Done => "Done",
            MovePhase::Failed => "Failed",
            MovePhase::Refused => "Refused",
        }
    }

    /// A new engine may exist for this move (between its start and its end).
    pub fn running(self) -> bool {
        matches!(
            self,
            MovePhase::Preparing
                | MovePhase::Starting
                | MovePhase::Copying
                | MovePhase::CuttingOver
        )
    }
}

/// `status.move`: a live move of one engine asked by an edit of `spec.placement.nodes`.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MoveStatus {
    pub phase: MovePhase,
    /// The slot whose engine moves.
    pub slot: Slot,
    /// Its node before the move.
    pub from: String,
    /// The asked node.
    pub to: String,
    /// The generation of the new engine instance (`status.slotGenerations` once Done).
    #[serde(default)]
    pub generation: u32,
    /// The background copy's position (the primary's watermark) and the volume's size.
    #[serde(default)]
    pub copied_bytes: u64,
    #[serde(default)]
    pub total_bytes: u64,
    #[serde(default)]
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<String>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadRestart {
    pub node: String,
    /// Pods of the claim on `node` created before this (RFC 3339) are restarted.
    pub before: String,
    /// The epoch the takeover moved to.
    pub epoch: u64,
}

/// A status condition in the shape of Kubernetes' `metav1.Condition`.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// RFC 3339 time of the last change of `status`.
    pub last_transition_time: String,
    pub reason: String,
    #[serde(default)]
    pub message: String,
}

/// A bounded label map (bounded so the CEL cost of `self == oldSelf` stays small).
fn node_selector_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "nullable": true,
        "maxProperties": 16,
        "additionalProperties": {"type": "string", "maxLength": 63},
        "description": "Node labels; the operator picks two distinct ready matching nodes (anti-affinity) and records them in status."
    })
}

/// `conditions` is a list-map keyed on `type`, like every Kubernetes condition list.
fn conditions_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let mut schema = generator.subschema_for::<Vec<Condition>>();
    schema.insert("x-kubernetes-list-type".into(), "map".into());
    schema.insert(
        "x-kubernetes-list-map-keys".into(),
        serde_json::json!(["type"]),
    );
    schema
}

/// Parses a binary quantity (`10Gi`, `512Mi`, `4096`) into bytes. Only the suffixes the schema allows.
pub fn parse_quantity(s: &str) -> Option<u64> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, suffix) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let shift = match suffix {
        "" => 0,
        "Ki" => 10,
        "Mi" => 20,
        "Gi" => 30,
        "Ti" => 40,
        _ => return None,
    };
    n.checked_mul(1u64 << shift)
}

/// Parses `500ms`, `30s` or `2m`.
pub fn parse_duration(s: &str) -> Option<std::time::Duration> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    match unit {
        "ms" => Some(std::time::Duration::from_millis(n)),
        "s" => Some(std::time::Duration::from_secs(n)),
        "m" => Some(std::time::Duration::from_secs(n.checked_mul(60)?)),
        _ => None,
    }
}

/// Formats bytes with a binary suffix, e.g. `48KiB` or `1.5MiB`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut unit = 0;
    let mut div = 1u64;
    while unit < UNITS.len() - 1 && bytes / div >= 1024 {
        div *= 1024;
        unit += 1;
    }
    if bytes % div == 0 {
        format!("{}{}", bytes / div, UNITS[unit])
    } else {
        format!("{:.1}{}", bytes as f64 / div as f64, UNITS[unit])
    }
}

/// The CustomResourceDefinition as the YAML that crds/ and the chart's crds/ hold.
pub fn crd_yaml() -> Result<String, serde_saphyr::SerializeError> {
    use kube::CustomResourceExt;
    // A one-line description stays on one line (not folded at 80 columns); multi-line ones are
    // literal blocks.
    let options = serde_saphyr::ser_options! { folded_wrap_chars: 1 << 20 };
    serde_saphyr::to_string_with_options(&MirroredVolume::crd(), options)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;

    /// crds/ holds exactly what `tandem-operator crd` prints (regenerate with
    /// `cargo run -q -p operator -- crd > crds/mirroredvolumes.tandem.dev.yaml`).
    #[test]
    fn committed_crd_matches_the_code() {
        let generated = crd_yaml().unwrap();
        let committed = include_str!("../../crds/mirroredvolumes.tandem.dev.yaml");
        assert!(
            generated == committed,
            "crds/mirroredvolumes.tandem.dev.yaml is stale: run `cargo run -q -p operator -- crd > crds/mirroredvolumes.tandem.dev.yaml`"
        );
    }

    /// Every quoting choice of the YAML writer reads back as the same CRD, also by a reader that takes
    /// YAML 1.1's `on`/`off`/`yes`/`no` for booleans (as kubectl's does).
    #[test]
    fn committed_crd_reads_back_as_the_crd() {
        let committed = include_str!("../../crds/mirroredvolumes.tandem.dev.yaml");
        let read: serde_json::Value = serde_saphyr::from_str(committed).unwrap();
        assert_eq!(read, serde_json::to_value(MirroredVolume::crd()).unwrap());
    }

    #[test]
    fn crd_has_the_contract_names_and_validation() {
        let crd = serde_json::to_value(MirroredVolume::crd()).unwrap();
        assert_eq!(crd["metadata"]["name"], "mirroredvolumes.tandem.dev");
        assert_eq!(
            crd["spec"]["names"]["shortNames"],
            serde_json::json!(["mv"])
        );
        assert_eq!(crd["spec"]["scope"], "Namespaced");
        let version = &crd["spec"]["versions"][0];
        assert_eq!(version["name"], "v1alpha1");
        assert!(version["subresources"]["status"].is_object());
        let columns: Vec<&str> = version["additionalPrinterColumns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            columns,
            ["Phase", "Primary", "Secondary", "Lag", "Epoch", "Age"]
        );
        let text = crd.to_string();
        for rule in [
            "quantity(self).compareTo(quantity(oldSelf)) >= 0",
            "self.size() == 2 && self[0] != self[1]",
            "has(self.nodes) != has(self.nodeSelector)",
            "has(self.hostPath) != has(self.storageClassName)",
            "self.policy != 'MaxLoss' || has(self.maxLossBytes)",
            "self.nodes[0] == oldSelf.nodes[0] || self.nodes[1] == oldSelf.nodes[1]",
            "self.spec.secondaryReadMode != 'Current'",
        ] {
            assert!(text.contains(rule), "missing CEL rule {rule}");
        }
        let conditions = &version["schema"]["openAPIV3Schema"]["properties"]["status"]
            ["properties"]["conditions"];
        assert_eq!(conditions["x-kubernetes-list-type"], "map");
        assert_eq!(
            conditions["x-kubernetes-list-map-keys"],
            serde_json::json!(["type"])
        );
    }

    #[test]
    fn quantities() {
        assert_eq!(parse_quantity("4096"), Some(4096));
        assert_eq!(parse_quantity("1Ki"), Some(1024));
        assert_eq!(parse_quantity("10Gi"), Some(10 << 30));
        assert_eq!(parse_quantity("2Ti"), Some(2 << 40));
        assert_eq!(parse_quantity("1G"), None);
        assert_eq!(parse_quantity("Gi"), None);
        assert_eq!(parse_quantity("99999999999999999Ti"), None);
    }

    #[test]
    fn durations() {
        assert_eq!(
            parse_duration("500ms"),
            Some(std::time::Duration::from_millis(500))
        );
        assert_eq!(
            parse_duration("30s"),
            Some(std::time::Duration::from_secs(30))
        );
        assert_eq!(
            parse_duration("2m"),
            Some(std::time::Duration::from_secs(120))
        );
        assert_eq!(parse_duration("2h"), None);
        assert_eq!(parse_duration("s"), None);
    }

    #[test]
    fn human() {
        assert_eq!(human_bytes(0), "0B");
        assert_eq!(human_bytes(49152), "48KiB");
        assert_eq!(human_bytes(3 << 30), "3GiB");
        assert_eq!(human_bytes(12345), "12.1KiB");
        assert_eq!(human_bytes(1000), "1000B");
        assert_eq!(human_bytes(20000), "19.5KiB");
    }

    #[test]
    fn slots() {
        assert_eq!(Slot::A.other(), Slot::B);
        assert_eq!(Slot::B.index(), 1);
        assert_eq!(FailoverPolicy::ForcePromote.csi_value(), "force");
        assert_eq!(FailoverPolicy::MaxLoss.csi_value(), "wait");
        assert_eq!(FailoverPolicy::MaxLoss.csi_name(), "WaitForPrimary");
    }

    #[test]
    fn spec_defaults_from_minimal_yaml() {
        let spec: MirroredVolumeSpec = serde_saphyr::from_str(
            "size: 1Gi\nplacement: {nodes: [n1, n2]}\nengineStorage: {hostPath: /var/lib/tandem}\n",
        )
        .unwrap();
        assert_eq!(spec.failover.peer_timeout, "30s");
        assert_eq!(spec.failover.lease_ms, 10_000);
        assert_eq!(spec.failover.max_loss(), None);
        assert!(spec.failover.release_workloads);
        assert_eq!(spec.failover.engine_restart_grace, "60s");
        assert_eq!(spec.replication.mode, ReplicationMode::Async);
        assert_eq!(spec.volume_mode, VolumeMode::Filesystem);
        assert_eq!(spec.fs_type, FsType::Ext4);
    }
}
