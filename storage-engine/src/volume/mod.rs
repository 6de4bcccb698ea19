//! One volume served by this engine: a thin owner of its parts.
//! - `mod.rs` (this file): open, the persisted identity (meta), checkpoint, shutdown;
//! - `host`: the host I/O path (read, one path for write, zero and trim, flush);
//! - `replica`: applying the primary's stream on a secondary, and its progress file;
//! - `transition`: the only place role, epoch, phase and standing change (`state::next`'s effects);
//! - `takeover/` (beside this module): the handoff, routed host I/O, proxied reads and the merge.

mod forward;
mod host;
mod lease;
mod replica;
mod resize;
#[cfg(test)]
mod resize_tests;
mod snapshot;
mod transition;

use std::{
    io,
    path::{Path, PathBuf},
    sync::{atomic::Ordering, Arc, Mutex, MutexGuard},
};

use tokio::sync::watch;

use crate::{
    bitmap::Bitmap,
    format,
    geometry::{blocks_in, BLOCK_SIZE},
    meta::{Meta, MetaError, Role},
    repl::{Mode, Repl, Tracker},
    state::Standing,
    store::{BlockStore, StoreError},
    takeover::{proxy::Proxy, Areas},
};

pub use forward::SecondaryAccess;
pub use host::{Counters, ExportName, HostError};
pub use lease::renew_task;
pub use replica::{Applied, ReplicaState};
pub use snapshot::SnapError;
pub(crate) use transition::{Carry, TransitionError};

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error("state dir {path}: {source}")]
    StateDir { path: PathBuf, source: io::Error },
    #[error(
        "state dir {dir} belongs to volume {found:?} of {found_size} bytes, not {wanted:?} of {wanted_size} bytes"
    )]
    WrongVolume {
        dir: PathBuf,
        found: String,
        found_size: u64,
        wanted: String,
        wanted_size: u64,
    },
    #[error("state dir {0} is in use by another engine")]
    Locked(PathBuf),
    #[error("{0}")]
    Loss(String),
}

/// How a volume is opened.
#[derive(Debug, Clone)]
pub struct VolumeConfig {
    pub name: String,
    pub data: PathBuf,
    pub size: u64,
    pub state_dir: PathBuf,
    /// Role to take when the state dir is new; an existing meta file wins.
    pub initial_role: Role,
    /// The peer, when this engine is one of a pair.
    pub pair: Option<PairConfig>,
    /// What a secondary lets hosts do (`volume/forward.rs`).
    pub secondary_access: SecondaryAccess,
    /// Deadline of a proxied read (below the host's I/O timeout).
    pub proxy_timeout: std::time::Duration,
    /// A host session opening on the secondary triggers the takeover (failover.md AT-22).
    pub implicit_takeover: bool,
}

#[derive(Debug, Clone)]
pub struct PairConfig {
    pub peer: String,
    pub token: Option<String>,
    pub mode: Mode,
    pub journal_bytes: u64,
    pub rate: u64,
    pub sync_timeout: std::time::Duration,
    /// Write lease (`crate::lease`); 0 = off.
    pub lease_ms: u32,
    pub lease_wait: std::time::Duration,
}

/// One volume served by this engine.
pub struct Volume {
    name: String,
    pub(crate) store: BlockStore,
    meta_path: PathBuf,
    meta: Mutex<Meta>,
    /// The role, readable without the meta lock on every host request.
    role_now: std::sync::atomic::AtomicU8,
    /// Host requests hold it shared; fencing and role changes hold it exclusively, so in-flight
    /// host I/O finishes before the role changes and none starts under the old role afterwards.
    pub(crate) gate: tokio::sync::RwLock<()>,
    /// Bumped on every fence: open host sessions close.
    pub(crate) fenced: watch::Sender<u64>,
    /// Overlay, handed-off table and proxied reads (takeover).
    pub(crate) areas: Areas,
    /// One takeover at a time.
    pub(crate) takeover_lock: tokio::sync::Mutex<()>,
    /// One state change at a time (`transition`).
    transitions: Mutex<()>,
    pub(crate) counters: Counters,
    pub(crate) repl: Option<Arc<Repl>>,
    /// What a returning old primary kept of the blocks its successor lacked (`crate::loss`).
    pub(crate) losses: crate::loss::Losses,
    /// Snapshots and their copy-on-write areas (`crate::snapshot`).
    pub(crate) snapshots: crate::snapshot::Snapshots,
    /// The live move of the secondary (`crate::repl::mover`).
    pub(crate) mover: crate::repl::mover::Mover,
    replica: Mutex<ReplicaState>,
    /// The replica's applied seq, for forwarded requests waiting on it (`forward`).
    pub(crate) applied: watch::Sender<u64>,
    pub(crate) secondary_access: SecondaryAccess,
    /// A read-write secondary's client to its primary.
    pub(crate) forward: forward::Forwarder,
    implicit_takeover: bool,
    progress: std::fs::File,
    // Held for the engine's lifetime: a second engine on the same state dir is refused.
    _lock: std::fs::File,
}

fn role_code(r: Role) -> u8 {
    match r {
        Role::Primary => 0,
        Role::Secondary => 1,
        Role::Fenced => 2,
    }
}

impl Volume {
    pub fn open(cfg: &VolumeConfig) -> Result<Arc<Self>, OpenError> {
        let dir_err = |source| OpenError::StateDir {
            path: cfg.state_dir.clone(),
            source,
        };
        std::fs::create_dir_all(&cfg.state_dir).map_err(dir_err)?;
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(cfg.state_dir.join("lock"))
            .map_err(dir_err)?;
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive)
            .map_err(|_| OpenError::Locked(cfg.state_dir.clone()))?;
        // A seed that did not finish: the data file is neither the volume nor empty.
        crate::snapshot::seed::refuse_half_seeded(&cfg.state_dir).map_err(dir_err)?;

        let meta_path = cfg.state_dir.join("meta");
        let meta = match Meta::load(&meta_path)? {
            Some(m) if m.volume != cfg.name => {
                return Err(OpenError::WrongVolume {
                    dir: cfg.state_dir.clone(),
                    found: m.volume,
                    found_size: m.size,
                    wanted: cfg.name.clone(),
                    wanted_size: cfg.size,
                })
            }
            Some(m) => m,
            None => Meta {
                volume: cfg.name.clone(),
                size: cfg.size,
                block_size: BLOCK_SIZE,
                epoch: 1,
                role: cfg.initial_role,
                peer: None,
                acked_seq: 0,
                clean_shutdown: true,
                takeover: Default::default(),
                boot_id: String::new(),
                grown_from: Vec::new(),
            },
        };
        let boot_id = crate::meta::current_boot_id(&cfg.state_dir);
        // The page cache is what it was when the engine last ran here only within the same boot.
        let same_boot = !boot_id.is_empty() && meta.boot_id == boot_id;
        let fresh = !meta_path.exists();
        // The committed size is the meta file's; `--size` only ever grows it (below, once open).
        let size = meta.size;
        let store = if fresh {
            BlockStore::open_or_create(&cfg.data, size)?
        } else {
            BlockStore::open_committed(&cfg.data, size)?
        };
        // Before anything writes the data file: the snapshots' areas must see every change.
        let snapshots =
            crate::snapshot::Snapshots::open(&cfg.state_dir, &cfg.name, &store).map_err(dir_err)?;
        if fresh && meta.role == Role::Secondary {
            // Whatever the file held, the full copy assumes zeros where the primary has holes.
            store
                .punch_hole(0, size)
                .map_err(|source| OpenError::StateDir {
                    path: cfg.data.clone(),
                    source,
                })?;
        }
        let progress_path = cfg.state_dir.join("progress");
        // The progress file alone says how far the replica got and whether it is consistent. A
        // new state dir gets it before its meta file: a meta file without one was never a replica
        // this engine wrote, and a secondary then starts over with a full copy.
        let progress_now = match format::progress::read(&progress_path).map_err(dir_err)? {
            Some(p) => p,
            None => {
                let p = format::progress::Progress {
                    applied_seq: 0,
                    standing: if meta.role == Role::Secondary {
                        Standing::NeedsFull
                    } else {
                        Standing::Consistent
                    },
                };
                write_file_synced(&progress_path, &format::progress::encode(p)).map_err(dir_err)?;
                p
            }
        };
        let applied_seq = progress_now.applied_seq;
        let progress = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&progress_path)
            .map_err(dir_err)?;
        // Bitmap files stored before the volume grew load grown (`Bitmap::load_grown`).
        let earlier: Vec<u64> = meta.grown_from.iter().map(|&s| blocks_in(s)).collect();
        let repl = match &cfg.pair {
            Some(p) => {
                let tracker = Tracker::open_grown(
                    &cfg.state_dir,
                    blocks_in(size),
                    &earlier,
                    meta.acked_seq,
                    meta.epoch,
                    p.journal_bytes,
                )
                .map_err(dir_err)?;
                if meta.takeover.reversing {
                    // Reverse replication ends (InSync) on the first durable acknowledgement with
                    // nothing pending; a restart before it must resync once, even with an empty
                    // table, or the pair would say Reversing until the next host write.
                    tracker.need_resync();
                }
                let faults = crate::repl::Faults::default();
                faults.rate.store(p.rate, Ordering::Relaxed);
                Some(Arc::new(Repl {
                    tracker,
                    faults,
                    stats: Default::default(),
                    wake: Default::default(),
                    acked: tokio::sync::watch::channel(meta.acked_seq).0,
                    durable: tokio::sync::watch::channel(meta.acked_seq).0,
                    peer: std::sync::RwLock::new(p.peer.clone()),
                    peer_gen: Default::default(),
                    token: p.token.clone(),
                    mode: p.mode,
                    sync_timeout: p.sync_timeout,
                    lease: crate::lease::Lease::new(p.lease_ms, p.lease_wait),
                    flush_wanted: Default::default(),
                    priority: Default::default(),
                    peer_back: Default::default(),
                    backing_off: Default::default(),
                }))
            }
            None => None,
        };
        let replica = ReplicaState {
            applied_seq,
            durable_seq: applied_seq,
            standing: progress_now.standing,
            consistent_target: None,
            peer_pending: Bitmap::load_grown(
                &cfg.state_dir.join(replica::HB_FILE),
                blocks_in(size),
                &earlier,
            )
            .map_err(dir_err)?,
            peer_last_seq: format::seq::read(&cfg.state_dir.join(replica::HB_SEQ_FILE))
                .map_err(dir_err)?,
            peer_seen_us: 0,
            hb_dirty: false,
        };
        let blocks = blocks_in(size);
        let proxy = Proxy::new(
            cfg.pair
                .as_ref()
                .map(|p| p.peer.clone())
                .unwrap_or_default(),
            cfg.pair.as_ref().and_then(|p| p.token.clone()),
            cfg.proxy_timeout,
        );
        let areas = Areas::open(
            &cfg.state_dir,
            size,
            blocks,
            meta.takeover.phase,
            proxy,
            same_boot,
            &earlier,
        )?;
        let losses = crate::loss::Losses::open_grown(&cfg.state_dir, &cfg.name, size, &earlier)
            .map_err(OpenError::Loss)?;
        let mover = crate::repl::mover::Mover::open(&cfg.state_dir).map_err(dir_err)?;
        let mut running = meta.clone();
        running.clean_shutdown = false;
        running.boot_id = boot_id;
        running.store(&meta_path)?;
        let vol = Arc::new(Self {
            name: cfg.name.clone(),
            store,
            meta_path,
            role_now: std::sync::atomic::AtomicU8::new(role_code(running.role)),
            gate: tokio::sync::RwLock::new(()),
            fenced: watch::channel(0).0,
            areas,
            takeover_lock: tokio::sync::Mutex::new(()),
            transitions: Mutex::new(()),
            meta: Mutex::new(running),
            counters: Counters::default(),
            repl,
            losses,
            snapshots,
            mover,
            replica: Mutex::new(replica),
            applied: watch::channel(applied_seq).0,
            secondary_access: cfg.secondary_access,
            forward: forward::Forwarder::new(
                cfg.pair
                    .as_ref()
                    .map(|p| p.peer.clone())
                    .unwrap_or_default(),
                cfg.pair.as_ref().and_then(|p| p.token.clone()),
                cfg.proxy_timeout,
            ),
            implicit_takeover: cfg.implicit_takeover,
            progress,
            _lock: lock,
        });
        vol.grow_at_open(cfg.size)?;
        crate::repl::mover::recover(&vol);
        Ok(vol)
    }

    /// Blocks whose newest content is still on the old primary (the handed-off table; empty
    /// outside a drain).
    pub fn handed_off_table(&self) -> Bitmap {
        self.areas.state().pending_table()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn size(&self) -> u64 {
        self.store.size()
    }

    pub fn data_path(&self) -> &Path {
        self.store.path()
    }

    pub(crate) fn meta(&self) -> MutexGuard<'_, Meta> {
        // A poisoned lock only means another thread panicked mid-update of plain data; keep serving.
        self.meta.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Changes the meta file durably, then the in-memory copy.
    pub(crate) fn update_meta(&self, f: impl FnOnce(&mut Meta)) -> Result<(), MetaError> {
        let mut m = self.meta();
        let mut next = m.clone();
        f(&mut next);
        next.store(&self.meta_path)?;
        self.role_now.store(role_code(next.role), Ordering::Release);
        *m = next;
        Ok(())
    }

    pub fn role(&self) -> Role {
        match self.role_now.load(Ordering::Acquire) {
            0 => Role::Primary,
            1 => Role::Secondary,
            _ => Role::Fenced,
        }
    }

    pub fn epoch(&self) -> u64 {
        self.meta().epoch
    }

    /// The epoch if the metadata lock is free now: the log formatter calls this and must never wait
    /// (a line may be logged while this thread holds the lock).
    pub fn try_epoch(&self) -> Option<u64> {
        self.meta.try_lock().ok().map(|m| m.epoch)
    }

    /// Graceful stop: data durable, table checkpointed, meta marked clean.
    pub fn shutdown(&self) -> Result<(), OpenError> {
        let io_err = |source| OpenError::StateDir {
            path: self.data_path().to_path_buf(),
            source,
        };
        self.store.sync().map_err(io_err)?;
        self.checkpoint_with(true).map_err(io_err)?;
        let mut m = self.meta();
        m.clean_shutdown = true;
        m.store(&self.meta_path)?;
        Ok(())
    }

    /// Persists the differential table and the peer's acknowledged seq (primary side).
    pub fn checkpoint(&self) -> io::Result<()> {
        self.checkpoint_with(false)
    }

    /// `quiesced`: a clean shutdown, whose data file was just synced.
    fn checkpoint_with(&self, quiesced: bool) -> io::Result<()> {
        let Some(r) = &self.repl else { return Ok(()) };
        if self.areas.active() {
            self.persist_areas()?;
        }
        self.persist_heartbeat_set()?;
        // Before the table: a block the table no longer asks back is never still to compare.
        self.losses.persist()?;
        r.tracker.checkpoint(|| self.store.sync(), quiesced)?;
        let acked = r.tracker.counts().acked_seq;
        let mut m = self.meta();
        if m.acked_seq != acked {
            m.acked_seq = acked;
            m.store(&self.meta_path)
                .map_err(|e| io::Error::other(e.to_string()))?;
        }
        Ok(())
    }

    /// Stores the takeover bitmaps that changed, each after the data it vouches for is durable.
    pub(crate) fn persist_areas(&self) -> io::Result<()> {
        self.areas.persist(&self.store)
    }

    /// Reads the data file itself, whatever the role and the overlay.
    pub fn read_local(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.store.read_at(buf, offset)
    }

    pub fn allocated_ranges(&self) -> io::Result<Vec<(u64, u64)>> {
        self.store.allocated_ranges()
    }
}

/// Creates `path` with `bytes`, durably (the file and its directory entry).
fn write_file_synced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    crate::seam::power::io(path)?;
    let mut f = std::fs::File::create(path)?;
    std::io::Write::write_all(&mut f, bytes)?;
    f.sync_all()?;
    crate::meta::sync_dir(path)
}
