//! Pure checks and conversions: StorageClass parameters, volume capabilities, capacity ranges and
//! the ids handed to Kubernetes. No I/O, so every refusal is a unit test.

use std::collections::{BTreeMap, HashMap};

use tandem_api::csi as pb;
use tandem_api::csi::volume_capability::{access_mode::Mode, AccessType};

use super::{CsiError, CsiResult};
use crate::crd::{
    parse_duration, parse_quantity, EngineStorage, Failover, FailoverPolicy, FsType, Replication,
    ReplicationMode, SecondaryAccess, SecondaryReadMode, VolumeMode,
};

/// external-provisioner's `--extra-create-metadata`: the claim's namespace.
pub const PVC_NAMESPACE: &str = "csi.storage.k8s.io/pvc/namespace";
/// Keys under this prefix are the sidecars' (secrets, fstype, metadata): never ours, never refused.
const SIDECAR_PREFIX: &str = "csi.storage.k8s.io/";
/// The sidecar's own fsType parameter (`csi.storage.k8s.io/fstype`), also passed as the mount's fs_type.
const SIDECAR_FSTYPE: &str = "csi.storage.k8s.io/fstype";

/// The StorageClass parameters Tandem reads (module doc of [`crate::csi`] says what each does).
pub const PARAMETERS: &[&str] = &[
    "replication",
    "journalSize",
    "failoverPolicy",
    "maxLossBytes",
    "peerTimeout",
    "leaseMs",
    "fsType",
    "secondaryAccess",
    "secondaryReadMode",
    "hostPath",
    "engineStorageClass",
    "nodeSelector",
];

/// Volume sizes are whole MiB: the engines' block size divides it, and `spec.size` stays short.
pub const MIB: u64 = 1 << 20;
/// The default size when the claim asks for none (CSI lets the plugin choose).
pub const DEFAULT_BYTES: u64 = 1 << 30;
/// The largest volume the controller provisions: 64 TiB (`spec.size` and the engines' tables are
/// sized for far less in practice; larger asks are OUT_OF_RANGE, not a volume that never starts).
pub const MAX_BYTES: u64 = 64 << 40;
/// MirroredVolume names are at most 40 characters (they prefix pod and Service names).
pub const MAX_NAME: usize = 40;

/// What a StorageClass asks for, as spec fragments.
#[derive(Clone, Debug, PartialEq)]
pub struct Parameters {
    pub namespace: String,
    pub replication: Replication,
    pub failover: Failover,
    pub fs_type: Option<FsType>,
    pub secondary_access: SecondaryAccess,
    /// `secondaryReadMode`: what a reader on the secondary's node gets.
    pub secondary_read_mode: SecondaryReadMode,
    pub engine_storage: EngineStorage,
    pub node_selector: BTreeMap<String, String>,
}

fn invalid(key: &str, value: &str, why: &str) -> CsiError {
    CsiError::Invalid(format!("parameter {key}={value:?}: {why}"))
}

fn fs_type(value: &str, key: &str) -> CsiResult<FsType> {
    match value.trim().to_ascii_lowercase().as_str() {
        "ext4" => Ok(FsType::Ext4),
        "xfs" => Ok(FsType::Xfs),
        _ => Err(invalid(key, value, "supported are ext4, xfs")),
    }
}

fn quantity(key: &str, value: &str) -> CsiResult<String> {
    match parse_quantity(value) {
        Some(n) if n > 0 => Ok(value.to_string()),
        _ => Err(invalid(
            key,
            value,
            "a binary quantity is expected (512Mi, 1Gi)",
        )),
    }
}

/// Parses `k=v,k2=v2` (empty: no selector).
pub fn node_selector(value: &str) -> CsiResult<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for pair in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((k, v)) = pair.split_once('=') else {
            return Err(invalid("nodeSelector", value, "expected k=v,k2=v2"));
        };
        let (k, v) = (k.trim(), v.trim());
        if k.is_empty() || out.insert(k.to_string(), v.to_string()).is_some() {
            return Err(invalid(
                "nodeSelector",
                value,
                "empty or repeated label key",
            ));
        }
    }
    Ok(out)
}

/// Reads CreateVolume's `parameters`. Unknown keys are refused by name; the sidecars' keys pass.
pub fn parameters(map: &HashMap<String, String>) -> CsiResult<Parameters> {
    let mut unknown: Vec<&str> = map
        .keys()
        .map(String::as_str)
        .filter(|k| !k.starts_with(SIDECAR_PREFIX) && !PARAMETERS.contains(k))
        .collect();
    unknown.sort_unstable();
    if let Some(first) = unknown.first() {
        return Err(CsiError::Invalid(format!(
            "unknown StorageClass parameter {first:?} (known: {})",
            PARAMETERS.join(", ")
        )));
    }
    let get = |k: &str| map.get(k).map(|v| v.trim()).filter(|v| !v.is_empty());
    let namespace = get(PVC_NAMESPACE).ok_or_else(|| {
        CsiError::Invalid(format!(
            "parameter {PVC_NAMESPACE} is missing: run external-provisioner with --extra-create-metadata"
        ))
    })?;
    let mut replication = Replication::default();
    if let Some(v) = get("replication") {
        replication.mode = match v {
            "Async" => ReplicationMode::Async,
            "Sync" => ReplicationMode::Sync,
            _ => return Err(invalid("replication", v, "Async or Sync")),
        };
    }
    if let Some(v) = get("journalSize") {
        replication.journal_size = Some(quantity("journalSize", v)?);
    }
    let mut failover = Failover::default();
    if let Some(v) = get("failoverPolicy") {
        failover.policy = match v {
            "WaitForPrimary" => FailoverPolicy::WaitForPrimary,
            "ForcePromote" => FailoverPolicy::ForcePromote,
            "MaxLoss" => FailoverPolicy::MaxLoss,
            _ => {
                return Err(invalid(
                    "failoverPolicy",
                    v,
                    "WaitForPrimary, ForcePromote or MaxLoss",
                ))
            }
        };
    }
    if let Some(v) = get("maxLossBytes") {
        if parse_quantity(v).is_none() {
            return Err(invalid("maxLossBytes", v, "a binary quantity (0, 64Mi)"));
        }
        failover.max_loss_bytes = Some(v.to_string());
    }
    if failover.policy == FailoverPolicy::MaxLoss && failover.max_loss_bytes.is_none() {
        return Err(CsiError::Invalid(
            "parameter failoverPolicy=MaxLoss needs maxLossBytes".into(),
        ));
    }
    if let Some(v) = get("peerTimeout") {
        if parse_duration(v).is_none() || v.len() > 8 {
            return Err(invalid(
                "peerTimeout",
                v,
                "a duration like 500ms, 30s or 2m",
            ));
        }
        failover.peer_timeout = v.to_string();
    }
    if let Some(v) = get("leaseMs") {
        failover.lease_ms = match v.parse::<u32>() {
            Ok(n) if n <= 600_000 => n,
            _ => return Err(invalid("leaseMs", v, "milliseconds, 0..=600000")),
        };
    }
    let ours = get("fsType").map(|v| fs_type(v, "fsType")).transpose()?;
    let sidecar = get(SIDECAR_FSTYPE)
        .map(|v| fs_type(v, SIDECAR_FSTYPE))
        .transpose()?;
    let fs_type = match (ours, sidecar) {
        (Some(a), Some(b)) if a != b => {
            return Err(CsiError::Invalid(format!(
                "parameters fsType={} and {SIDECAR_FSTYPE}={} disagree",
                a.as_str(),
                b.as_str()
            )))
        }
        (a, b) => a.or(b),
    };
    let secondary_access = match get("secondaryAccess") {
        None | Some("None") => SecondaryAccess::None,
        Some("ReadOnly") => SecondaryAccess::ReadOnly,
        Some("ReadWrite") => SecondaryAccess::ReadWrite,
        Some(v) => return Err(invalid("secondaryAccess", v, "None, ReadOnly or ReadWrite")),
    };
    let secondary_read_mode = match get("secondaryReadMode") {
        None | Some("Snapshot") => SecondaryReadMode::Snapshot,
        Some("Current") if secondary_access == SecondaryAccess::ReadWrite => {
            SecondaryReadMode::Current
        }
        Some(v) => {
            return Err(invalid(
                "secondaryReadMode",
                v,
                "Snapshot, or Current with secondaryAccess ReadWrite",
            ))
        }
    };
    let engine_storage = match (get("hostPath"), get("engineStorageClass")) {
        (Some(p), None) if p.starts_with('/') => EngineStorage {
            host_path: Some(p.to_string()),
            storage_class_name: None,
        },
        (Some(p), None) => return Err(invalid("hostPath", p, "an absolute path")),
        (None, Some(c)) => EngineStorage {
            host_path: None,
            storage_class_name: Some(c.to_string()),
        },
        _ => {
            return Err(CsiError::Invalid(
                "set exactly one of the parameters hostPath or engineStorageClass (where the engines keep their data)".into(),
            ))
        }
    };
    let node_selector = node_selector(get("nodeSelector").unwrap_or(""))?;
    Ok(Parameters {
        namespace: namespace.to_string(),
        replication,
        failover,
        fs_type,
        secondary_access,
        secondary_read_mode,
        engine_storage,
        node_selector,
    })
}

/// What the requested capabilities mean for the volume: its mode and the filesystem the mount asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Access {
    pub mode: VolumeMode,
    pub fs_type: Option<FsType>,
}

/// Checks each capability: any single-node mode (read-only too), block or a mount with ext4/xfs.
/// Multi-node modes need the secondary's node to serve (issue 18): MULTI_NODE_READER_ONLY with
/// `secondaryAccess: ReadOnly` or `ReadWrite` (a reader on the secondary's node gets a
/// point-in-time view, or current reads), MULTI_NODE_MULTI_WRITER on raw block with `ReadWrite`
/// (a writer on the secondary's node has its writes forwarded to the primary). Not
/// MULTI_NODE_SINGLE_WRITER (Kubernetes has no access mode for it). Anything else is
/// INVALID_ARGUMENT (the CSI "unsupported field" case).
pub fn capabilities(
    caps: &[pb::VolumeCapability],
    secondary: SecondaryAccess,
) -> CsiResult<Access> {
    if caps.is_empty() {
        return Err(CsiError::Invalid("volume_capabilities is empty".into()));
    }
    let mut mode = None;
    let mut fs = None;
    for cap in caps {
        let access = cap
            .access_mode
            .as_ref()
            .map(|m| Mode::try_from(m.mode).unwrap_or(Mode::Unknown))
            .unwrap_or(Mode::Unknown);
        match access {
            Mode::SingleNodeWriter
            | Mode::SingleNodeSingleWriter
            | Mode::SingleNodeMultiWriter
            | Mode::SingleNodeReaderOnly => {}
            Mode::MultiNodeReaderOnly if secondary != SecondaryAccess::None => {}
            // Safety: a filesystem mounted writable on two nodes is corrupted by either; only a
            // raw block device is shared between writers.
            Mode::MultiNodeMultiWriter if secondary == SecondaryAccess::ReadWrite => {
                if !matches!(cap.access_type, Some(AccessType::Block(_))) {
                    return Err(CsiError::Invalid(
                        "access mode MULTI_NODE_MULTI_WRITER (ReadWriteMany) is for raw block \
                         volumes only: a filesystem cannot be mounted writable on two nodes"
                            .into(),
                    ));
                }
            }
            Mode::Unknown => {
                return Err(CsiError::Invalid(
                    "volume_capabilities: access_mode is missing".into(),
                ))
            }
            other => {
                return Err(CsiError::Invalid(format!(
                    "access mode {} is not supported with secondaryAccess {secondary:?}: a Tandem volume is attached on one node at a time (ReadWriteOnce or ReadWriteOncePod); ReadOnlyMany needs secondaryAccess ReadOnly or ReadWrite, ReadWriteMany a raw block volume with secondaryAccess ReadWrite",
                    other.as_str_name()
                )))
            }
        }
        let this = match &cap.access_type {
            None => {
                return Err(CsiError::Invalid(
                    "volume_capabilities: access_type is missing".into(),
                ))
            }
            Some(AccessType::Block(_)) => VolumeMode::Block,
            Some(AccessType::Mount(m)) => {
                if !m.volume_mount_group.is_empty() {
                    return Err(CsiError::Invalid(
                        "volume_mount_group is not supported".into(),
                    ));
                }
                if !m.fs_type.trim().is_empty() {
                    let f = fs_type(&m.fs_type, "volume_capabilities.mount.fs_type")?;
                    if fs.is_some_and(|g| g != f) {
                        return Err(CsiError::Invalid(
                            "volume_capabilities ask for two filesystems".into(),
                        ));
                    }
                    fs = Some(f);
                }
                VolumeMode::Filesystem
            }
        };
        if mode.is_some_and(|m| m != this) {
            return Err(CsiError::Invalid(
                "volume_capabilities mix block and mount access".into(),
            ));
        }
        mode = Some(this);
    }
    Ok(Access {
        mode: mode.unwrap_or_default(),
        fs_type: fs,
    })
}

/// The size to provision for `range`: the required bytes rounded up to whole MiB (the default
/// when unset), within the limit and [`MAX_BYTES`], else OUT_OF_RANGE.
pub fn capacity(range: Option<&pb::CapacityRange>) -> CsiResult<u64> {
    let (required, limit) = range
        .map(|r| (r.required_bytes, r.limit_bytes))
        .unwrap_or((0, 0));
    if required < 0 || limit < 0 {
        return Err(CsiError::OutOfRange(format!(
            "negative capacity range ({required}, {limit})"
        )));
    }
    let (required, limit) = (required as u64, limit as u64);
    if limit != 0 && limit < required {
        return Err(CsiError::OutOfRange(format!(
            "limit_bytes {limit} is below required_bytes {required}"
        )));
    }
    let want = if required == 0 {
        if limit != 0 {
            limit.min(DEFAULT_BYTES) / MIB * MIB
        } else {
            DEFAULT_BYTES
        }
    } else {
        required.div_ceil(MIB).saturating_mul(MIB)
    };
    if want == 0 || (limit != 0 && want > limit) {
        return Err(CsiError::OutOfRange(format!(
            "volumes are whole MiB: no size in [{required}, {limit}] bytes"
        )));
    }
    if want > MAX_BYTES {
        return Err(CsiError::OutOfRange(format!(
            "{want} bytes is more than the {MAX_BYTES} bytes a Tandem volume may have"
        )));
    }
    Ok(want)
}

/// `spec.size` for whole MiB: `NGi` when it divides, else `NMi`.
pub fn size_string(bytes: u64) -> String {
    if bytes % (1 << 30) == 0 {
        format!("{}Gi", bytes >> 30)
    } else {
        format!("{}Mi", bytes.div_ceil(MIB))
    }
}

/// Checks a CreateVolume name as a MirroredVolume name (a DNS label of at most 40 characters).
pub fn volume_name(name: &str) -> CsiResult<()> {
    if name.is_empty() {
        return Err(CsiError::Invalid("name is missing".into()));
    }
    if name.len() > MAX_NAME {
        return Err(CsiError::Invalid(format!(
            "name {name:?} is longer than {MAX_NAME} characters, the most a MirroredVolume name may have (external-provisioner's default pvc-<uid> fits; shorten --volume-name-prefix)"
        )));
    }
    let label = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if !label {
        return Err(CsiError::Invalid(format!(
            "name {name:?} is not a DNS label (lowercase letters, digits and '-')"
        )));
    }
    Ok(())
}

/// Checks a snapshot name as an engine snapshot id (`[a-zA-Z0-9._-]{1,128}`).
pub fn snapshot_name(name: &str) -> CsiResult<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(CsiError::Invalid(format!(
            "snapshot name {name:?} must be 1-128 of [a-zA-Z0-9._-]"
        )))
    }
}

/// `<namespace>/<name>`.
pub fn volume_id(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

/// Splits a volume id; `None` when it cannot be one of ours.
pub fn parse_volume_id(id: &str) -> Option<(&str, &str)> {
    let (ns, name) = id.split_once('/')?;
    (!ns.is_empty() && !name.is_empty() && !name.contains('/')).then_some((ns, name))
}

/// `<namespace>/<volume>/<id>`.
pub fn snapshot_id(namespace: &str, volume: &str, id: &str) -> String {
    format!("{namespace}/{volume}/{id}")
}

/// Splits a snapshot id into namespace, volume and engine snapshot id; `None` when it cannot be ours.
pub fn parse_snapshot_id(id: &str) -> Option<(&str, &str, &str)> {
    let mut parts = id.splitn(3, '/');
    let (ns, volume, snap) = (parts.next()?, parts.next()?, parts.next()?);
    let ok = !ns.is_empty() && !volume.is_empty() && snapshot_name(snap).is_ok();
    ok.then_some((ns, volume, snap))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(extra: &[(&str, &str)]) -> HashMap<String, String> {
        let mut m: HashMap<String, String> = [
            (PVC_NAMESPACE, "apps"),
            ("hostPath", "/var/lib/tandem"),
            ("csi.storage.k8s.io/pvc/name", "data-db-0"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        for (k, v) in extra {
            m.insert(k.to_string(), v.to_string());
        }
        m
    }

    #[test]
    fn every_parameter_lands_in_the_spec() {
        let p = parameters(&params(&[
            ("replication", "Sync"),
            ("journalSize", "128Mi"),
            ("failoverPolicy", "MaxLoss"),
            ("maxLossBytes", "16Mi"),
            ("peerTimeout", "10s"),
            ("leaseMs", "5000"),
            ("fsType", "xfs"),
            ("secondaryAccess", "ReadOnly"),
            ("nodeSelector", "tandem.dev/storage=true, zone=a"),
        ]))
        .unwrap();
        assert_eq!(p.namespace, "apps");
        assert_eq!(p.replication.mode, ReplicationMode::Sync);
        assert_eq!(p.replication.journal_size.as_deref(), Some("128Mi"));
        assert_eq!(p.failover.policy, FailoverPolicy::MaxLoss);
        assert_eq!(p.failover.max_loss(), Some(16 << 20));
        assert_eq!(p.failover.peer_timeout, "10s");
        assert_eq!(p.failover.lease_ms, 5000);
        assert_eq!(p.fs_type, Some(FsType::Xfs));
        assert_eq!(p.secondary_access, SecondaryAccess::ReadOnly);
        let rw = parameters(&params(&[("secondaryAccess", "ReadWrite")])).unwrap();
        assert_eq!(rw.secondary_access, SecondaryAccess::ReadWrite);
        assert_eq!(rw.secondary_read_mode, SecondaryReadMode::Snapshot);
        let current = parameters(&params(&[
            ("secondaryAccess", "ReadWrite"),
            ("secondaryReadMode", "Current"),
        ]))
        .unwrap();
        assert_eq!(current.secondary_read_mode, SecondaryReadMode::Current);
        // Current reads come from a live secondary, which only ReadWrite serves.
        let e = parameters(&params(&[
            ("secondaryAccess", "ReadOnly"),
            ("secondaryReadMode", "Current"),
        ]))
        .unwrap_err();
        assert!(e.to_string().contains("secondaryReadMode"), "{e}");
        assert_eq!(
            p.engine_storage.host_path.as_deref(),
            Some("/var/lib/tandem")
        );
        assert_eq!(p.node_selector.len(), 2);
        assert_eq!(p.node_selector["zone"], "a");
    }

    #[test]
    fn unknown_and_bad_parameters_are_refused_by_name() {
        let e = parameters(&params(&[("replicas", "3")])).unwrap_err();
        assert!(
            matches!(&e, CsiError::Invalid(m) if m.contains("\"replicas\"")),
            "{e}"
        );
        for (k, v) in [
            ("replication", "sync"),
            ("failoverPolicy", "MaxLoss"),
            ("leaseMs", "700000"),
            ("peerTimeout", "10"),
            ("fsType", "btrfs"),
            ("nodeSelector", "zone"),
            ("journalSize", "lots"),
        ] {
            let e = parameters(&params(&[(k, v)])).unwrap_err();
            assert!(
                matches!(&e, CsiError::Invalid(m) if m.contains(k)),
                "{k}={v}: {e}"
            );
        }
        let mut both = params(&[("engineStorageClass", "local-path")]);
        assert!(
            parameters(&both).is_err(),
            "hostPath and engineStorageClass"
        );
        both.remove("hostPath");
        both.remove("engineStorageClass");
        assert!(parameters(&both).is_err(), "neither");
        let mut no_ns = params(&[]);
        no_ns.remove(PVC_NAMESPACE);
        let e = parameters(&no_ns).unwrap_err();
        assert!(e.to_string().contains("--extra-create-metadata"), "{e}");
        let e = parameters(&params(&[("fsType", "ext4"), (SIDECAR_FSTYPE, "xfs")])).unwrap_err();
        assert!(e.to_string().contains("disagree"), "{e}");
    }

    fn cap(mode: Mode, block: bool, fs: &str) -> pb::VolumeCapability {
        pb::VolumeCapability {
            access_type: Some(if block {
                AccessType::Block(pb::volume_capability::BlockVolume {})
            } else {
                AccessType::Mount(pb::volume_capability::MountVolume {
                    fs_type: fs.into(),
                    ..Default::default()
                })
            }),
            access_mode: Some(pb::volume_capability::AccessMode { mode: mode as i32 }),
        }
    }

    #[test]
    fn single_node_modes_pass_and_multi_node_modes_are_refused() {
        let none = SecondaryAccess::None;
        for m in [
            Mode::SingleNodeWriter,
            Mode::SingleNodeSingleWriter,
            Mode::SingleNodeMultiWriter,
            Mode::SingleNodeReaderOnly,
        ] {
            let a = capabilities(&[cap(m, false, "xfs")], none).unwrap();
            assert_eq!(a.mode, VolumeMode::Filesystem);
            assert_eq!(a.fs_type, Some(FsType::Xfs));
            assert_eq!(
                capabilities(&[cap(m, true, "")], none).unwrap().mode,
                VolumeMode::Block
            );
        }
        for m in [
            Mode::MultiNodeMultiWriter,
            Mode::MultiNodeSingleWriter,
            Mode::MultiNodeReaderOnly,
        ] {
            let e = capabilities(&[cap(m, false, "")], none).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            assert!(e.to_string().contains(m.as_str_name()), "{e}");
        }
        assert!(capabilities(&[], none).is_err());
        assert!(capabilities(&[cap(Mode::SingleNodeWriter, false, "btrfs")], none).is_err());
        let mixed = [
            cap(Mode::SingleNodeWriter, false, ""),
            cap(Mode::SingleNodeWriter, true, ""),
        ];
        assert!(capabilities(&mixed, none).is_err());
    }

    /// Issue 18: ReadOnlyMany with a secondary that serves readers (views or current reads);
    /// ReadWriteMany on raw block with a ReadWrite secondary (forwarded writes), never on a
    /// filesystem; never MULTI_NODE_SINGLE_WRITER.
    #[test]
    fn multi_node_modes_follow_the_secondarys_access() {
        use SecondaryAccess::{ReadOnly, ReadWrite};
        for block in [false, true] {
            for s in [ReadOnly, ReadWrite] {
                assert!(capabilities(&[cap(Mode::MultiNodeReaderOnly, block, "")], s).is_ok());
            }
        }
        let rwx = capabilities(&[cap(Mode::MultiNodeMultiWriter, true, "")], ReadWrite).unwrap();
        assert_eq!(rwx.mode, VolumeMode::Block);
        let e =
            capabilities(&[cap(Mode::MultiNodeMultiWriter, false, "ext4")], ReadWrite).unwrap_err();
        assert!(e.to_string().contains("raw block"), "{e}");
        assert!(capabilities(&[cap(Mode::MultiNodeMultiWriter, true, "")], ReadOnly).is_err());
        for s in [ReadOnly, ReadWrite] {
            assert!(capabilities(&[cap(Mode::MultiNodeSingleWriter, true, "")], s).is_err());
        }
    }

    fn range(required: u64, limit: u64) -> pb::CapacityRange {
        pb::CapacityRange {
            required_bytes: required as i64,
            limit_bytes: limit as i64,
        }
    }

    #[test]
    fn capacity_rounds_up_to_mib_within_the_limit() {
        assert_eq!(capacity(None).unwrap(), DEFAULT_BYTES);
        assert_eq!(capacity(Some(&range(1, 0))).unwrap(), MIB);
        assert_eq!(capacity(Some(&range(5 << 30, 0))).unwrap(), 5 << 30);
        assert_eq!(capacity(Some(&range(0, 100 * MIB))).unwrap(), 100 * MIB);
        let e = capacity(Some(&range(2 * MIB, MIB))).unwrap_err();
        assert_eq!(e.code(), tonic::Code::OutOfRange);
        // Rounding up would pass the limit.
        assert!(capacity(Some(&range(MIB + 1, MIB + 2))).is_err());
        assert!(capacity(Some(&range(0, 1000))).is_err());
        assert!(capacity(Some(&range(MAX_BYTES + 1, 0))).is_err());
        let negative = pb::CapacityRange {
            required_bytes: -1,
            limit_bytes: 0,
        };
        assert!(capacity(Some(&negative)).is_err());
        assert_eq!(size_string(5 << 30), "5Gi");
        assert_eq!(size_string(1536 * MIB), "1536Mi");
    }

    #[test]
    fn names_and_ids() {
        volume_name("pvc-0b5e6b7c-2f3a-4c1d-9e8f-0123456789ab").unwrap();
        let long = format!("pvc-{}", "a".repeat(40));
        let e = volume_name(&long).unwrap_err();
        assert!(e.to_string().contains("40"), "{e}");
        assert!(volume_name("Pvc-1").is_err());
        assert!(volume_name("").is_err());
        assert_eq!(parse_volume_id("apps/pvc-1"), Some(("apps", "pvc-1")));
        assert_eq!(parse_volume_id("pvc-1"), None);
        assert_eq!(parse_volume_id("a/b/c"), None);
        let id = snapshot_id("apps", "pvc-1", "snapshot-9");
        assert_eq!(
            parse_snapshot_id(&id),
            Some(("apps", "pvc-1", "snapshot-9"))
        );
        assert_eq!(parse_snapshot_id("apps/pvc-1"), None);
        assert_eq!(parse_snapshot_id("apps/pvc-1/a/b"), None);
    }
}
