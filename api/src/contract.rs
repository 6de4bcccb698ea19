//! The operator↔CSI contract: names the operator writes into Kubernetes objects and the CSI node
//! plugin reads back (or reports to Kubernetes). Each is defined here once; a change is a change
//! of both sides.

/// PV `volumeAttributes`: the engines' volume (and NBD export) name. Written by the operator,
/// read by the CSI plugin at NodeStageVolume.
pub const ATTR_VOLUME: &str = "tandem.dev/volume";
/// PV `volumeAttributes`: `node=host:port,...`, each engine's gRPC address. Written by the operator,
/// read by the CSI plugin to find the primary and to trigger a takeover.
pub const ATTR_ENGINES: &str = "tandem.dev/engines";
/// PV `volumeAttributes`: `node=host:port,...` (or `unix:/path`), each engine's NBD address.
/// Written by the operator, read by the CSI plugin to attach.
pub const ATTR_NBD: &str = "tandem.dev/nbd";
/// PV `volumeAttributes`: `WaitForPrimary` | `ForcePromote`, the volume's failover policy. Written
/// by the operator (from `spec.failover.policy`). The CSI plugin still parses it but never forces:
/// its takeover on stage is always a handoff; a forced promotion is the operator's (the witness's).
pub const ATTR_FAILOVER_POLICY: &str = "tandem.dev/failover-policy";
/// PV `volumeAttributes`: `wait` | `force`, the same policy under the name. Written by the
/// operator for humans and tools; no Tandem component reads it.
pub const ATTR_TAKEOVER_POLICY: &str = "tandem.dev/takeover-policy";
/// PV `volumeAttributes`: seconds a CSI-triggered takeover may wait for the old primary. Written
/// by the operator (from `spec.failover.peerTimeout`), read by the CSI plugin.
pub const ATTR_PEER_TIMEOUT: &str = "tandem.dev/peer-timeout-seconds";

/// PV `volumeAttributes`: `None` | `ReadOnly` | `ReadWrite`, what the secondary engine serves hosts
/// (`spec.secondaryAccess`, engine flag `--secondary-access none|read-only|read-write`). Written by
/// the operator, read by the CSI plugin: a read-only stage on the secondary's node never takes
/// over; with `ReadOnly` or `ReadWrite` it opens a point-in-time view there (a snapshot named with
/// [`VIEW_SNAPSHOT_PREFIX`] on that node's engine, taken at the stage and deleted at the unstage),
/// or with `ReadWrite` and [`ATTR_SECONDARY_READ_MODE`] `Current` attaches the live secondary
/// (current reads); with `None` it is FAILED_PRECONDITION. A writable stage there is the failover
/// trigger (a takeover) whatever this says: stages open no forwarded-write sessions yet.
pub const ATTR_SECONDARY_ACCESS: &str = "tandem.dev/secondary-access";

/// PV `volumeAttributes`: `Snapshot` (default) | `Current`, what a read-only stage on the
/// secondary's node reads: a point-in-time view (a consistent image that stays frozen, for
/// backups), or the live secondary (each read waits until the secondary applied the primary's last
/// write; `Current` needs `secondaryAccess: ReadWrite`, and a mounted filesystem then needs
/// `noload`/`norecovery`). Read by the CSI plugin; nothing writes it yet except by hand (issue 18).
pub const ATTR_SECONDARY_READ_MODE: &str = "tandem.dev/secondary-read-mode";

/// Snapshot ids starting with this are point-in-time views a CSI node plugin took on the engine
/// of its own node for a read-only stage (issue 18), deleted at unstage. The plugin may create and
/// delete only these, and only on its own node's engine (storage-engine `authz`). The plugin names
/// them `view-<16 hex digits>`, a stable hash of the volume id and the staging path, so a retried
/// stage finds its own view and a new stage at that path replaces a view an unstage never removed.
pub const VIEW_SNAPSHOT_PREFIX: &str = "view-";

/// The key of the volume token in its Secret. Written by the operator; kubelet hands the Secret
/// to the CSI plugin as NodeStageVolume's secrets (`nodeStageSecretRef`), where it reads this key.
pub const SECRET_TOKEN_KEY: &str = "token";

/// Stage Secret: `node=host:port,...` like [`ATTR_ENGINES`], and `node=unix:...` like [`ATTR_NBD`].
/// Written by the operator into the volume's CSI Secret (mutable, unlike the PV's attributes) and kept
/// current across a live move of an engine to another node (issue 18); the CSI plugin prefers them
/// to the PV's attributes when present.
pub const SECRET_ENGINES_KEY: &str = "tandem-engines";
pub const SECRET_NBD_KEY: &str = "tandem-nbd";

/// Mutual TLS (issue 13): the CA certificate in the same Secret. With it and this node's pair
/// below the CSI plugin calls the engines as `Identity::Csi` of the volume on its node; without
/// them it speaks plaintext (token only).
pub const SECRET_CA_KEY: &str = "ca.crt";

/// The key of the CSI plugin's certificate for `node` in the volume's Secret.
pub fn secret_csi_cert_key(node: &str) -> String {
    format!("csi.{node}.crt")
}

/// The key of the CSI plugin's private key for `node` in the volume's Secret.
pub fn secret_csi_key_key(node: &str) -> String {
    format!("csi.{node}.key")
}

/// The CSI driver's name. Written by the operator into each PV (`spec.csi.driver`) and the chart's
/// CSIDriver; reported by the CSI plugin (GetPluginInfo) and used by kubelet to route the calls.
pub const CSI_DRIVER: &str = "csi.tandem.dev";

/// The topology segment the CSI plugin reports in NodeGetInfo (its node id); read by Kubernetes
/// for `allowedTopologies` and CreateVolume's accessibility requirements. PVs made before issue 18
/// carry it as their node affinity; new ones select the operator's per-volume node label instead
/// (operator `plan::node_label`), which follows a live move.
pub const TOPOLOGY_KEY: &str = "topology.tandem.dev/node";

/// The NBD export serving snapshot `id` of `volume` read-only (issue 14): on every NBD listener
/// of the engine that holds the snapshot, whatever its role, also with `--nbd-pinned-exports-only`.
/// `tandem-engine seed --export` reads a restore from it.
pub fn snapshot_export(volume: &str, id: &str) -> String {
    format!("{volume}@snapshot/{id}")
}
