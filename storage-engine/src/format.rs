//! Every on-disk codec of the engine's state dir, in one place. The files and who writes them:
//!
//! | file                       | codec                     | written by                                   |
//! |----------------------------|---------------------------|----------------------------------------------|
//! | `meta`                     | `meta` (framed JSON)      | `Meta::store` (atomic replace)               |
//! | `progress`                 | `progress` (24 bytes)     | `volume::replica` (in place, fdatasync)      |
//! | `peer_last_seq`            | `seq` (decimal text)      | `volume::replica` (atomic replace)           |
//! | `pending_to_peer`, `intent`, `peer_pending`, `overlay_present`, `peer_pending_heartbeat` | framed words (`bitmap`'s header comment) | `bitmap::BitmapFile` / `Bitmap::store` |
//! | `data`, `overlay`          | raw blocks                | `store::BlockStore`                          |
//! | `intent.log`               | records (`repl::intent_log`'s header comment) | `repl::intent_log::IntentLog` (in place, fdatasync) |
//! | `move`                     | `meta` (framed JSON)      | `repl::mover::Mover` (atomic replace)         |
//! | `move_pending`             | framed words (`bitmap`)   | `repl::tracker::Tracker` (checkpoint)        |
//! | `lost/epoch-*-to-*/`       | `manifest.json` (`loss::manifest`), `blocks.img` raw, `unchecked` bitmap | `loss::Losses` |

/// The meta file: { magic "TNDMETA\0" (8) | version u32 LE | body length u32 LE | crc32c(body) u32 LE | body (JSON) }
use std::{fs::File, io, path::Path};

/// fsyncs the directory holding `path`, so a rename or create in it is durable.
pub fn sync_dir(path: &Path) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    File::open(dir)?.sync_all()
}

pub mod meta {
    use serde::{de::DeserializeOwned, Serialize};

    pub const META_MAGIC: &[u8; 8] = b"TNDMETA\0";
    pub const META_VERSION: u32 = 1;
    const HEADER: usize = 20;

    pub fn encode<T: Serialize>(m: &T) -> Vec<u8> {
        // Serializing a plain struct of strings and integers cannot fail.
        let body = serde_json::to_vec(m).unwrap_or_default();
        let mut v = Vec::with_capacity(HEADER + body.len());
        v.extend_from_slice(META_MAGIC);
        v.extend_from_slice(&META_VERSION.to_le_bytes());
        v.extend_from_slice(&(body.len() as u32).to_le_bytes());
        v.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
        v.extend_from_slice(&body);
        v
    }

    #[derive(Debug)]
    pub enum DecodeError {
        Version(u32),
        Corrupt(String),
    }

    pub fn decode<T: DeserializeOwned>(b: &[u8]) -> Result<T, DecodeError> {
        if b.len() < HEADER || &b[0..8] != META_MAGIC {
            return Err(DecodeError::Corrupt("bad magic".into()));
        }
        let le = |r: std::ops::Range<usize>| {
            let mut a = [0u8; 4];
            a.copy_from_slice(&b[r]);
            u32::from_le_bytes(a)
        };
        let version = le(8..12);
        if version != META_VERSION {
            return Err(DecodeError::Version(version));
        }
        let len = le(12..16) as usize;
        let crc = le(16..20);
        let body = b
            .get(HEADER..HEADER + len)
            .ok_or_else(|| DecodeError::Corrupt("truncated body".into()))?;
        if crc32c::crc32c(body) != crc {
            return Err(DecodeError::Corrupt("checksum mismatch".into()));
        }
        serde_json::from_slice(body).map_err(|e| DecodeError::Corrupt(e.to_string()))
    }
}

/// The progress file: { magic "TNDPROG\0" | applied_seq u64 LE | flags u32 LE | crc32c u32 LE },
/// rewritten in place (24 bytes: one sector, never torn). Flags: bit 0 inconsistent, bit 1 needs
/// a full copy.
pub mod progress {
    use std::{io, path::Path};

    use crate::state::Standing;

    /// What the progress file says.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Progress {
        pub applied_seq: u64,
        pub standing: Standing,
    }

    const PROGRESS_MAGIC: &[u8; 8] = b"TNDPROG\0";

    pub fn encode(p: Progress) -> [u8; 24] {
        let mut b = [0u8; 24];
        b[0..8].copy_from_slice(PROGRESS_MAGIC);
        b[8..16].copy_from_slice(&p.applied_seq.to_le_bytes());
        let (inconsistent, needs_full) = match p.standing {
            Standing::Consistent => (false, false),
            Standing::Inconsistent => (true, false),
            Standing::NeedsFull => (true, true),
        };
        let flags = u32::from(inconsistent) | (u32::from(needs_full) << 1);
        b[16..20].copy_from_slice(&flags.to_le_bytes());
        let crc = crc32c::crc32c(&b[0..20]);
        b[20..24].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// `None` when it was never written. A damaged one is an error at open: guessing could open a
    /// replica whose resync was cut short as consistent.
    pub fn read(path: &Path) -> io::Result<Option<Progress>> {
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
        let standing = match (flags & 1 != 0, flags & 2 != 0) {
            (_, true) => Standing::NeedsFull,
            (true, false) => Standing::Inconsistent,
            (false, false) => Standing::Consistent,
        };
        Ok(Some(Progress {
            applied_seq: u64::from_le_bytes(seq),
            standing,
        }))
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn every_standing_round_trips_and_damage_is_an_error() {
            let d = tempfile::tempdir().unwrap();
            let p = d.path().join("progress");
            assert_eq!(read(&p).unwrap(), None);
            for standing in [
                Standing::Consistent,
                Standing::Inconsistent,
                Standing::NeedsFull,
            ] {
                let want = Progress {
                    applied_seq: 77,
                    standing,
                };
                std::fs::write(&p, encode(want)).unwrap();
                assert_eq!(read(&p).unwrap(), Some(want));
            }
            let mut b = encode(Progress {
                applied_seq: 1,
                standing: Standing::Consistent,
            });
            b[9] ^= 1;
            std::fs::write(&p, b).unwrap();
            assert!(read(&p).is_err());
        }
    }
}

/// A sequence number in a file of its own (`peer_last_seq`): decimal text.
pub mod seq {
    use std::{io, path::Path};

    /// The stored number; 0 when the file does not exist. One that does not parse is an error,
    /// never silently zero.
    pub fn read(path: &Path) -> io::Result<u64> {
        match std::fs::read_to_string(path) {
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

    /// Replaces the file durably (temp, fsync, rename, fsync of the directory).
    pub fn store(path: &Path, seq: u64) -> io::Result<()> {
        let tmp = path.with_extension("tmp");
        crate::seam::power::io(&tmp)?;
        std::fs::write(&tmp, seq.to_string())?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, path)?;
        super::sync_dir(path)
    }
}
