//! The `meta` file: who this engine is for its volume (epoch, role, peer, sequence numbers).
//! Replaced atomically (write temp, fsync, rename, fsync dir), so a crash leaves the old or the new copy.
//!
//! The file's framing is in `format::meta`.

use std::{
    fs::{self, File},
    io::{self, Write},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::format::meta::{decode, encode, DecodeError, META_VERSION};
pub use crate::format::sync_dir;
pub use crate::state::{Phase, Role};

/// Durable identity and progress of one engine for its volume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Meta {
    pub volume: String,
    pub size: u64,
    pub block_size: u32,
    pub epoch: u64,
    pub role: Role,
    /// The peer engine's gRPC address, when paired.
    #[serde(default)]
    pub peer: Option<String>,
    /// Highest sequence the peer acknowledged (primary side).
    #[serde(default)]
    pub acked_seq: u64,
    /// True only after a graceful shutdown; cleared at start. False at start means a crash.
    #[serde(default)]
    pub clean_shutdown: bool,
    /// Where a takeover stands on this engine (absent in files written before takeovers existed).
    #[serde(default)]
    pub takeover: TakeoverMeta,
    /// The machine's boot the engine last opened the volume in: a restart in the same boot found
    /// the page cache intact (a process crash), one in another boot may have lost every unsynced
    /// write (a power loss or a machine crash).
    #[serde(default)]
    pub boot_id: String,
    /// Every size the volume had before it grew, oldest first: a bitmap file stored at one of
    /// them loads grown (`Bitmap::load_grown`); any other size is refused as before.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub grown_from: Vec<u64>,
}

/// This machine's boot, as the kernel names it (empty where it does not).
pub fn current_boot_id(state_dir: &Path) -> String {
    #[cfg(test)]
    if let Ok(b) = fs::read_to_string(state_dir.join("test-boot-id")) {
        // Unit tests' reboot: a power-loss test names a new boot for its state dir.
        return b.trim().to_string();
    }
    let _ = state_dir;
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|b| b.trim().to_string())
        .unwrap_or_default()
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TakeoverMeta {
    #[serde(default)]
    pub phase: Phase,
    /// Reverse replication has not reached Synced since the takeover.
    #[serde(default)]
    pub reversing: bool,
    /// A forced promotion: blocks and sequence range whose newest content stayed on the lost peer.
    #[serde(default)]
    pub lost_blocks: u64,
    #[serde(default)]
    pub lost_seq_from: u64,
    #[serde(default)]
    pub lost_seq_to: u64,
    /// This engine serves by a forced promotion: `lost_blocks` is what it knew of at the time, and
    /// grows to the returning old primary's unsent set when that one steps down.
    #[serde(default)]
    pub forced: bool,
    /// `lost_blocks` is the returning old primary's exact count (it compared its table with this
    /// engine's copies, `crate::loss`); no later estimate replaces it.
    #[serde(default)]
    pub lost_exact: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("meta file {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("meta file {path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("meta file {path} has version {version}, this engine reads version {META_VERSION}")]
    Version { path: PathBuf, version: u32 },
}

impl Meta {
    /// Reads the meta file; `Ok(None)` if it does not exist.
    pub fn load(path: &Path) -> Result<Option<Meta>, MetaError> {
        let bytes = match fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(MetaError::Io {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        decode(&bytes).map(Some).map_err(|e| match e {
            DecodeError::Version(version) => MetaError::Version {
                path: path.to_path_buf(),
                version,
            },
            DecodeError::Corrupt(reason) => MetaError::Corrupt {
                path: path.to_path_buf(),
                reason,
            },
        })
    }

    /// Replaces the meta file atomically and durably.
    pub fn store(&self, path: &Path) -> Result<(), MetaError> {
        let io_err = |source| MetaError::Io {
            path: path.to_path_buf(),
            source,
        };
        crate::seam::power::io(path).map_err(io_err)?;
        let tmp = path.with_extension("tmp");
        let mut f = File::create(&tmp).map_err(io_err)?;
        f.write_all(&encode(self)).map_err(io_err)?;
        f.sync_all().map_err(io_err)?;
        drop(f);
        fs::rename(&tmp, path).map_err(io_err)?;
        sync_dir(path).map_err(io_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Meta {
        Meta {
            volume: "v1".into(),
            size: 1 << 30,
            block_size: 4096,
            epoch: 7,
            role: Role::Secondary,
            peer: Some("127.0.0.1:9500".into()),
            acked_seq: 0,
            clean_shutdown: false,
            takeover: TakeoverMeta::default(),
            boot_id: String::new(),
            grown_from: vec![1 << 29],
        }
    }

    #[test]
    fn roundtrip_and_atomic_replace() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("meta");
        assert!(Meta::load(&p).unwrap().is_none());
        let mut m = sample();
        m.store(&p).unwrap();
        assert_eq!(Meta::load(&p).unwrap(), Some(m.clone()));
        m.epoch = 8;
        m.store(&p).unwrap();
        assert_eq!(Meta::load(&p).unwrap().unwrap().epoch, 8);
        assert!(!p.with_extension("tmp").exists());
    }

    #[test]
    fn detects_corruption_and_version() {
        let mut b = encode(&sample());
        let last = b.len() - 2;
        b[last] ^= 0x40;
        assert!(matches!(decode::<Meta>(&b), Err(DecodeError::Corrupt(_))));
        let mut b = encode(&sample());
        b[8] = 9;
        assert!(matches!(decode::<Meta>(&b), Err(DecodeError::Version(9))));
        assert!(matches!(
            decode::<Meta>(&b[..10]),
            Err(DecodeError::Corrupt(_))
        ));
    }
}
