//! A volume as the host sees it: the entry points for host I/O (read, write, flush, trim, zero),
//! the role check that keeps a secondary from serving writes, and the counters `status` reports.

use std::{
    io,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
};

use tokio::sync::watch;

use bytes::Bytes;
use tonic::Status;

use crate::{
    bitmap::Bitmap,
    meta::{Meta, MetaError, Role},
    nbd::proto as nbd,
    pb::{self, replication_message::Body},
    repl::{tracker::Payload, Mode, Repl, Tracker},
    store::{BlockStore, StoreError},
    takeover::{proxy::Proxy, Areas},
};

/// Tracking block: the unit of the differential table and of proxied reads.
pub const BLOCK_SIZE: u32 = 4096;

/// Why a host request failed; each maps to one NBD errno.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("volume is {0} on this engine")]
    NotServing(Role),
    #[error("proxied read from the old primary failed: {0}")]
    Proxy(String),
}

impl HostError {
    pub fn errno(&self) -> u32 {
        match self {
            HostError::Io(e) if e.raw_os_error() == Some(28) => nbd::ENOSPC,
            HostError::Io(_) | HostError::Proxy(_) => nbd::EIO,
            HostError::NotServing(_) => nbd::EPERM,
        }
    }
}

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
}

/// Counters reported by `status` and the metrics endpoint.
#[derive(Debug, Default)]
pub struct Counters {
    pub nbd_connections: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    pub flushes: AtomicU64,
}

/// What an NBD export name asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportName {
    Ok,
    Unknown,
    /// `<volume>@<epoch>` of an older (or other) epoch: a session from before a takeover.
    StaleEpoch(u64),
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
    /// A secondary serves read-only host sessions from a consistent replica.
    pub secondary_read_only: bool,
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
}

/// What one applied batch changed (before it is made durable).
#[derive(Debug, Default)]
pub struct Applied {
    pub epoch: u64,
    pub applied_seq: u64,
    /// Resync images written: (block, generation), acknowledged once durable.
    pub images: Vec<(u64, u64)>,
    pub wrote: bool,
    /// A DrainComplete was applied and made durable.
    pub drain_complete: bool,
}

/// The secondary's view of the stream it applies.
#[derive(Debug)]
pub struct ReplicaState {
    pub applied_seq: u64,
    /// Highest seq known to be on stable storage (what the progress file says).
    pub durable_seq: u64,
    pub inconsistent: bool,
    pub needs_full: bool,
    /// Consistent again once the journal is applied up to here (after a resync).
    pub consistent_target: Option<u64>,
    /// The primary's pending set from its last heartbeat (what a forced promotion would lose).
    pub peer_pending: Option<Bitmap>,
    pub peer_last_seq: u64,
    pub peer_seen_us: u64,
    /// The heartbeat set changed since it was last persisted.
    pub hb_dirty: bool,
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
    pub gate: tokio::sync::RwLock<()>,
    /// Bumped on every fence: open host sessions close.
    pub fenced: watch::Sender<u64>,
    /// Overlay, handed-off table and proxied reads (takeover).
    pub areas: Areas,
    /// One takeover at a time.
    pub(crate) takeover_lock: tokio::sync::Mutex<()>,
    pub counters: Counters,
    pub repl: Option<Arc<Repl>>,
    replica: Mutex<ReplicaState>,
    secondary_read_only: bool,
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

/// The primary's pending set as last heard on a heartbeat (secondary side).
const HB_FILE: &str = "peer_pending_heartbeat";

/// The seq of the primary's last heartbeat; 0 when none was stored. A file that does not parse is
/// an error at open, never silently zero.
fn read_hb_seq(dir: &Path) -> io::Result<u64> {
    let path = dir.join("peer_last_seq");
    match std::fs::read_to_string(&path) {
        Ok(s) => s.trim().parse().map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: not a sequence number", path.display()),
            )
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e),
    }
}

const PROGRESS_MAGIC: &[u8; 8] = b"TNDPROG\0";

fn encode_progress(applied: u64, inconsistent: bool, needs_full: bool) -> [u8; 24] {
    let mut b = [0u8; 24];
    b[0..8].copy_from_slice(PROGRESS_MAGIC);
    b[8..16].copy_from_slice(&applied.to_le_bytes());
    let flags = u32::from(inconsistent) | (u32::from(needs_full) << 1);
    b[16..20].copy_from_slice(&flags.to_le_bytes());
    let crc = crc32c::crc32c(&b[0..20]);
    b[20..24].copy_from_slice(&crc.to_le_bytes());
    b
}

/// The progress file: (applied seq, inconsistent, needs_full); `None` when it was never written.
/// A damaged one is an error at open: falling back to `meta` could open a replica whose resync
/// was cut short as consistent.
fn read_progress(path: &Path) -> io::Result<Option<(u64, bool, bool)>> {
    let b = match std::fs::read(path) {
        Ok(b) if b.is_empty() => return Ok(None),
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let bad = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: bad magic, length or checksum", path.display()),
        )
    };
    let word = |r: std::ops::Range<usize>| b.get(r).ok_or_else(bad);
    if b.len() != 24 || word(0..8)? != PROGRESS_MAGIC {
        return Err(bad());
    }
    let u32_at = |o: usize| -> io::Result<u32> {
        let mut x = [0u8; 4];
        x.copy_from_slice(word(o..o + 4)?);
        Ok(u32::from_le_bytes(x))
    };
    if crc32c::crc32c(word(0..20)?) != u32_at(20)? {
        return Err(bad());
    }
    let mut seq = [0u8; 8];
    seq.copy_from_slice(word(8..16)?);
    let flags = u32_at(16)?;
    Ok(Some((
        u64::from_le_bytes(seq),
        flags & 1 != 0,
        flags & 2 != 0,
    )))
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

        let meta_path = cfg.state_dir.join("meta");
        let meta = match Meta::load(&meta_path)? {
            Some(m) if m.volume != cfg.name || m.size != cfg.size => {
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
                // A new secondary knows nothing: it asks for a full copy and is inconsistent until then.
                inconsistent: cfg.initial_role == Role::Secondary,
                needs_full: cfg.initial_role == Role::Secondary,
                volume: cfg.name.clone(),
                size: cfg.size,
                block_size: BLOCK_SIZE,
                epoch: 1,
                role: cfg.initial_role,
                peer: None,
                applied_seq: 0,
                acked_seq: 0,
                clean_shutdown: true,
                takeover: Default::default(),
                boot_id: String::new(),
            },
        };
        let boot_id = crate::meta::current_boot_id(&cfg.state_dir);
        // The page cache is what it was when the engine last ran here only within the same boot.
        let same_boot = !boot_id.is_empty() && meta.boot_id == boot_id;
        let fresh = !meta_path.exists();
        let store = BlockStore::open_or_create(&cfg.data, cfg.size)?;
        if fresh && meta.role == Role::Secondary {
            // Whatever the file held, the full copy assumes zeros where the primary has holes.
            store
                .punch_hole(0, cfg.size)
                .map_err(|source| OpenError::StateDir {
                    path: cfg.data.clone(),
                    source,
                })?;
        }
        let progress_path = cfg.state_dir.join("progress");
        let progress_now = read_progress(&progress_path).map_err(dir_err)?;
        let applied_seq = progress_now
            .map_or(meta.applied_seq, |p| p.0)
            .max(meta.applied_seq);
        let progress = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&progress_path)
            .map_err(dir_err)?;
        let repl = match &cfg.pair {
            Some(p) => {
                let tracker = Tracker::open(
                    &cfg.state_dir,
                    cfg.size / u64::from(BLOCK_SIZE),
                    meta.acked_seq,
                    meta.epoch,
                    p.journal_bytes,
                )
                .map_err(dir_err)?;
                let faults = crate::repl::Faults::default();
                faults.rate.store(p.rate, Ordering::Relaxed);
                Some(Arc::new(Repl {
                    tracker,
                    faults,
                    stats: Default::default(),
                    wake: Default::default(),
                    acked: tokio::sync::watch::channel(meta.acked_seq).0,
                    durable: tokio::sync::watch::channel(meta.acked_seq).0,
                    peer: p.peer.clone(),
                    token: p.token.clone(),
                    mode: p.mode,
                    sync_timeout: p.sync_timeout,
                    flush_wanted: Default::default(),
                    priority: Default::default(),
                }))
            }
            None => None,
        };
        let (inconsistent, needs_full) =
            progress_now.map_or((meta.inconsistent, meta.needs_full), |p| (p.1, p.2));
        let replica = ReplicaState {
            applied_seq,
            durable_seq: applied_seq,
            inconsistent,
            needs_full,
            consistent_target: None,
            peer_pending: Bitmap::load(
                &cfg.state_dir.join(HB_FILE),
                cfg.size / u64::from(BLOCK_SIZE),
            )
            .map_err(dir_err)?,
            peer_last_seq: read_hb_seq(&cfg.state_dir).map_err(dir_err)?,
            peer_seen_us: 0,
            hb_dirty: false,
        };
        let blocks = cfg.size / u64::from(BLOCK_SIZE);
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
            cfg.size,
            blocks,
            meta.takeover.phase,
            proxy,
            same_boot,
        )?;
        let mut running = meta.clone();
        running.clean_shutdown = false;
        running.boot_id = boot_id;
        running.store(&meta_path)?;
        Ok(Arc::new(Self {
            name: cfg.name.clone(),
            store,
            meta_path,
            role_now: std::sync::atomic::AtomicU8::new(role_code(running.role)),
            gate: tokio::sync::RwLock::new(()),
            fenced: watch::channel(0).0,
            areas,
            takeover_lock: tokio::sync::Mutex::new(()),
            meta: Mutex::new(running),
            counters: Counters::default(),
            repl,
            replica: Mutex::new(replica),
            secondary_read_only: cfg.secondary_read_only,
            implicit_takeover: cfg.implicit_takeover,
            progress,
            _lock: lock,
        }))
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

    /// Whether host I/O is allowed right now, and why not.
    pub fn check_serving(&self) -> Result<(), HostError> {
        match self.role() {
            Role::Primary => Ok(()),
            r => Err(HostError::NotServing(r)),
        }
    }

    /// Whether a read can run inline on the connection's reader (no network wait).
    pub fn read_is_quick(&self, _offset: u64, _len: u32) -> bool {
        !self.areas.active()
    }

    /// Whether a plain write completes without waiting for the peer.
    pub fn write_is_quick(&self) -> bool {
        !self.areas.active() && !matches!(&self.repl, Some(r) if r.mode == Mode::Sync)
    }

    /// Whether a host session may open now; `Ok(true)` means read-only (a secondary with
    /// `--secondary-access read-only` whose replica is consistent).
    pub fn host_access(&self) -> Result<bool, HostError> {
        match self.role() {
            Role::Primary => Ok(false),
            Role::Secondary if self.secondary_read_only && !self.replica().inconsistent => Ok(true),
            r => Err(HostError::NotServing(r)),
        }
    }

    /// Export names: `""` or `<volume>` (whatever the epoch), or `<volume>@<epoch>`, which opens only
    /// while the volume is at that epoch. An attachment pinned to an epoch can never write into a
    /// later one, even if this engine serves again after a failback (a stale mount stays fenced).
    pub fn export_access(&self, name: &str) -> ExportName {
        if name.is_empty() || name == self.name {
            return ExportName::Ok;
        }
        match name.rsplit_once('@') {
            Some((v, e)) if v == self.name => match e.parse::<u64>() {
                Ok(e) if e == self.epoch() => ExportName::Ok,
                Ok(e) => ExportName::StaleEpoch(e),
                Err(_) => ExportName::Unknown,
            },
            _ => ExportName::Unknown,
        }
    }

    /// A host session is opening (NBD OPT_GO): with implicit takeover, a secondary takes over
    /// first (the handoff, then the session), as the patent's variant S:L279 allows.
    pub async fn open_session(&self) -> Result<bool, HostError> {
        if self.implicit_takeover && self.role() == Role::Secondary {
            let req = pb::TakeoverRequest {
                volume: self.name.clone(),
                ..Default::default()
            };
            if let Err(e) = self.takeover(req).await {
                tracing::warn!(error = %e.message(), "implicit takeover failed");
            }
        }
        self.host_access()
    }

    pub async fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, HostError> {
        let _gate = self.gate.read().await;
        self.host_access()?;
        if self.areas.active() {
            let buf = self.read_routed(offset, len).await?;
            self.counters
                .bytes_read
                .fetch_add(u64::from(len), Ordering::Relaxed);
            return Ok(buf);
        }
        let mut buf = vec![0u8; len as usize];
        self.store.read_at(&mut buf, offset)?;
        self.counters
            .bytes_read
            .fetch_add(u64::from(len), Ordering::Relaxed);
        Ok(buf)
    }

    pub async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> Result<(), HostError> {
        let gate = self.gate.read().await;
        self.check_serving()?;
        let len = data.len() as u64;
        match &self.repl {
            Some(r) if self.areas.active() => {
                let seq = self
                    .write_routed(offset, Payload::Data(Bytes::from(data)), false)
                    .await?;
                r.wake.notify_one();
                if r.mode == Mode::Sync {
                    r.wait_acked(seq).await;
                }
            }
            Some(r) => {
                let data = Bytes::from(data);
                let seq = r.tracker.write(offset, Payload::Data(data.clone()), || {
                    self.store.write_at(&data, offset)
                })?;
                r.wake.notify_one();
                if r.mode == Mode::Sync {
                    r.wait_acked(seq).await;
                }
            }
            None => self.store.write_at(&data, offset)?,
        }
        self.counters
            .bytes_written
            .fetch_add(len, Ordering::Relaxed);
        drop(gate);
        if fua {
            self.flush().await?;
        }
        Ok(())
    }

    /// Zeroing writes and trims: replicated as zero records, so both sides read zeros.
    async fn zero(
        &self,
        offset: u64,
        len: u64,
        keep_allocated: bool,
        fua: bool,
    ) -> Result<(), HostError> {
        let gate = self.gate.read().await;
        self.check_serving()?;
        if let (Some(r), true) = (&self.repl, self.areas.active()) {
            let seq = self
                .write_routed(offset, Payload::Zero(len), keep_allocated)
                .await?;
            r.wake.notify_one();
            if r.mode == Mode::Sync {
                r.wait_acked(seq).await;
            }
            drop(gate);
            if fua {
                self.flush().await?;
            }
            return Ok(());
        }
        let apply = || {
            if keep_allocated {
                self.store.zero_range(offset, len)
            } else {
                self.store.punch_hole(offset, len)
            }
        };
        match &self.repl {
            Some(r) => {
                let seq = r.tracker.write(offset, Payload::Zero(len), apply)?;
                r.wake.notify_one();
                if r.mode == Mode::Sync {
                    r.wait_acked(seq).await;
                }
            }
            None => apply()?,
        }
        drop(gate);
        if fua {
            self.flush().await?;
        }
        Ok(())
    }

    pub async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), HostError> {
        self.zero(offset, len, false, fua).await
    }

    pub async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        no_hole: bool,
        fua: bool,
    ) -> Result<(), HostError> {
        self.zero(offset, len, no_hole, fua).await?;
        self.counters
            .bytes_written
            .fetch_add(len, Ordering::Relaxed);
        Ok(())
    }

    /// Makes every write completed so far durable.
    pub async fn flush(&self) -> Result<(), HostError> {
        let _gate = self.gate.read().await;
        self.host_access()?;
        self.store.sync_async().await?;
        if self.areas.active() {
            // A host FLUSH covers writes routed to the overlay too: their data, then their bits.
            self.persist_areas()?;
        }
        if let Some(r) = &self.repl {
            if r.mode == Mode::Sync && self.role() == Role::Primary {
                // Sync mode: a flush makes the writes durable on both sides.
                let last = r.tracker.counts().last_seq;
                r.wait_durable(last).await;
            }
        }
        self.counters.flushes.fetch_add(1, Ordering::Relaxed);
        Ok(())
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

    /// Persists the primary's last heartbeat set (secondary side), so a forced promotion after a
    /// restart still knows what it loses.
    fn persist_heartbeat_set(&self) -> io::Result<()> {
        let (set, seq) = {
            let mut rs = self.replica();
            if !rs.hb_dirty {
                return Ok(());
            }
            rs.hb_dirty = false;
            (
                rs.peer_pending.as_ref().map(Bitmap::encode),
                rs.peer_last_seq,
            )
        };
        let dir = self.meta_path.parent().unwrap_or(Path::new("."));
        if let Some(set) = set {
            set.store(&dir.join(HB_FILE))?;
        }
        let tmp = dir.join("peer_last_seq.tmp");
        crate::seam::power::io(&tmp)?;
        std::fs::write(&tmp, seq.to_string())?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, dir.join("peer_last_seq"))?;
        crate::meta::sync_dir(&tmp)
    }

    /// Drops the last heartbeat's pending set (after a role change it describes an old stream).
    pub(crate) fn forget_heartbeat_set(&self) {
        {
            let mut rs = self.replica();
            rs.peer_pending = None;
            rs.peer_last_seq = 0;
            rs.hb_dirty = false;
        }
        let dir = self.meta_path.parent().unwrap_or(Path::new("."));
        let _ = std::fs::remove_file(dir.join(HB_FILE));
        let _ = std::fs::remove_file(dir.join("peer_last_seq"));
    }

    pub fn replica(&self) -> MutexGuard<'_, ReplicaState> {
        self.replica.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// First message of a replication stream: where this replica stands.
    pub fn replica_hello(&self) -> pb::ReplicationAck {
        let resend = match (&self.repl, self.role()) {
            (Some(r), Role::Secondary) => {
                let s = r.tracker.state();
                if s.pending.is_empty() {
                    Vec::new()
                } else {
                    s.pending.to_bytes()
                }
            }
            _ => Vec::new(),
        };
        let r = self.replica();
        pb::ReplicationAck {
            epoch: self.epoch(),
            applied_seq: r.applied_seq,
            durable_seq: r.durable_seq,
            need_full_resync: r.needs_full,
            inconsistent: r.inconsistent,
            role: crate::grpc::role_pb(self.role()) as i32,
            resend_bitmap: resend.into(),
            ..Default::default()
        }
    }

    /// Applies a batch of replication messages (not yet durable: see `make_durable`).
    /// A stale epoch, a gap or a checksum error refuses the batch before anything is written.
    pub fn apply_batch(&self, batch: Vec<pb::ReplicationMessage>) -> Result<Applied, Status> {
        if self.role() == Role::Primary {
            // The old primary draining its table to us after a takeover.
            return self.apply_drain(batch);
        }
        if self.role() != Role::Secondary {
            return Err(Status::failed_precondition(format!(
                "volume {} is {} here, not secondary",
                self.name,
                self.role()
            )));
        }
        let my_epoch = self.epoch();
        let mut newest_epoch = my_epoch;
        for m in &batch {
            if m.volume != self.name {
                return Err(Status::not_found(format!("unknown volume {:?}", m.volume)));
            }
            if m.epoch < my_epoch {
                if let Some(r) = &self.repl {
                    r.stats.stale_rejected.fetch_add(1, Ordering::Relaxed);
                }
                return Err(Status::failed_precondition(format!(
                    "stale epoch {} < {my_epoch}; nothing written",
                    m.epoch
                )));
            }
            newest_epoch = newest_epoch.max(m.epoch);
            let bad_write =
                |w: &pb::WriteRecord| w.zero_length == 0 && crc32c::crc32c(&w.data) != w.crc32c;
            match &m.body {
                Some(Body::Write(w)) if bad_write(w) => {
                    return Err(Status::data_loss(format!(
                        "checksum mismatch in record {}",
                        w.seq
                    )));
                }
                Some(Body::WriteBatch(wb)) => {
                    if let Some(w) = wb.records.iter().find(|w| bad_write(w)) {
                        return Err(Status::data_loss(format!(
                            "checksum mismatch in record {}",
                            w.seq
                        )));
                    }
                }
                Some(Body::Block(b))
                    if crc32c::crc32c(&b.data) != b.crc32c
                        || b.data.len() != BLOCK_SIZE as usize =>
                {
                    return Err(Status::data_loss(format!("bad image of block {}", b.block)));
                }
                _ => {}
            }
        }
        if newest_epoch > my_epoch {
            let mut m = self.meta();
            m.epoch = newest_epoch;
            m.store(&self.meta_path)
                .map_err(|e| Status::internal(e.to_string()))?;
        }
        let io = |e: io::Error| Status::internal(format!("applying replication: {e}"));
        let mut rs = self.replica();
        let mut out = Applied {
            epoch: newest_epoch,
            ..Default::default()
        };
        for m in batch {
            match m.body {
                Some(Body::Write(w)) => {
                    self.apply_record(&mut rs, &w)?;
                    out.wrote = true;
                }
                Some(Body::WriteBatch(wb)) => {
                    for w in &wb.records {
                        self.apply_record(&mut rs, w)?;
                    }
                    out.wrote = true;
                }
                Some(Body::Block(b)) => {
                    if b.block >= self.size() / u64::from(BLOCK_SIZE) {
                        return Err(Status::invalid_argument(format!(
                            "block {} is out of range",
                            b.block
                        )));
                    }
                    if !rs.inconsistent {
                        // Mark inconsistent durably before the first out-of-order write lands.
                        rs.inconsistent = true;
                        self.write_progress(rs.durable_seq, &rs).map_err(io)?;
                    }
                    self.store
                        .write_at(&b.data, b.block * u64::from(BLOCK_SIZE))
                        .map_err(io)?;
                    out.images.push((b.block, b.generation));
                    out.wrote = true;
                }
                Some(Body::ResyncDone(d)) => {
                    rs.consistent_target = Some(d.consistent_seq);
                    if d.next_seq > 0 {
                        rs.applied_seq = rs.applied_seq.max(d.next_seq - 1);
                    }
                    if d.full {
                        rs.needs_full = false;
                    }
                    out.wrote = true;
                }
                Some(Body::Heartbeat(h)) => {
                    let blocks = self.size() / u64::from(BLOCK_SIZE);
                    let set = if let Some(w) = &h.pending_words {
                        Some(Bitmap::from_sparse(blocks, w))
                    } else if !h.pending_bitmap.is_empty() {
                        Some(Bitmap::from_bytes(blocks, &h.pending_bitmap))
                    } else {
                        None
                    };
                    match set {
                        // Unchanged since the last heartbeat.
                        None => {}
                        Some(None) => {
                            return Err(Status::invalid_argument(
                                "heartbeat: malformed pending set (size or encoding)",
                            ))
                        }
                        Some(s) => rs.peer_pending = s,
                    }
                    rs.peer_last_seq = h.last_seq;
                    rs.peer_seen_us = crate::repl::tracker::now_us();
                    rs.hb_dirty = true;
                }
                Some(Body::DrainComplete(_)) | None => {}
            }
        }
        if rs.consistent_target.is_some_and(|t| rs.applied_seq >= t) {
            rs.consistent_target = None;
            rs.inconsistent = false;
        }
        out.applied_seq = rs.applied_seq;
        Ok(out)
    }

    fn apply_record(&self, rs: &mut ReplicaState, w: &pb::WriteRecord) -> Result<(), Status> {
        if w.seq <= rs.applied_seq {
            return Ok(());
        }
        if w.seq != rs.applied_seq + 1 {
            return Err(Status::failed_precondition(format!(
                "gap in the stream: got seq {} after {}",
                w.seq, rs.applied_seq
            )));
        }
        let len = if w.zero_length > 0 {
            w.zero_length
        } else {
            w.data.len() as u64
        };
        if w.offset.checked_add(len).is_none_or(|e| e > self.size()) {
            return Err(Status::invalid_argument(format!(
                "record {} is out of range",
                w.seq
            )));
        }
        let res = if w.zero_length > 0 {
            self.store.punch_hole(w.offset, w.zero_length)
        } else {
            self.store.write_at(&w.data, w.offset)
        };
        res.map_err(|e| Status::internal(format!("applying record {}: {e}", w.seq)))?;
        rs.applied_seq = w.seq;
        Ok(())
    }

    /// Makes everything applied so far durable (data fdatasync, then the progress file);
    /// returns the seq that is now durable.
    pub fn make_durable(&self) -> io::Result<u64> {
        let (seq, flags) = {
            let rs = self.replica();
            (rs.applied_seq, (rs.inconsistent, rs.needs_full))
        };
        self.store.sync()?;
        use std::os::unix::fs::FileExt;
        crate::seam::power::io(&self.meta_path)?;
        self.progress
            .write_all_at(&encode_progress(seq, flags.0, flags.1), 0)?;
        self.progress.sync_data()?;
        let mut rs = self.replica();
        rs.durable_seq = rs.durable_seq.max(seq);
        Ok(seq)
    }

    /// Rewrites the progress file from the replica state now.
    pub(crate) fn write_progress_now(&self) -> io::Result<()> {
        let rs = self.replica();
        self.write_progress(rs.durable_seq, &rs)
    }

    /// Progress file: { magic "TNDPROG\0" | applied_seq u64 | flags u32 | crc32c u32 }, rewritten in place.
    fn write_progress(&self, seq: u64, rs: &ReplicaState) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        let b = encode_progress(seq, rs.inconsistent, rs.needs_full);
        crate::seam::power::io(&self.meta_path)?;
        self.progress.write_all_at(&b, 0)?;
        self.progress.sync_data()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::{replication_message::Body, ReplicationMessage, WriteRecord};

    fn secondary_at_epoch(dir: &Path, epoch: u64) -> Arc<Volume> {
        let cfg = VolumeConfig {
            name: "v".into(),
            data: dir.join("data"),
            size: 1 << 20,
            state_dir: dir.join("state"),
            initial_role: Role::Secondary,
            pair: None,
            secondary_read_only: false,
            proxy_timeout: std::time::Duration::from_secs(1),
            implicit_takeover: false,
        };
        drop(Volume::open(&cfg).unwrap());
        let meta_path = cfg.state_dir.join("meta");
        let mut m = Meta::load(&meta_path).unwrap().unwrap();
        m.epoch = epoch;
        m.store(&meta_path).unwrap();
        Volume::open(&cfg).unwrap()
    }

    fn write_msg(epoch: u64, seq: u64, byte: u8) -> ReplicationMessage {
        let data = Bytes::from(vec![byte; 4096]);
        ReplicationMessage {
            volume: "v".into(),
            epoch,
            body: Some(Body::Write(WriteRecord {
                seq,
                timestamp_us: 0,
                offset: 0,
                crc32c: crc32c::crc32c(&data),
                data,
                zero_length: 0,
            })),
        }
    }

    fn heartbeat(words: Option<Vec<u8>>) -> ReplicationMessage {
        ReplicationMessage {
            volume: "v".into(),
            epoch: 5,
            body: Some(Body::Heartbeat(crate::pb::Heartbeat {
                pending_words: words.map(Bytes::from),
                last_seq: 9,
                ..Default::default()
            })),
        }
    }

    /// The pending set a heartbeat carries (sparse) is kept; an absent one leaves it as it was;
    /// a malformed one is refused and changes nothing.
    #[test]
    fn heartbeat_pending_sets_are_kept_and_malformed_ones_refused() {
        let d = tempfile::tempdir().unwrap();
        let v = secondary_at_epoch(d.path(), 5);
        let mut set = Bitmap::new(256);
        set.set(3);
        set.set(200);
        v.apply_batch(vec![heartbeat(Some(set.to_sparse()))])
            .unwrap();
        assert_eq!(v.replica().peer_pending.as_ref(), Some(&set));
        v.apply_batch(vec![heartbeat(None)]).unwrap();
        assert_eq!(v.replica().peer_pending.as_ref(), Some(&set));
        let err = v
            .apply_batch(vec![heartbeat(Some(vec![1; 15]))])
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert_eq!(v.replica().peer_pending.as_ref(), Some(&set));
        // An empty set is a set: everything reached this side.
        v.apply_batch(vec![heartbeat(Some(Vec::new()))]).unwrap();
        assert_eq!(
            v.replica().peer_pending.as_ref().map(Bitmap::count),
            Some(0)
        );
    }

    /// AT-30: a message from an older epoch is refused and nothing of its batch is written;
    /// a newer epoch is adopted durably.
    #[test]
    fn at30_stale_epoch_is_refused_and_writes_nothing() {
        let d = tempfile::tempdir().unwrap();
        let v = secondary_at_epoch(d.path(), 5);
        let err = v
            .apply_batch(vec![write_msg(5, 1, 0xaa), write_msg(4, 2, 0xbb)])
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition);
        let mut b = vec![0u8; 4096];
        v.read_local(&mut b, 0).unwrap();
        assert!(
            b.iter().all(|x| *x == 0),
            "a refused batch must write nothing"
        );
        assert_eq!(v.replica().applied_seq, 0);
        let ok = v.apply_batch(vec![write_msg(6, 1, 0xcc)]).unwrap();
        assert_eq!(ok.applied_seq, 1);
        assert_eq!(v.epoch(), 6);
        v.read_local(&mut b, 0).unwrap();
        assert!(b.iter().all(|x| *x == 0xcc));
        // Corrupt data is refused too.
        let mut m = write_msg(6, 2, 0xdd);
        if let Some(Body::Write(w)) = &mut m.body {
            w.crc32c ^= 1;
        }
        assert_eq!(
            v.apply_batch(vec![m]).unwrap_err().code(),
            tonic::Code::DataLoss
        );
        // A gap is refused.
        assert_eq!(
            v.apply_batch(vec![write_msg(6, 5, 0xee)])
                .unwrap_err()
                .code(),
            tonic::Code::FailedPrecondition
        );
    }
}
