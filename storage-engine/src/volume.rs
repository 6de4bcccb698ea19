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

use crate::{
    meta::{Meta, MetaError, Role},
    nbd::proto as nbd,
    store::{BlockStore, StoreError},
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
}

impl HostError {
    pub fn errno(&self) -> u32 {
        match self {
            HostError::Io(e) if e.raw_os_error() == Some(28) => nbd::ENOSPC,
            HostError::Io(_) => nbd::EIO,
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

/// How a volume is opened.
#[derive(Debug, Clone)]
pub struct VolumeConfig {
    pub name: String,
    pub data: PathBuf,
    pub size: u64,
    pub state_dir: PathBuf,
    /// Role to take when the state dir is new; an existing meta file wins.
    pub initial_role: Role,
}

/// One volume served by this engine.
pub struct Volume {
    name: String,
    store: BlockStore,
    meta_path: PathBuf,
    meta: Mutex<Meta>,
    pub counters: Counters,
    // Held for the engine's lifetime: a second engine on the same state dir is refused.
    _lock: std::fs::File,
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
                volume: cfg.name.clone(),
                size: cfg.size,
                block_size: BLOCK_SIZE,
                epoch: 1,
                role: cfg.initial_role,
                peer: None,
                applied_seq: 0,
                acked_seq: 0,
                clean_shutdown: true,
                inconsistent: false,
            },
        };
        let store = BlockStore::open_or_create(&cfg.data, cfg.size)?;
        let mut running = meta.clone();
        running.clean_shutdown = false;
        running.store(&meta_path)?;
        Ok(Arc::new(Self {
            name: cfg.name.clone(),
            store,
            meta_path,
            meta: Mutex::new(running),
            counters: Counters::default(),
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

    fn meta(&self) -> MutexGuard<'_, Meta> {
        // A poisoned lock only means another thread panicked mid-update of plain data; keep serving.
        self.meta.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn role(&self) -> Role {
        self.meta().role
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
        true
    }

    /// Whether a plain write completes without waiting for the peer.
    pub fn write_is_quick(&self) -> bool {
        true
    }

    pub async fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, HostError> {
        self.check_serving()?;
        let mut buf = vec![0u8; len as usize];
        self.store.read_at(&mut buf, offset)?;
        self.counters
            .bytes_read
            .fetch_add(u64::from(len), Ordering::Relaxed);
        Ok(buf)
    }

    pub async fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), HostError> {
        self.check_serving()?;
        self.store.write_at(data, offset)?;
        self.counters
            .bytes_written
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        if fua {
            self.flush().await?;
        }
        Ok(())
    }

    pub async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), HostError> {
        self.check_serving()?;
        self.store.punch_hole(offset, len)?;
        if fua {
            self.flush().await?;
        }
        Ok(())
    }

    pub async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        no_hole: bool,
        fua: bool,
    ) -> Result<(), HostError> {
        self.check_serving()?;
        if no_hole {
            self.store.zero_range(offset, len)?;
        } else {
            self.store.punch_hole(offset, len)?;
        }
        self.counters
            .bytes_written
            .fetch_add(len, Ordering::Relaxed);
        if fua {
            self.flush().await?;
        }
        Ok(())
    }

    /// Makes every write completed so far durable.
    pub async fn flush(&self) -> Result<(), HostError> {
        self.store.sync_async().await?;
        self.counters.flushes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Graceful stop: data durable, meta marked clean.
    pub fn shutdown(&self) -> Result<(), OpenError> {
        self.store.sync().map_err(|source| OpenError::StateDir {
            path: self.data_path().to_path_buf(),
            source,
        })?;
        let mut m = self.meta();
        m.clean_shutdown = true;
        m.store(&self.meta_path)?;
        Ok(())
    }
}
