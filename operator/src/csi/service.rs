//! The controller's logic: each CSI call as a MirroredVolume change plus a bounded wait for the
//! operator, or as engine snapshot calls. Works on the CSI messages but returns [`CsiError`]s; the
//! gRPC adapters in [`super::grpc`] only map them to codes.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::{Duration, Instant},
};

use kube::ResourceExt;
use tandem_api::contract::TOPOLOGY_KEY;
use tandem_api::csi as pb;

use super::{
    engines::{EngineSnapshot, SnapshotApi},
    kube::{Created, VolumeApi},
    params::{self, Access, Parameters},
    CsiError, CsiResult,
};
use crate::{
    crd::{
        parse_quantity, MirroredVolume, MirroredVolumeSpec, Placement, SnapshotSource, VolumeMode,
        VolumeSource,
    },
    engine::EngineTarget,
    plan::{self, names, EngineConfig},
};

/// Label on the MirroredVolumes the controller creates (for `kubectl get mv -l`).
pub const PROVISIONED_LABEL: &str = "tandem.dev/provisioned-by";
/// `status.placement.reason` once the operator placed the engines.
pub const PLACED: &str = "Placed";

/// The CSI controller: the Kubernetes API, the engines, and how long to wait for the operator.
pub struct Controller {
    pub volumes: Arc<dyn VolumeApi>,
    pub snapshots: Arc<dyn SnapshotApi>,
    /// The operator's deployment settings (namespace, cluster domain): the PV attributes name the
    /// engines' Services with them.
    pub cfg: EngineConfig,
    /// How long CreateVolume and ControllerExpandVolume wait for the operator before answering
    /// ABORTED (the sidecars retry with back-off, and the next call finds the work done).
    pub wait: Duration,
    /// How often they look again meanwhile.
    pub poll: Duration,
}

fn bytes_of(mv: &MirroredVolume) -> u64 {
    parse_quantity(&mv.spec.size).unwrap_or(0)
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The nodes the engines may use and the one the primary should start on, from CreateVolume's
/// accessibility requirements (topology key [`TOPOLOGY_KEY`], the node plugin's NodeGetInfo).
pub fn placement_of(
    req: Option<&pb::TopologyRequirement>,
    node_selector: BTreeMap<String, String>,
) -> CsiResult<Placement> {
    let node = |t: &pb::Topology| -> CsiResult<String> {
        t.segments
            .get(TOPOLOGY_KEY)
            .filter(|n| !n.is_empty())
            .cloned()
            .ok_or_else(|| {
                CsiError::Invalid(format!(
                    "accessibility_requirements: a topology without {TOPOLOGY_KEY}"
                ))
            })
    };
    let mut placement = Placement {
        node_selector: Some(node_selector),
        ..Default::default()
    };
    let Some(req) = req else {
        return Ok(placement);
    };
    if !req.requisite.is_empty() {
        let mut allowed: Vec<String> = Vec::new();
        for t in &req.requisite {
            let n = node(t)?;
            if !allowed.contains(&n) {
                allowed.push(n);
            }
        }
        if allowed.len() < 2 {
            return Err(CsiError::Exhausted(format!(
                "a mirrored volume needs two nodes, the accessibility requirements allow only {} (do not run external-provisioner with --strict-topology)",
                allowed.join(", ")
            )));
        }
        allowed.sort();
        placement.allowed_nodes = Some(allowed);
    }
    if let Some(first) = req.preferred.first() {
        placement.preferred_primary = Some(node(first)?);
    }
    Ok(placement)
}

/// CreateVolume's accessible topology: one segment, the volume's node label (`plan::node_label`),
/// which the operator keeps on the nodes holding its engines and moves with a live move.
/// external-provisioner turns each segment into a PV node affinity term as it is (`key In [value]`,
/// with no check against the keys NodeGetInfo reports), so the PV follows the engines; the topology
/// key [`TOPOLOGY_KEY`] would pin it to the first two nodes for good. A volume never spans
/// anything but its two engine nodes, so nothing else needs saying.
pub fn accessible_topology(mv: &MirroredVolume) -> pb::Topology {
    let (label, value) = plan::node_label(mv);
    pb::Topology {
        segments: HashMap::from([(label, value)]),
    }
}

impl Controller {
    async fn existing(&self, namespace: &str, name: &str) -> CsiResult<MirroredVolume> {
        self.volumes
            .get(namespace, name)
            .await?
            .ok_or_else(|| CsiError::NotFound(format!("volume {namespace}/{name} does not exist")))
    }

    async fn content_source(
        &self,
        namespace: &str,
        source: Option<&pb::VolumeContentSource>,
        bytes: u64,
    ) -> CsiResult<Option<VolumeSource>> {
        use pb::volume_content_source::Type;
        let Some(kind) = source.and_then(|s| s.r#type.as_ref()) else {
            return Ok(None);
        };
        let same_ns = |ns: &str| {
            if ns == namespace {
                Ok(())
            } else {
                Err(CsiError::Invalid(format!(
                    "volume_content_source is in namespace {ns}, the claim in {namespace}: a volume restores from its own namespace"
                )))
            }
        };
        match kind {
            Type::Snapshot(s) => {
                let (ns, volume, id) =
                    params::parse_snapshot_id(&s.snapshot_id).ok_or_else(|| {
                        CsiError::NotFound(format!("snapshot {:?} does not exist", s.snapshot_id))
                    })?;
                same_ns(ns)?;
                self.existing(ns, volume).await.map_err(|e| match e {
                    CsiError::NotFound(_) => CsiError::NotFound(format!(
                        "snapshot {}: its volume {ns}/{volume} does not exist",
                        s.snapshot_id
                    )),
                    other => other,
                })?;
                Ok(Some(VolumeSource {
                    snapshot: Some(SnapshotSource {
                        volume: volume.to_string(),
                        id: id.to_string(),
                    }),
                    volume: None,
                }))
            }
            Type::Volume(v) => {
                let (ns, name) = params::parse_volume_id(&v.volume_id).ok_or_else(|| {
                    CsiError::NotFound(format!("volume {:?} does not exist", v.volume_id))
                })?;
                same_ns(ns)?;
                let src = self.existing(ns, name).await?;
                if bytes_of(&src) > bytes {
                    return Err(CsiError::OutOfRange(format!(
                        "the clone ({bytes} bytes) is smaller than its source {ns}/{name} ({})",
                        src.spec.size
                    )));
                }
                Ok(Some(VolumeSource {
                    snapshot: None,
                    volume: Some(name.to_string()),
                }))
            }
        }
    }

    /// The MirroredVolume CreateVolume asks for.
    fn desired(
        name: &str,
        p: Parameters,
        access: &Access,
        bytes: u64,
        placement: Placement,
        source: Option<VolumeSource>,
    ) -> CsiResult<MirroredVolume> {
        let fs_type = match (access.fs_type, p.fs_type) {
            (Some(a), Some(b)) if a != b => {
                return Err(CsiError::Invalid(format!(
                    "the mount asks for {}, the StorageClass for {}",
                    a.as_str(),
                    b.as_str()
                )))
            }
            (a, b) => a.or(b).unwrap_or_default(),
        };
        let mut mv = MirroredVolume::new(
            name,
            MirroredVolumeSpec {
                size: params::size_string(bytes),
                replication: p.replication,
                placement,
                engine_storage: p.engine_storage,
                failover: p.failover,
                secondary_access: p.secondary_access,
                secondary_read_mode: p.secondary_read_mode,
                primary_node: None,
                switchover_policy: Default::default(),
                volume_mode: access.mode,
                fs_type,
                claim: None,
                source,
                persistent_volume_name: Some(name.to_string()),
            },
        );
        mv.metadata.namespace = Some(p.namespace);
        mv.metadata.labels = Some(BTreeMap::from([(
            PROVISIONED_LABEL.to_string(),
            tandem_api::contract::CSI_DRIVER.to_string(),
        )]));
        Ok(mv)
    }

    /// An existing volume answers a retried CreateVolume when it is the same ask: same spec, and a
    /// size within the range. One left unplaced by an earlier ask with other topology (the
    /// scheduler picked another node after RESOURCE_EXHAUSTED) is deleted and made again.
    async fn reuse(
        &self,
        existing: MirroredVolume,
        desired: &MirroredVolume,
        limit: u64,
    ) -> CsiResult<MirroredVolume> {
        let (ns, name) = (desired.namespace().unwrap_or_default(), desired.name_any());
        if existing.spec.persistent_volume_name.as_deref() != Some(name.as_str()) {
            return Err(CsiError::AlreadyExists(format!(
                "MirroredVolume {ns}/{name} exists and was not provisioned for this volume"
            )));
        }
        if existing.metadata.deletion_timestamp.is_some() {
            return Err(CsiError::Pending(format!(
                "MirroredVolume {ns}/{name} from an earlier attempt is being deleted"
            )));
        }
        let have = bytes_of(&existing);
        let size_fits = have >= bytes_of(desired) && (limit == 0 || have <= limit);
        let mut same = existing.spec.clone();
        same.size = desired.spec.size.clone();
        let nodes = existing
            .status
            .as_ref()
            .map(|s| s.nodes.clone())
            .unwrap_or_default();
        let placed = nodes.len() == 2;
        if same.placement != desired.spec.placement {
            let wanted = &desired.spec.placement;
            let fits = wanted
                .allowed_nodes
                .as_ref()
                .is_none_or(|allowed| nodes.iter().all(|n| allowed.contains(n)));
            let same_selector = same.placement.node_selector == wanted.node_selector
                && same.placement.nodes == wanted.nodes;
            if placed && fits && same_selector {
                // Placed already on nodes the new ask allows (a retry after the pod moved):
                // the volume answers it; its placement is immutable anyway.
                same.placement = wanted.clone();
            } else if !placed {
                // Never placed, so no engine and no data exists: safe to make it again (test
                // csi::tests::an_unplaced_volume_asked_again_with_other_topology_is_made_again).
                self.volumes.delete(&ns, &name).await?;
                return Err(CsiError::Pending(format!(
                    "MirroredVolume {ns}/{name} was not placed with the earlier topology; deleted to make it again"
                )));
            }
        }
        if !size_fits || same != desired.spec {
            return Err(CsiError::AlreadyExists(format!(
                "MirroredVolume {ns}/{name} exists with other parameters or size ({})",
                existing.spec.size
            )));
        }
        Ok(existing)
    }

    /// Waits (bounded) until the operator placed the volume: its two nodes, or why it cannot.
    async fn placed(&self, mut mv: MirroredVolume) -> CsiResult<(MirroredVolume, [String; 2])> {
        let deadline = Instant::now() + self.wait;
        let (ns, name) = (mv.namespace().unwrap_or_default(), mv.name_any());
        loop {
            let status = mv.status.clone().unwrap_or_default();
            if let [a, b] = status.nodes.as_slice() {
                let nodes = [a.clone(), b.clone()];
                return Ok((mv, nodes));
            }
            if let Some(p) = status.placement.as_ref().filter(|p| p.reason != PLACED) {
                return Err(CsiError::Exhausted(format!(
                    "MirroredVolume {ns}/{name} cannot be placed: {}: {}",
                    p.reason, p.message
                )));
            }
            if Instant::now() + self.poll > deadline {
                return Err(CsiError::Pending(format!(
                    "MirroredVolume {ns}/{name} is not placed yet (the operator picks its two nodes); retrying"
                )));
            }
            tokio::time::sleep(self.poll).await;
            mv = self.volumes.get(&ns, &name).await?.ok_or_else(|| {
                CsiError::Pending(format!("MirroredVolume {ns}/{name} vanished while placed"))
            })?;
        }
    }

    pub async fn create_volume(&self, req: pb::CreateVolumeRequest) -> CsiResult<pb::Volume> {
        params::volume_name(&req.name)?;
        let p = params::parameters(&req.parameters)?;
        let access = params::capabilities(&req.volume_capabilities, p.secondary_access)?;
        let bytes = params::capacity(req.capacity_range.as_ref())?;
        let limit = req
            .capacity_range
            .as_ref()
            .map_or(0, |r| u64::try_from(r.limit_bytes).unwrap_or(0));
        let placement = placement_of(
            req.accessibility_requirements.as_ref(),
            p.node_selector.clone(),
        )?;
        let namespace = p.namespace.clone();
        let source = self
            .content_source(&namespace, req.volume_content_source.as_ref(), bytes)
            .await?;
        let desired = Self::desired(&req.name, p, &access, bytes, placement, source)?;
        let mv = match self.volumes.get(&namespace, &req.name).await? {
            Some(existing) => self.reuse(existing, &desired, limit).await?,
            None => match self.volumes.create(&desired).await? {
                Created::Created(mv) => *mv,
                Created::Conflict => {
                    return Err(CsiError::Pending(format!(
                        "MirroredVolume {namespace}/{} was created concurrently; retrying",
                        req.name
                    )))
                }
            },
        };
        // Once placed, the volume's node label is on both engine nodes: the operator sets it
        // before it writes status.nodes.
        let (mv, nodes) = self.placed(mv).await?;
        Ok(pb::Volume {
            capacity_bytes: to_i64(bytes_of(&mv)),
            volume_id: params::volume_id(&namespace, &req.name),
            volume_context: plan::pv_attributes(&mv, &nodes, &self.cfg)
                .into_iter()
                .collect(),
            content_source: req.volume_content_source,
            accessible_topology: vec![accessible_topology(&mv)],
        })
    }

    /// Deletes the volume's MirroredVolume; the operator's finalizer stops the engines and wipes
    /// their data. An unknown id is success (the CSI rule for DeleteVolume).
    pub async fn delete_volume(&self, volume_id: &str) -> CsiResult<()> {
        if volume_id.is_empty() {
            return Err(CsiError::Invalid("volume_id is missing".into()));
        }
        let Some((ns, name)) = params::parse_volume_id(volume_id) else {
            return Ok(());
        };
        let Some(mv) = self.volumes.get(ns, name).await? else {
            return Ok(());
        };
        // Only what this controller provisioned: a hand-written volume's PV is Retain and
        // never reaches here, and a mistaken call must not wipe one (test
        // csi::tests::delete_volume_deletes_only_provisioned_volumes_and_unknown_ids_succeed).
        if mv.spec.persistent_volume_name.is_none() {
            return Err(CsiError::Precondition(format!(
                "MirroredVolume {ns}/{name} was not provisioned through CSI; delete it by hand"
            )));
        }
        self.volumes.delete(ns, name).await
    }

    pub async fn expand_volume(
        &self,
        req: pb::ControllerExpandVolumeRequest,
    ) -> CsiResult<pb::ControllerExpandVolumeResponse> {
        if req.volume_id.is_empty() {
            return Err(CsiError::Invalid("volume_id is missing".into()));
        }
        if req
            .capacity_range
            .as_ref()
            .is_none_or(|r| r.required_bytes <= 0)
        {
            return Err(CsiError::Invalid(
                "capacity_range.required_bytes is missing".into(),
            ));
        }
        let want = params::capacity(req.capacity_range.as_ref())?;
        let (ns, name) = params::parse_volume_id(&req.volume_id).ok_or_else(|| {
            CsiError::NotFound(format!("volume {:?} does not exist", req.volume_id))
        })?;
        let mut mv = self.existing(ns, name).await?;
        let have = bytes_of(&mv);
        if want < have {
            return Err(CsiError::OutOfRange(format!(
                "volume {ns}/{name} has {have} bytes; a volume never shrinks (asked {want})"
            )));
        }
        if want > have {
            mv = self
                .volumes
                .set_size(ns, name, &params::size_string(want))
                .await?;
        }
        let deadline = Instant::now() + self.wait;
        loop {
            let served = mv.status.as_ref().map_or(0, |s| s.capacity_bytes);
            if served >= want {
                return Ok(pb::ControllerExpandVolumeResponse {
                    capacity_bytes: to_i64(served),
                    // The node refreshes its device and grows the filesystem online.
                    node_expansion_required: true,
                });
            }
            if Instant::now() + self.poll > deadline {
                return Err(CsiError::Pending(format!(
                    "volume {ns}/{name} is growing to {want} bytes; the engines serve {served} so far"
                )));
            }
            tokio::time::sleep(self.poll).await;
            mv = self.existing(ns, name).await?;
        }
    }

    pub async fn validate(
        &self,
        req: pb::ValidateVolumeCapabilitiesRequest,
    ) -> CsiResult<pb::ValidateVolumeCapabilitiesResponse> {
        if req.volume_capabilities.is_empty() {
            return Err(CsiError::Invalid("volume_capabilities is empty".into()));
        }
        let (ns, name) = params::parse_volume_id(&req.volume_id).ok_or_else(|| {
            CsiError::NotFound(format!("volume {:?} does not exist", req.volume_id))
        })?;
        let mv = self.existing(ns, name).await?;
        let refused = |message: String| pb::ValidateVolumeCapabilitiesResponse {
            confirmed: None,
            message,
        };
        let access = match params::capabilities(&req.volume_capabilities, mv.spec.secondary_access)
        {
            Ok(a) => a,
            Err(e) => return Ok(refused(e.to_string())),
        };
        if access.mode != mv.spec.volume_mode {
            return Ok(refused(format!(
                "volume {ns}/{name} is a {} volume",
                mv.spec.volume_mode.as_str()
            )));
        }
        if mv.spec.volume_mode == VolumeMode::Filesystem
            && access.fs_type.is_some_and(|f| f != mv.spec.fs_type)
        {
            return Ok(refused(format!(
                "volume {ns}/{name} is formatted {}",
                mv.spec.fs_type.as_str()
            )));
        }
        Ok(pb::ValidateVolumeCapabilitiesResponse {
            confirmed: Some(pb::validate_volume_capabilities_response::Confirmed {
                volume_context: req.volume_context,
                volume_capabilities: req.volume_capabilities,
                parameters: req.parameters,
            }),
            message: String::new(),
        })
    }

    /// The engines of a volume, primary first (addresses from its status), with its token.
    async fn targets(&self, mv: &MirroredVolume) -> CsiResult<Vec<EngineTarget>> {
        let status = mv.status.clone().unwrap_or_default();
        let mut addresses: Vec<String> = Vec::new();
        for e in [&status.primary, &status.secondary].into_iter().flatten() {
            if !addresses.contains(&e.address) {
                addresses.push(e.address.clone());
            }
        }
        let token = self.volumes.token(&names::secret(&plan::key(mv))).await?;
        Ok(addresses
            .into_iter()
            .map(|address| EngineTarget {
                address,
                volume: mv.name_any(),
                token: token.clone(),
            })
            .collect())
    }

    fn snapshot(namespace: &str, volume: &str, s: &EngineSnapshot) -> pb::Snapshot {
        pb::Snapshot {
            size_bytes: to_i64(s.size),
            snapshot_id: params::snapshot_id(namespace, volume, &s.id),
            source_volume_id: params::volume_id(namespace, volume),
            creation_time: Some(prost_types::Timestamp {
                seconds: to_i64(s.created_unix_ms / 1000),
                nanos: i32::try_from((s.created_unix_ms % 1000) * 1_000_000).unwrap_or(0),
            }),
            ready_to_use: s.ready,
        }
    }

    /// Takes a snapshot on the source volume's primary, named by the CSI name (the engine is
    /// idempotent by id, so a retry answers the same snapshot).
    pub async fn create_snapshot(&self, req: pb::CreateSnapshotRequest) -> CsiResult<pb::Snapshot> {
        params::snapshot_name(&req.name)?;
        if req.source_volume_id.is_empty() {
            return Err(CsiError::Invalid("source_volume_id is missing".into()));
        }
        let (ns, name) = params::parse_volume_id(&req.source_volume_id).ok_or_else(|| {
            CsiError::NotFound(format!("volume {:?} does not exist", req.source_volume_id))
        })?;
        let mv = self.existing(ns, name).await?;
        let primary = mv
            .status
            .as_ref()
            .and_then(|s| s.primary.as_ref())
            .map(|p| p.address.clone())
            .ok_or_else(|| {
                CsiError::Unavailable(format!("volume {ns}/{name} has no primary engine yet"))
            })?;
        let target = self
            .targets(&mv)
            .await?
            .into_iter()
            .find(|t| t.address == primary)
            .ok_or_else(|| CsiError::Internal("the primary is not among the targets".into()))?;
        let s = self.snapshots.create(&target, &req.name).await?;
        Ok(Self::snapshot(ns, name, &s))
    }

    /// Deletes the snapshot on both engines. Unknown ids (and volumes) are success.
    pub async fn delete_snapshot(&self, snapshot_id: &str) -> CsiResult<()> {
        if snapshot_id.is_empty() {
            return Err(CsiError::Invalid("snapshot_id is missing".into()));
        }
        let Some((ns, volume, id)) = params::parse_snapshot_id(snapshot_id) else {
            return Ok(());
        };
        let Some(mv) = self.volumes.get(ns, volume).await? else {
            return Ok(());
        };
        let targets = self.targets(&mv).await?;
        if targets.is_empty() {
            return Err(CsiError::Unavailable(format!(
                "volume {ns}/{volume} has no engines to delete the snapshot on yet"
            )));
        }
        for t in &targets {
            self.snapshots.delete(t, id).await?;
        }
        Ok(())
    }

    /// A volume's snapshots, the union over its engines (an engine that was down when one was
    /// taken may lack it).
    async fn volume_snapshots(&self, mv: &MirroredVolume) -> CsiResult<Vec<pb::Snapshot>> {
        let (ns, name) = (mv.namespace().unwrap_or_default(), mv.name_any());
        let mut found: BTreeMap<String, EngineSnapshot> = BTreeMap::new();
        let mut last_error = None;
        let targets = self.targets(mv).await?;
        let mut answered = targets.is_empty();
        for t in &targets {
            match self.snapshots.list(t).await {
                Ok(list) => {
                    answered = true;
                    for s in list {
                        found.entry(s.id.clone()).or_insert(s);
                    }
                }
                Err(e) => last_error = Some(e),
            }
        }
        match (answered, last_error) {
            (false, Some(e)) => Err(e),
            _ => Ok(found
                .values()
                .map(|s| Self::snapshot(&ns, &name, s))
                .collect()),
        }
    }

    pub async fn list_snapshots(
        &self,
        req: pb::ListSnapshotsRequest,
    ) -> CsiResult<pb::ListSnapshotsResponse> {
        let mut snapshots: Vec<pb::Snapshot> = if !req.snapshot_id.is_empty() {
            match params::parse_snapshot_id(&req.snapshot_id) {
                None => Vec::new(),
                Some((ns, volume, _)) => match self.volumes.get(ns, volume).await? {
                    None => Vec::new(),
                    Some(mv) => self
                        .volume_snapshots(&mv)
                        .await?
                        .into_iter()
                        .filter(|s| s.snapshot_id == req.snapshot_id)
                        .collect(),
                },
            }
        } else if !req.source_volume_id.is_empty() {
            match params::parse_volume_id(&req.source_volume_id) {
                None => Vec::new(),
                Some((ns, name)) => match self.volumes.get(ns, name).await? {
                    None => Vec::new(),
                    Some(mv) => self.volume_snapshots(&mv).await?,
                },
            }
        } else {
            let mut all = Vec::new();
            for mv in self.volumes.list().await? {
                all.extend(self.volume_snapshots(&mv).await?);
            }
            all
        };
        snapshots.sort_by(|a, b| a.snapshot_id.cmp(&b.snapshot_id));
        let start = if req.starting_token.is_empty() {
            0
        } else {
            req.starting_token
                .parse::<usize>()
                .ok()
                .filter(|s| *s <= snapshots.len())
                .ok_or_else(|| {
                    CsiError::Pending(format!(
                        "starting_token {:?} is not valid",
                        req.starting_token
                    ))
                })?
        };
        let take = usize::try_from(req.max_entries)
            .ok()
            .filter(|n| *n > 0)
            .unwrap_or(usize::MAX);
        let total = snapshots.len();
        let page: Vec<pb::Snapshot> = snapshots.into_iter().skip(start).take(take).collect();
        let next = start + page.len();
        let more = next < total;
        Ok(pb::ListSnapshotsResponse {
            entries: page
                .into_iter()
                .map(|s| pb::list_snapshots_response::Entry { snapshot: Some(s) })
                .collect(),
            next_token: if more {
                next.to_string()
            } else {
                String::new()
            },
        })
    }
}
