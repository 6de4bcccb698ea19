//! The write-intent log (`intent.log`): the extents made hot since the `intent` bitmap was last
//! stored, one record each, appended and fdatasync'd before the write that made them hot reaches
//! the data file. The durable intent set is the bitmap plus the log.
//!
//! Why a log: rewriting the whole bitmap for each cold extent (temp file, fsync, rename, directory
//! fsync, and a walk of every hot extent) made a scattered backlog cost O(n) per write: 65,536
//! writes spread over 4 TiB took 155 s (docs/benchmarks.md). An append is 12 bytes and one
//! fdatasync. The checkpoint stores the bitmap and empties the log when extents cool, and when the
//! log grows past `COMPACT_RECORDS`.
//!
//! Group commit: `write` puts records in the file under the tracker's lock and answers a `Ticket`;
//! the fdatasync that makes them durable runs outside that lock (`Tracker::intent_durable`), one at
//! a time, and covers every record written before it began, so writers to cold extents on several
//! connections share one. The log keeps which extents are written but not yet synced: a write that
//! finds its extent hot but unsynced waits for the same sync before its data write.
//!
//! Format: header { "TNDILOG\0", version u32 = 1, 0 u32 }, then records { extent u64 LE,
//! crc32c(extent) u32 LE }. Reading stops at the first record whose checksum fails (a torn
//! append: its write never reached the data file, the append being synced first). A file shorter
//! than its header is a creation cut short (no record was relied on) and reads as empty.

use std::{
    fs::{File, OpenOptions},
    io,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
};

const MAGIC: &[u8; 8] = b"TNDILOG\0";
const VERSION: u32 = 1;
const HEADER: u64 = 16;
const RECORD: u64 = 12;
/// Records past which the checkpoint folds the log into the bitmap (48 KiB of log).
pub const COMPACT_RECORDS: u64 = 4096;

pub struct IntentLog {
    path: PathBuf,
    /// Open once its header is durable.
    file: Option<File>,
    /// End of the valid records: the next append goes here.
    len: u64,
    /// End of the records the last fdatasync of this generation covered.
    synced: u64,
    /// Extents written past `synced`, with the end of their record: what a sync still owes.
    unsynced: Vec<(u64, u64)>,
    /// Bumped when the records written so far stop counting: by `clear` (a stored bitmap covers
    /// them) and by a failed sync (nothing covers them). A ticket of an older generation is durable
    /// unless that generation failed.
    gen: u64,
    /// Generations whose sync failed (rare: an I/O error); their tickets are refused.
    failed: Vec<u64>,
    /// Unit tests' power loss: the length the last fdatasync covered.
    #[cfg(test)]
    synced_len: u64,
}

/// A write's claim on the log: durable once a sync covered `upto` in generation `gen`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ticket {
    gen: u64,
    upto: u64,
}

/// How a ticket stands (`IntentLog::stands`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    Durable,
    /// Its records were lost to a failed sync: the write must not reach the data file.
    Failed,
    /// A sync has yet to cover it.
    Owed,
}

fn record(extent: u64) -> [u8; RECORD as usize] {
    let e = extent.to_le_bytes();
    let mut r = [0u8; RECORD as usize];
    r[..8].copy_from_slice(&e);
    r[8..].copy_from_slice(&crc32c::crc32c(&e).to_le_bytes());
    r
}

impl IntentLog {
    /// Opens the log at `path` and answers the extents it holds (none if it is absent). An extent
    /// at or past `extents` (the volume never shrinks) or a bad header is an error, never
    /// silently dropped.
    pub fn open(path: &Path, extents: u64) -> io::Result<(Self, Vec<u64>)> {
        let bad = |why: String| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {why}", path.display()),
            )
        };
        let raw = match std::fs::read(path) {
            Ok(r) => r,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e),
        };
        let mut log = Self {
            path: path.to_path_buf(),
            file: None,
            len: 0,
            synced: 0,
            unsynced: Vec::new(),
            gen: 0,
            failed: Vec::new(),
            #[cfg(test)]
            synced_len: 0,
        };
        if (raw.len() as u64) < HEADER {
            return Ok((log, Vec::new()));
        }
        if &raw[..8] != MAGIC || raw[8..12] != VERSION.to_le_bytes() {
            return Err(bad("bad magic or version".into()));
        }
        let mut logged = Vec::new();
        let mut end = HEADER;
        for r in raw[HEADER as usize..].chunks_exact(RECORD as usize) {
            let mut e = [0u8; 8];
            e.copy_from_slice(&r[..8]);
            if crc32c::crc32c(&e).to_le_bytes() != r[8..] {
                break;
            }
            let e = u64::from_le_bytes(e);
            if e >= extents {
                return Err(bad(format!(
                    "extent {e} is past the volume's {extents} extents"
                )));
            }
            logged.push(e);
            end += RECORD;
        }
        log.file = Some(OpenOptions::new().read(true).write(true).open(path)?);
        log.len = end;
        log.synced = end;
        #[cfg(test)]
        {
            log.synced_len = raw.len() as u64;
        }
        Ok((log, logged))
    }

    /// Records appended since the last `clear`.
    pub fn records(&self) -> u64 {
        self.len.saturating_sub(HEADER) / RECORD
    }

    /// The file with a durable header (created, fsync'd, its directory fsync'd, on first use).
    fn file(&mut self) -> io::Result<&File> {
        if self.file.is_none() {
            crate::seam::power::io(&self.path)?;
            let f = File::create(&self.path)?;
            let mut h = [0u8; HEADER as usize];
            h[..8].copy_from_slice(MAGIC);
            h[8..12].copy_from_slice(&VERSION.to_le_bytes());
            crate::seam::power::io(&self.path)?;
            f.write_all_at(&h, 0)?;
            crate::seam::power::io(&self.path)?;
            f.sync_all()?;
            crate::seam::power::io(&self.path)?;
            crate::format::sync_dir(&self.path)?;
            self.len = HEADER;
            self.synced = HEADER;
            #[cfg(test)]
            {
                self.synced_len = HEADER;
            }
            self.file = Some(f);
        }
        match &self.file {
            Some(f) => Ok(f),
            None => Err(io::Error::other("intent log not open")),
        }
    }

    /// Writes records for `extents` (not synced): durable once a sync covers the ticket. On an
    /// error nothing counts as written: the next write goes over the same place.
    pub fn write(&mut self, extents: &[u64]) -> io::Result<Ticket> {
        let buf: Vec<u8> = extents.iter().flat_map(|&e| record(e)).collect();
        let path = self.path.clone();
        self.file()?;
        let at = self.len;
        let f = self.file()?;
        crate::seam::power::io(&path)?;
        f.write_all_at(&buf, at)?;
        self.len = at + buf.len() as u64;
        self.unsynced.extend(extents.iter().map(|&e| (e, self.len)));
        Ok(Ticket {
            gen: self.gen,
            upto: self.len,
        })
    }

    /// The ticket a write to `extent` must wait for, if its record is written but not yet synced.
    pub fn owed_for(&self, extent: u64) -> Option<Ticket> {
        self.unsynced
            .iter()
            .find(|&&(e, _)| e == extent)
            .map(|&(_, upto)| Ticket {
                gen: self.gen,
                upto,
            })
    }

    pub fn stands(&self, t: Ticket) -> Standing {
        if t.gen == self.gen {
            if self.synced >= t.upto {
                Standing::Durable
            } else {
                Standing::Owed
            }
        } else if self.failed.contains(&t.gen) {
            Standing::Failed
        } else {
            Standing::Durable
        }
    }

    /// What a sync started now would cover: a handle on the file, its path (the power seam's
    /// key), and the ticket it settles.
    pub fn sync_start(&self) -> io::Result<(File, PathBuf, Ticket)> {
        let f = match &self.file {
            Some(f) => f.try_clone()?,
            None => return Err(io::Error::other("intent log not open")),
        };
        Ok((
            f,
            self.path.clone(),
            Ticket {
                gen: self.gen,
                upto: self.len,
            },
        ))
    }

    /// Records how the sync begun by `sync_start` (answering `t`) ended. On success the records
    /// up to `t` are durable; on failure every unsynced record of the generation is void: the
    /// extents are answered so the caller unmarks them (their writes never reach the data file),
    /// and the next write goes over them. Nothing to do if the generation moved on meanwhile.
    pub fn sync_done(&mut self, t: Ticket, ok: bool) -> Vec<u64> {
        if t.gen != self.gen {
            return Vec::new();
        }
        if ok {
            self.synced = self.synced.max(t.upto);
            self.unsynced.retain(|&(_, upto)| upto > t.upto);
            #[cfg(test)]
            {
                self.synced_len = self.synced_len.max(t.upto);
            }
            return Vec::new();
        }
        self.failed.push(self.gen);
        self.gen += 1;
        self.len = self.synced;
        std::mem::take(&mut self.unsynced)
            .into_iter()
            .map(|(e, _)| e)
            .collect()
    }

    /// Appends `extents` durably (write, then fdatasync, in one call: tests and tools).
    #[cfg(test)]
    pub fn append(&mut self, extents: &[u64]) -> io::Result<()> {
        let t = self.write(extents)?;
        let (f, path, t2) = self.sync_start()?;
        let ok = crate::seam::power::io(&path).is_ok() && f.sync_data().is_ok();
        self.sync_done(t2, ok);
        match self.stands(t) {
            Standing::Durable => Ok(()),
            _ => Err(io::Error::other("intent log sync failed")),
        }
    }

    /// Empties the log: only after a stored bitmap covers every extent still hot (the unsynced
    /// ones included: their tickets count as durable from here). Not synced: a cut before the
    /// next append's fdatasync leaves the old records, a superset.
    pub fn clear(&mut self) -> io::Result<()> {
        let Some(f) = &self.file else {
            return Ok(());
        };
        crate::seam::power::io(&self.path)?;
        f.set_len(HEADER)?;
        self.len = HEADER;
        self.synced = HEADER;
        self.unsynced.clear();
        self.gen += 1;
        Ok(())
    }

    /// Unit tests' power loss: what no fdatasync covered is gone.
    #[cfg(test)]
    pub fn lose_unsynced(&self) {
        if let Some(f) = &self.file {
            let _ = f.set_len(self.synced_len.max(HEADER));
        }
    }
}

/// The durable intent set in a state dir, as a restart reads it (tests). A corrupt bitmap or log
/// fails the test: a restart would refuse it too, and reading it as empty could hide a bad store.
#[cfg(test)]
pub fn durable_extents(state_dir: &Path, extents: u64) -> crate::bitmap::Bitmap {
    let mut set = crate::bitmap::Bitmap::load(&state_dir.join("intent"), extents)
        .unwrap_or_else(|e| panic!("the stored intent bitmap does not load: {e}"))
        .unwrap_or_else(|| crate::bitmap::Bitmap::new(extents));
    let (_, logged) = IntentLog::open(&state_dir.join("intent.log"), extents)
        .unwrap_or_else(|e| panic!("the intent log does not open: {e}"));
    for e in logged {
        set.set(e);
    }
    set
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appended_extents_are_read_back_and_a_torn_tail_is_dropped() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("intent.log");
        let (mut log, none) = IntentLog::open(&p, 100).unwrap();
        assert!(none.is_empty());
        log.append(&[3, 7]).unwrap();
        log.append(&[99]).unwrap();
        assert_eq!(log.records(), 3);
        // A torn append: half a record, then a record with a bad checksum.
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(&record(5)[..6], HEADER + 3 * RECORD)
            .unwrap();
        let (mut log, logged) = IntentLog::open(&p, 100).unwrap();
        assert_eq!(logged, vec![3, 7, 99]);
        let mut bad = record(6);
        bad[11] ^= 1;
        f.write_all_at(&bad, HEADER + 3 * RECORD).unwrap();
        assert_eq!(IntentLog::open(&p, 100).unwrap().1, vec![3, 7, 99]);
        // The next append writes over the torn place.
        log.append(&[8]).unwrap();
        assert_eq!(IntentLog::open(&p, 100).unwrap().1, vec![3, 7, 99, 8]);
        log.clear().unwrap();
        assert!(IntentLog::open(&p, 100).unwrap().1.is_empty());
        log.append(&[1]).unwrap();
        assert_eq!(IntentLog::open(&p, 100).unwrap().1, vec![1]);
    }

    #[test]
    fn a_bad_header_or_an_extent_past_the_volume_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("intent.log");
        let (mut log, _) = IntentLog::open(&p, 100).unwrap();
        log.append(&[42]).unwrap();
        let e = IntentLog::open(&p, 40).err().unwrap().to_string();
        assert!(e.contains("past the volume"), "{e}");
        let mut raw = std::fs::read(&p).unwrap();
        raw[0] ^= 1;
        std::fs::write(&p, &raw).unwrap();
        let e = IntentLog::open(&p, 100).err().unwrap().to_string();
        assert!(e.contains("bad magic"), "{e}");
        // Shorter than a header: a creation cut short, nothing logged.
        std::fs::write(&p, &raw[..5]).unwrap();
        assert!(IntentLog::open(&p, 100).unwrap().1.is_empty());
    }
}
