//! Taking, deleting and listing snapshots (`crate::snapshot` keeps their files).

use std::{io, sync::Arc};

use crate::{
    meta::Role,
    snapshot::{self, cow::CowArea, Body, SnapMeta, Snapshot},
    state::Phase,
};

use super::{SecondaryAccess, Volume};

#[derive(Debug, thiserror::Error)]
pub enum SnapError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    WrongRole(String),
    /// Retryable: a takeover is draining or merging.
    #[error("{0}")]
    Busy(String),
    #[error("snapshot I/O failed: {0}")]
    Io(#[from] io::Error),
}

impl Volume {
    /// Takes snapshot `id` (or returns it if it exists). A primary or a consistent secondary,
    /// outside a takeover.
    ///
    /// Order (crash consistency): metadata `ready: false` stored; host I/O held (the gate, as a
    /// fence holds it) only while the data file is frozen: for a reflink, fdatasync and clone; for
    /// copy-on-write, the area installed in the store; then the clone (or the data file) made
    /// durable; then `ready: true` stored. A crash before that leaves a snapshot that the next
    /// open removes. Test: `tests/snapshot.rs` (under load), `snapshot::tests`.
    pub async fn create_snapshot(&self, id: &str) -> Result<Arc<Snapshot>, SnapError> {
        snapshot::valid_id(id).map_err(SnapError::Invalid)?;
        let _busy = self.snapshots.busy.lock().await;
        if let Some(s) = self.snapshots.get(id) {
            return Ok(s);
        }
        self.snapshot_allowed()?;
        let dir = self.snapshots.dir().to_path_buf();
        let mut meta = SnapMeta {
            volume: self.name.clone(),
            id: id.to_string(),
            size: self.size(),
            block_size: u64::from(crate::geometry::BLOCK_SIZE),
            created_unix_ms: crate::clock::now_us() / 1000,
            seq: 0,
            method: snapshot::REFLINK.into(),
            ready: false,
        };
        snapshot::store_meta(&dir, &meta)?;
        let made = self.freeze(&mut meta).await;
        let body = match made {
            Ok(b) => b,
            Err(e) => {
                let _ = self.snapshots.remove(id, &self.store);
                return Err(e);
            }
        };
        meta.ready = true;
        if let Err(e) = snapshot::store_meta(&dir, &meta) {
            if let Body::Cow(a) = &body {
                self.store.remove_cow(a);
            }
            let _ = self.snapshots.remove(id, &self.store);
            return Err(e.into());
        }
        tracing::info!(id, method = %meta.method, seq = meta.seq, "snapshot taken");
        Ok(self
            .snapshots
            .insert(crate::snapshot::Snapshots::new_snapshot(meta, body)))
    }

    /// A primary, or a secondary whose copy is consistent: its point-in-time views (issue 18).
    /// On a secondary the freeze holds the gate, which each applied batch holds too, so the image
    /// is the replica at a batch boundary: a prefix of the primary's writes up to the applied seq
    /// stored as the snapshot's `seq` (`tests/secondary_access.rs`
    /// `a_view_on_the_secondary_stays_frozen_while_the_primary_writes`).
    fn snapshot_allowed(&self) -> Result<(), SnapError> {
        let s = self.state();
        match s.role {
            Role::Primary => {}
            Role::Secondary if self.secondary_access == SecondaryAccess::None => {
                return Err(SnapError::WrongRole(format!(
                    "volume {:?} is secondary on this engine: snapshots are taken on the primary \
                     (views on the secondary need --secondary-access read-only or read-write)",
                    self.name
                )))
            }
            Role::Secondary if !self.replica().inconsistent() => {}
            Role::Secondary => {
                return Err(SnapError::Busy(format!(
                    "volume {:?} is secondary on this engine and its copy is not consistent \
                     (a resync or the first full copy is running): retry once it is",
                    self.name
                )))
            }
            r => {
                return Err(SnapError::WrongRole(format!(
                    "volume {:?} is {r} on this engine: snapshots are taken on the primary or a \
                     consistent secondary",
                    self.name
                )))
            }
        }
        if s.phase != Phase::Normal {
            return Err(SnapError::Busy(format!(
                "volume {:?} is {:?} after a takeover; retry once that is done",
                self.name, s.phase
            )));
        }
        Ok(())
    }

    /// Freezes the data file's image under the gate; fills the method and seq in `meta`.
    async fn freeze(&self, meta: &mut SnapMeta) -> Result<Body, SnapError> {
        let id = meta.id.clone();
        {
            let _gate = self.gate.write().await;
            self.snapshot_allowed()?;
            meta.seq = self.last_seq();
            self.store.sync_async().await?;
            if let Some(img) = self.snapshots.clone_data(&id, &self.store)? {
                drop(_gate);
                img.sync_all()?;
                self.snapshots.sync_dir()?;
                meta.method = snapshot::REFLINK.into();
                return Ok(Body::Reflink(img));
            }
        }
        // No reflink here: a copy-on-write area.
        meta.method = snapshot::COW.into();
        snapshot::store_meta(self.snapshots.dir(), meta)?;
        let blocks = meta.size / meta.block_size;
        let area = Arc::new(CowArea::create(
            &self.snapshots.cow_path(&id),
            meta.block_size,
            blocks,
        )?);
        {
            let _gate = self.gate.write().await;
            self.snapshot_allowed()?;
            meta.seq = self.last_seq();
            self.store.add_cow(Arc::clone(&area));
        }
        // Everything written before the area was installed is the snapshot's content where no
        // area record says otherwise: durable before the snapshot is ready.
        if let Err(e) = self.store.sync_async().await {
            self.store.remove_cow(&area);
            return Err(e.into());
        }
        Ok(Body::Cow(area))
    }

    /// The last sequence number of a write this primary acknowledged (0 unpaired); on a
    /// secondary, the last one its copy applied.
    fn last_seq(&self) -> u64 {
        if self.role() == Role::Secondary {
            return self.replica().applied_seq;
        }
        self.repl
            .as_ref()
            .map(|r| r.tracker.counts().last_seq)
            .unwrap_or(0)
    }

    /// Deletes snapshot `id`; false when there was none. Any role.
    pub async fn delete_snapshot(&self, id: &str) -> Result<bool, SnapError> {
        snapshot::valid_id(id).map_err(SnapError::Invalid)?;
        let _busy = self.snapshots.busy.lock().await;
        Ok(self.snapshots.remove(id, &self.store)?)
    }

    pub fn list_snapshots(&self) -> Vec<Arc<Snapshot>> {
        self.snapshots.all()
    }

    pub fn snapshot(&self, id: &str) -> Option<Arc<Snapshot>> {
        self.snapshots.get(id)
    }

    /// (count, bytes) of the snapshots, for /metrics.
    pub fn snapshot_usage(&self) -> (u64, u64) {
        self.snapshots.usage()
    }

    /// Reads a snapshot's bytes (its NBD export).
    pub fn read_snapshot(&self, s: &Snapshot, buf: &mut [u8], offset: u64) -> io::Result<()> {
        s.read(buf, offset, &self.store)
    }
}

#[cfg(test)]
mod tests {
    //! Power loss around a snapshot of a paired primary: cut after every file operation in turn
    //! of "take a snapshot, then overwrite, trim and flush through the host path".
    use super::*;
    use crate::{
        seam::power::Cut,
        takeover::tests::{base_config, block_on},
        volume::VolumeConfig,
    };

    const BS: u64 = 4096;

    fn cfg(dir: &std::path::Path) -> VolumeConfig {
        let mut c = base_config(dir);
        c.initial_role = Role::Primary;
        c
    }

    fn lose_power(v: Arc<Volume>, cfg: &VolumeConfig) -> Arc<Volume> {
        v.store.lose_unsynced();
        for s in v.list_snapshots() {
            if let Body::Cow(a) = &s.body {
                a.lose_unsynced();
            }
        }
        drop(v);
        Volume::open(cfg).unwrap_or_else(|e| panic!("restart: {e}"))
    }

    /// Invariant: a snapshot listed after a power cut reads exactly the data written before it
    /// was taken; a snapshot cut short is gone, files and all.
    #[test]
    fn power_loss_around_a_snapshot_leaves_it_whole_or_gone() {
        let mut cut_at = 0;
        let mut seen_ready = false;
        loop {
            let d = tempfile::tempdir().unwrap();
            let cfg = cfg(d.path());
            let v = Volume::open(&cfg).unwrap();
            for b in 0..16u64 {
                block_on(v.write(b * BS, vec![b as u8 + 1; BS as usize], false)).unwrap();
            }
            let mut want = vec![0u8; (16 * BS) as usize];
            v.store.read_at(&mut want, 0).unwrap();
            let cut = Cut::after(d.path(), cut_at);
            let made = block_on(v.create_snapshot("s")).is_ok();
            if made {
                for (b, byte) in [(2u64, 0xa0u8), (3, 0xa1), (2, 0xa2), (9, 0xa3)] {
                    if block_on(v.write(b * BS, vec![byte; BS as usize], false)).is_err() {
                        break;
                    }
                }
                let _ = block_on(v.trim(10 * BS, 4 * BS, true));
                let _ = block_on(v.flush());
            }
            let tripped = cut.tripped();
            drop(cut);
            let v = lose_power(v, &cfg);
            match v.snapshot("s") {
                Some(s) => {
                    seen_ready = true;
                    let mut got = vec![0u8; (16 * BS) as usize];
                    v.read_snapshot(&s, &mut got, 0).unwrap();
                    if let Some(i) = got.iter().zip(&want).position(|(a, b)| a != b) {
                        panic!(
                            "cut after {cut_at} operations: snapshot block {} differs",
                            i as u64 / BS
                        );
                    }
                }
                None => {
                    let left: Vec<_> = std::fs::read_dir(v.snapshots.dir())
                        .unwrap()
                        .map(|e| e.unwrap().file_name())
                        .collect();
                    assert!(left.is_empty(), "cut after {cut_at}: leftovers {left:?}");
                    assert!(!made || tripped, "a snapshot made without a cut is listed");
                }
            }
            if !tripped {
                break;
            }
            cut_at += 1;
        }
        assert!(
            seen_ready && cut_at > 5,
            "{cut_at} cuts, ready seen: {seen_ready}"
        );
    }
}
