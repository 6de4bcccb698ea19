//! The plugin's durable memory: one JSON record per staged volume under `<state-dir>/volumes/`, replaced
//! atomically (write, fsync, rename, fsync the directory), readable by root only (0600: a view's
//! record holds the credentials its delete needs). A restarted plugin reads them back and
//! finds its attachments; the kernel's mount table stays the authority on what is mounted.
//!
//! Also the per-volume operation guard: one call per volume at a time, the rest get ABORTED.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::attach::Attachment;
use crate::error::{Error, Result};

/// How the workload sees the volume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Access {
    Block,
    Mount {
        fs_type: String,
        mount_flags: Vec<String>,
    },
}

impl Access {
    pub fn describe(&self) -> String {
        match self {
            Access::Block => "raw block".into(),
            Access::Mount { fs_type, .. } => format!("{fs_type} filesystem"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Publication {
    pub read_only: bool,
}

/// A point-in-time view this plugin took for a read-only stage (issue 18): a `view-` snapshot on
/// this node's engine, deleted at NodeUnstageVolume. That call carries no secrets, so what the
/// delete needs is kept here from the stage's: the token, and for mutual TLS the CA and this
/// node's own pair only. Never printed.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViewRecord {
    /// The snapshot id (`view-<hash of volume id and staging path>`).
    pub id: String,
    /// gRPC address of the engine holding it (this node's).
    pub grpc: String,
    pub token: String,
    /// `ca.crt`, `csi.<this node>.crt`, `csi.<this node>.key`; empty for plaintext.
    #[serde(default)]
    pub tls: BTreeMap<String, String>,
    /// When it was taken (Unix seconds); reported in `/metrics` so a view that outlives its
    /// reader shows.
    #[serde(default)]
    pub created_unix: u64,
}

impl std::fmt::Debug for ViewRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ViewRecord")
            .field("id", &self.id)
            .field("grpc", &self.grpc)
            .field("created_unix", &self.created_unix)
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub volume_id: String,
    /// The engine's volume name (= NBD export).
    pub engine_volume: String,
    pub staging_path: PathBuf,
    pub access: Access,
    pub read_only: bool,
    /// Which engine we attached to, at which epoch (the primary's, after any takeover this stage
    /// triggered). A repeated NodeStageVolume compares them with the current primary: any difference
    /// makes the staging stale. The attachment itself is pinned to this epoch
    /// ([`Attachment::pinned_epoch`]).
    pub engine_node: String,
    #[serde(default)]
    pub epoch: u64,
    /// Set as soon as a device exists, before anything is mounted, so a crash leaves a trail.
    pub attachment: Option<Attachment>,
    /// True once NodeStageVolume finished.
    pub staged: bool,
    pub publications: BTreeMap<PathBuf, Publication>,
    /// Set (before the snapshot is taken) when the staging reads a point-in-time view; it stays
    /// until the view is deleted, after the detach.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub view: Option<ViewRecord>,
}

/// Maps a volume id (`namespace/name`) to a file name: `[A-Za-z0-9._-]` kept, the rest `%XX`.
pub fn escape_id(id: &str) -> String {
    let mut out = String::with_capacity(id.len());
    for b in id.bytes() {
        if b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    if out.starts_with('.') {
        out.replace_range(0..1, "%2E");
    }
    out
}

#[derive(Clone, Debug)]
pub struct StateStore {
    dir: PathBuf,
}

fn state_err(what: &str, path: &Path, e: impl std::fmt::Display) -> Error {
    Error::State(format!("{what} {}: {e}", path.display()))
}

impl StateStore {
    pub fn open(state_dir: &Path) -> Result<Self> {
        let dir = state_dir.join("volumes");
        fs::create_dir_all(&dir).map_err(|e| state_err("create", &dir, e))?;
        Ok(StateStore { dir })
    }

    fn path(&self, volume_id: &str) -> PathBuf {
        self.dir.join(format!("{}.json", escape_id(volume_id)))
    }

    pub fn load(&self, volume_id: &str) -> Result<Option<VolumeRecord>> {
        let p = self.path(volume_id);
        match fs::read(&p) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| state_err("parse", &p, e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(state_err("read", &p, e)),
        }
    }

    pub fn save(&self, rec: &VolumeRecord) -> Result<()> {
        let p = self.path(&rec.volume_id);
        let tmp = p.with_extension("json.tmp");
        let bytes = serde_json::to_vec_pretty(rec).map_err(|e| state_err("encode", &p, e))?;
        let write = || -> std::io::Result<()> {
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            // An older plugin's temp file keeps its mode through open: set it.
            use std::os::unix::fs::PermissionsExt;
            f.set_permissions(fs::Permissions::from_mode(0o600))?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            fs::rename(&tmp, &p)?;
            File::open(&self.dir)?.sync_all()
        };
        write().map_err(|e| state_err("write", &p, e))
    }

    pub fn remove(&self, volume_id: &str) -> Result<()> {
        let p = self.path(volume_id);
        match fs::remove_file(&p) {
            Ok(()) => File::open(&self.dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| state_err("sync", &self.dir, e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(state_err("remove", &p, e)),
        }
    }

    /// Every record; unreadable files are reported and skipped.
    pub fn list(&self) -> Result<Vec<VolumeRecord>> {
        let mut out = Vec::new();
        let entries = fs::read_dir(&self.dir).map_err(|e| state_err("list", &self.dir, e))?;
        for entry in entries.flatten() {
            let p = entry.path();
            if p.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            match fs::read(&p)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
            {
                Ok(rec) => out.push(rec),
                Err(e) => tracing::error!(path = %p.display(), "unreadable state record: {e}"),
            }
        }
        out.sort_by(|a: &VolumeRecord, b| a.volume_id.cmp(&b.volume_id));
        Ok(out)
    }

    /// The record whose staging path or one of whose publications is `path`.
    pub fn find_by_path(&self, path: &Path) -> Result<Option<VolumeRecord>> {
        Ok(self
            .list()?
            .into_iter()
            .find(|r| r.staging_path == path || r.publications.contains_key(path)))
    }
}

/// Admits one operation per volume at a time.
#[derive(Clone, Debug, Default)]
pub struct OpGuard {
    busy: Arc<Mutex<HashSet<String>>>,
}

/// Held for the duration of one operation; releases the volume when dropped.
#[derive(Debug)]
pub struct OpToken {
    busy: Arc<Mutex<HashSet<String>>>,
    id: String,
}

impl OpGuard {
    pub fn try_acquire(&self, volume_id: &str) -> Result<OpToken> {
        let mut busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        if !busy.insert(volume_id.to_string()) {
            return Err(Error::VolumeBusy);
        }
        Ok(OpToken {
            busy: self.busy.clone(),
            id: volume_id.to_string(),
        })
    }
}

impl Drop for OpToken {
    fn drop(&mut self) {
        self.busy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str) -> VolumeRecord {
        VolumeRecord {
            volume_id: id.into(),
            engine_volume: "v".into(),
            staging_path: "/s".into(),
            access: Access::Mount {
                fs_type: "ext4".into(),
                mount_flags: vec!["noatime".into()],
            },
            read_only: false,
            engine_node: "a".into(),
            epoch: 1,
            attachment: None,
            staged: true,
            publications: BTreeMap::from([("/t".into(), Publication { read_only: true })]),
            view: None,
        }
    }

    #[test]
    fn escapes_ids_into_safe_unique_names() {
        assert_eq!(escape_id("default/pvc-1"), "default%2Fpvc-1");
        assert_eq!(escape_id("a b"), "a%20b");
        assert_eq!(escape_id(".."), "%2E.");
        assert_ne!(escape_id("a/b"), escape_id("a%2Fb"));
    }

    #[test]
    fn records_round_trip_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateStore::open(dir.path()).unwrap();
        assert_eq!(s.load("ns/a").unwrap(), None);
        s.save(&record("ns/a")).unwrap();
        s.save(&record("ns/b")).unwrap();
        let s2 = StateStore::open(dir.path()).unwrap();
        assert_eq!(s2.load("ns/a").unwrap(), Some(record("ns/a")));
        assert_eq!(s2.list().unwrap().len(), 2);
        assert_eq!(
            s2.find_by_path(Path::new("/t")).unwrap().unwrap().volume_id,
            "ns/a"
        );
        s2.remove("ns/a").unwrap();
        s2.remove("ns/a").unwrap();
        assert_eq!(s2.list().unwrap().len(), 1);
    }

    /// A record written before attachments were pinned reads back, its attachment unpinned.
    #[test]
    fn a_record_from_before_pinning_reads_back_unpinned() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateStore::open(dir.path()).unwrap();
        let old = r#"{"volume_id":"ns/old","engine_volume":"vol","staging_path":"/s",
            "access":{"type":"block"},"read_only":false,"engine_node":"a","epoch":1,
            "attachment":{"device":"/dev/loop3","nbd":"10.0.0.1:10809","export":"vol",
              "kind":{"type":"fuse-loop","dir":"/var/lib/tandem-csi/attach/ns%2Fold","pid":42}},
            "staged":true,"publications":{}}"#;
        std::fs::write(dir.path().join("volumes/ns%2Fold.json"), old).unwrap();
        let rec = s.load("ns/old").unwrap().unwrap();
        let att = rec.attachment.unwrap();
        assert_eq!((att.export.as_str(), att.pinned_epoch), ("vol", None));
        assert_eq!(rec.epoch, 1);
    }

    /// A view's record keeps its credentials for the unstage, readable by root only and never
    /// in Debug output.
    #[test]
    fn a_views_record_is_private_and_round_trips() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let s = StateStore::open(dir.path()).unwrap();
        let mut rec = record("ns/v");
        rec.view = Some(ViewRecord {
            id: "view-0123456789abcdef".into(),
            grpc: "10.0.0.1:7000".into(),
            token: "tok-secret".into(),
            tls: BTreeMap::from([("csi.a.key".into(), "KEY-secret".into())]),
            created_unix: 5,
        });
        s.save(&rec).unwrap();
        assert_eq!(s.load("ns/v").unwrap(), Some(rec.clone()));
        let mode = fs::metadata(dir.path().join("volumes/ns%2Fv.json"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let shown = format!("{rec:?}");
        assert!(shown.contains("view-0123456789abcdef"), "{shown}");
        assert!(!shown.contains("secret"), "{shown}");
    }

    #[test]
    fn a_corrupt_record_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateStore::open(dir.path()).unwrap();
        std::fs::write(dir.path().join("volumes/ns%2Fx.json"), b"{not json").unwrap();
        assert!(s.load("ns/x").is_err());
        assert!(s.list().unwrap().is_empty());
    }

    #[test]
    fn guard_admits_one_operation_per_volume() {
        let g = OpGuard::default();
        let t = g.try_acquire("ns/a").unwrap();
        assert!(matches!(g.try_acquire("ns/a"), Err(Error::VolumeBusy)));
        let _other = g.try_acquire("ns/b").unwrap();
        drop(t);
        g.try_acquire("ns/a").unwrap();
    }
}
