//! Snapshots of the volume (issue 14): point-in-time, crash-consistent copies of the data file
//! taken on the primary at a FLUSH point, kept in `<state-dir>/snapshots/`:
//! - `<id>.json`: the snapshot's metadata (framed JSON, `format::meta`), replaced atomically;
//!   `ready: false` while it is being made;
//! - `<id>.img`: a reflink clone of the data file (FICLONE), when the filesystem can;
//! - `<id>.cow`: otherwise its copy-on-write area (`cow.rs`), fed by every change of the data file.
//!
//! A snapshot that is not ready at start (a crash while it was made) is removed, as are files
//! without metadata (a crash during a delete). Snapshots outlive role changes: the areas are
//! installed in the data file's store at open, before anything writes it.

pub mod cow;
pub mod seed;

use std::{
    collections::BTreeMap,
    fs::File,
    io,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use serde::{Deserialize, Serialize};

use crate::{format::sync_dir, store::BlockStore};

use cow::CowArea;

pub const DIR: &str = "snapshots";
pub const REFLINK: &str = "reflink";
pub const COW: &str = "cow";

/// What `<id>.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SnapMeta {
    pub volume: String,
    pub id: String,
    pub size: u64,
    pub block_size: u64,
    pub created_unix_ms: u64,
    pub seq: u64,
    pub method: String,
    pub ready: bool,
}

/// Where a snapshot's bytes are.
#[derive(Debug)]
pub enum Body {
    Reflink(File),
    Cow(Arc<CowArea>),
}

#[derive(Debug)]
pub struct Snapshot {
    pub meta: SnapMeta,
    pub body: Body,
    deleted: std::sync::atomic::AtomicBool,
}

impl Snapshot {
    /// Reads the snapshot's bytes (the NBD export). A deleted snapshot reads as an error.
    pub fn read(&self, buf: &mut [u8], offset: u64, data: &BlockStore) -> io::Result<()> {
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|e| e > self.meta.size)
        {
            return Err(io::Error::from_raw_os_error(22));
        }
        if self.deleted.load(std::sync::atomic::Ordering::Acquire) {
            return Err(io::Error::other(format!(
                "snapshot {:?} was deleted",
                self.meta.id
            )));
        }
        match &self.body {
            Body::Reflink(f) => f.read_exact_at(buf, offset),
            Body::Cow(a) => a.read(buf, offset, &|b, o| data.read_at(b, o)),
        }
    }

    /// Bytes the snapshot holds on disk (its own blocks: for a clone, what is allocated to it).
    pub fn bytes(&self) -> u64 {
        match &self.body {
            Body::Reflink(f) => {
                use std::os::unix::fs::MetadataExt;
                f.metadata().map(|m| m.blocks() * 512).unwrap_or(0)
            }
            Body::Cow(a) => a.bytes(),
        }
    }

    pub fn info(&self) -> crate::pb::SnapshotInfo {
        crate::pb::SnapshotInfo {
            volume: self.meta.volume.clone(),
            id: self.meta.id.clone(),
            size: self.meta.size,
            created_unix_ms: self.meta.created_unix_ms,
            seq: self.meta.seq,
            method: self.meta.method.clone(),
            export: tandem_api::contract::snapshot_export(&self.meta.volume, &self.meta.id),
            ready: self.meta.ready,
        }
    }
}

/// A caller-chosen id: `[a-zA-Z0-9._-]`, 1 to 128 bytes, not `.` or `..`.
pub fn valid_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > 128 {
        return Err(format!("snapshot id {id:?}: 1 to 128 bytes"));
    }
    if id == "." || id == ".." {
        return Err(format!("snapshot id {id:?} is reserved"));
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
    {
        return Err(format!(
            "snapshot id {id:?}: only letters, digits, '.', '_' and '-'"
        ));
    }
    Ok(())
}

/// The snapshots of one volume.
#[derive(Debug)]
pub struct Snapshots {
    dir: PathBuf,
    list: Mutex<BTreeMap<String, Arc<Snapshot>>>,
    /// One create or delete at a time.
    pub(crate) busy: tokio::sync::Mutex<()>,
}

fn meta_path(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!("{id}.json"))
}

/// Replaces `<id>.json` atomically (temp file, fsync, rename, fsync dir).
pub fn store_meta(dir: &Path, m: &SnapMeta) -> io::Result<()> {
    let path = meta_path(dir, &m.id);
    crate::seam::power::io(&path)?;
    let tmp = dir.join(format!("{}.json.tmp", m.id));
    let mut f = File::create(&tmp)?;
    io::Write::write_all(&mut f, &crate::format::meta::encode(m))?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, &path)?;
    sync_dir(&path)
}

fn load_meta(path: &Path) -> io::Result<SnapMeta> {
    let b = std::fs::read(path)?;
    crate::format::meta::decode(&b).map_err(|e| {
        io::Error::other(format!(
            "{}: damaged snapshot metadata ({e:?}); move it away to drop the snapshot",
            path.display()
        ))
    })
}

fn remove_if_present(p: &Path) -> io::Result<()> {
    match std::fs::remove_file(p) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

impl Snapshots {
    /// Loads the snapshots of `state_dir`, removes half-made ones and leftovers, and installs
    /// every copy-on-write area in `store` (before anything writes the data file).
    pub fn open(state_dir: &Path, volume: &str, store: &BlockStore) -> io::Result<Snapshots> {
        let dir = state_dir.join(DIR);
        std::fs::create_dir_all(&dir)?;
        let mut list = BTreeMap::new();
        let mut keep: Vec<PathBuf> = Vec::new();
        let mut names: Vec<PathBuf> = std::fs::read_dir(&dir)?
            .map(|e| e.map(|e| e.path()))
            .collect::<io::Result<_>>()?;
        names.sort();
        for p in names.iter().filter(|p| {
            p.extension().is_some_and(|e| e == "json")
                && p.file_stem().is_some_and(|s| !s.is_empty())
        }) {
            let m = load_meta(p)?;
            if !m.ready || m.volume != volume {
                // Invariant: a snapshot is listed only once its metadata says ready, which is
                // stored after its bytes are durable; a half-made one is removed here.
                // Test: `snapshot::tests::a_half_made_snapshot_is_removed_at_open`.
                if m.volume != volume {
                    return Err(io::Error::other(format!(
                        "{}: a snapshot of volume {:?}, not {volume:?}",
                        p.display(),
                        m.volume
                    )));
                }
                remove_if_present(&dir.join(format!("{}.img", m.id)))?;
                remove_if_present(&dir.join(format!("{}.cow", m.id)))?;
                remove_if_present(p)?;
                tracing::info!(id = %m.id, "removed a snapshot that was never completed");
                continue;
            }
            let body = if m.method == REFLINK {
                let img = dir.join(format!("{}.img", m.id));
                keep.push(img.clone());
                Body::Reflink(File::open(&img)?)
            } else {
                let path = dir.join(format!("{}.cow", m.id));
                keep.push(path.clone());
                let a = Arc::new(CowArea::open(&path, m.block_size, m.size / m.block_size)?);
                store.add_cow(Arc::clone(&a));
                Body::Cow(a)
            };
            keep.push(p.clone());
            list.insert(
                m.id.clone(),
                Arc::new(Snapshot {
                    meta: m,
                    body,
                    deleted: Default::default(),
                }),
            );
        }
        // Leftovers: bodies without metadata (a crash in a delete), temporary files.
        for p in names.iter().filter(|p| !keep.contains(p)) {
            if p.is_file() {
                remove_if_present(p)?;
            }
        }
        File::open(&dir)?.sync_all()?;
        Ok(Snapshots {
            dir,
            list: Mutex::new(list),
            busy: tokio::sync::Mutex::new(()),
        })
    }

    fn list_guard(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<Snapshot>>> {
        self.list.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// fsyncs the snapshots directory (a new file's entry is durable).
    pub(crate) fn sync_dir(&self) -> io::Result<()> {
        crate::seam::power::io(&self.dir)?;
        File::open(&self.dir)?.sync_all()
    }

    pub fn get(&self, id: &str) -> Option<Arc<Snapshot>> {
        self.list_guard().get(id).cloned()
    }

    pub fn all(&self) -> Vec<Arc<Snapshot>> {
        self.list_guard().values().cloned().collect()
    }

    pub(crate) fn insert(&self, s: Snapshot) -> Arc<Snapshot> {
        let s = Arc::new(s);
        self.list_guard().insert(s.meta.id.clone(), Arc::clone(&s));
        s
    }

    /// Removes a snapshot: its metadata first (durably), so a crash before the body is gone
    /// leaves a leftover that the next open removes, never a listed snapshot without bytes.
    pub(crate) fn remove(&self, id: &str, store: &BlockStore) -> io::Result<bool> {
        let Some(s) = self.list_guard().remove(id) else {
            // Not listed: clear whatever a half-made one left.
            for ext in ["json", "img", "cow", "json.tmp", "img.tmp"] {
                remove_if_present(&self.dir.join(format!("{id}.{ext}")))?;
            }
            return Ok(false);
        };
        s.deleted.store(true, std::sync::atomic::Ordering::Release);
        if let Body::Cow(a) = &s.body {
            store.remove_cow(a);
            a.retire();
        }
        let m = meta_path(&self.dir, id);
        remove_if_present(&m)?;
        sync_dir(&m)?;
        remove_if_present(&self.dir.join(format!("{id}.img")))?;
        remove_if_present(&self.dir.join(format!("{id}.cow")))?;
        Ok(true)
    }

    /// (count, bytes on disk) for the metrics endpoint.
    pub fn usage(&self) -> (u64, u64) {
        let all = self.all();
        (all.len() as u64, all.iter().map(|s| s.bytes()).sum())
    }

    /// A reflink clone of the data file as `<id>.img` (call with host I/O held); None when the
    /// filesystem cannot share extents (the caller falls back to a copy-on-write area).
    pub(crate) fn clone_data(&self, id: &str, data: &BlockStore) -> io::Result<Option<File>> {
        let img = self.dir.join(format!("{id}.img"));
        crate::seam::power::io(&img)?;
        let dst = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&img)?;
        let src = File::open(data.path())?;
        match rustix::fs::ioctl_ficlone(&dst, &src) {
            Ok(()) => Ok(Some(dst)),
            Err(e)
                if [
                    rustix::io::Errno::OPNOTSUPP,
                    rustix::io::Errno::XDEV,
                    rustix::io::Errno::INVAL,
                    rustix::io::Errno::NOTTY,
                    rustix::io::Errno::PERM,
                ]
                .contains(&e) =>
            {
                drop(dst);
                remove_if_present(&img)?;
                Ok(None)
            }
            Err(e) => {
                drop(dst);
                let _ = remove_if_present(&img);
                Err(e.into())
            }
        }
    }

    pub(crate) fn cow_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.cow"))
    }

    pub(crate) fn new_snapshot(meta: SnapMeta, body: Body) -> Snapshot {
        Snapshot {
            meta,
            body,
            deleted: Default::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked() {
        for ok in ["a", "snap-1", "pvc_2.x", &"x".repeat(128)] {
            assert!(valid_id(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".", "..", "a/b", "a b", "ü", &"x".repeat(129)] {
            assert!(valid_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_half_made_snapshot_is_removed_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlockStore::open_or_create(&dir.path().join("data"), 1 << 20).unwrap();
        let snaps = dir.path().join(DIR);
        std::fs::create_dir_all(&snaps).unwrap();
        let mut m = SnapMeta {
            volume: "v".into(),
            id: "half".into(),
            size: 1 << 20,
            block_size: 4096,
            created_unix_ms: 1,
            seq: 0,
            method: COW.into(),
            ready: false,
        };
        store_meta(&snaps, &m).unwrap();
        CowArea::create(&snaps.join("half.cow"), 4096, 256).unwrap();
        m.id = "whole".into();
        m.ready = true;
        store_meta(&snaps, &m).unwrap();
        CowArea::create(&snaps.join("whole.cow"), 4096, 256).unwrap();
        std::fs::write(snaps.join("orphan.cow"), b"x").unwrap();
        let s = Snapshots::open(dir.path(), "v", &store).unwrap();
        let ids: Vec<String> = s.all().iter().map(|s| s.meta.id.clone()).collect();
        assert_eq!(ids, vec!["whole".to_string()]);
        let mut left: Vec<String> = std::fs::read_dir(&snaps)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, vec!["whole.cow", "whole.json"]);
        // Another volume's snapshot in this dir is an error, not silently dropped.
        m.volume = "other".into();
        m.id = "o".into();
        store_meta(&snaps, &m).unwrap();
        drop(s);
        let store2 = BlockStore::open_or_create(&dir.path().join("data2"), 1 << 20).unwrap();
        assert!(Snapshots::open(dir.path(), "v", &store2).is_err());
    }
}
