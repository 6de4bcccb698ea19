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
//! Written in place: the file is allocated and zero-filled once (`CAPACITY`, doubled when a log
//! outgrows it), so an append changes no file size and no block map, and its fdatasync writes one
//! page and flushes the device without a filesystem journal commit (on ext4 data=ordered such a
//! commit first writes back every newly allocated dirty block of every file: the data files'
//! scattered writes). Emptying the log rewrites the header with a new salt instead of truncating.
//!
//! Format (version 2): header { "TNDILOG\0", version u32 = 2, salt u32 }, then records
//! { extent u64 LE, crc32c(salt LE ++ extent LE) u32 LE }, then zeros. Reading stops at the first
//! record whose checksum fails: a torn append (its write never reached the data file, the append
//! being synced first), the zeros past the end, or a record of an older salt (emptied: a stored
//! bitmap covers it). A file shorter than its header is a creation cut short (no record was relied
//! on) and reads as empty. Version 1 (the same records checksummed without a salt, appended, the
//! file truncated to empty it) is read and rewritten as version 2 at open.

use std::{
    fs::{File, OpenOptions},
    io,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    sync::Arc,
};

const MAGIC: &[u8; 8] = b"TNDILOG\0";
const VERSION: u32 = 2;
const HEADER: u64 = 16;
const RECORD: u64 = 12;
/// The zero-filled size a new log starts with: the header and 5,460 records (the checkpoint folds
/// the log at `COMPACT_RECORDS`).
const CAPACITY: u64 = 64 << 10;
/// Records past which the checkpoint folds the log into the bitmap (48 KiB of log).
pub const COMPACT_RECORDS: u64 = 4096;

pub struct IntentLog {
    path: PathBuf,
    /// Open once its header is durable.
    file: Option<Arc<File>>,
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
    /// Checksum salt of the records that count; a new one empties the log (`clear`).
    salt: u32,
    /// Bytes allocated and zero-filled (the file's length).
    cap: u64,
    /// Unit tests' power loss: the file as the last fdatasync left it, and the image a sync in
    /// progress will leave (taken when it starts, so a record written during it is not counted).
    #[cfg(test)]
    images: std::sync::Mutex<Images>,
}

#[cfg(test)]
#[derive(Default)]
struct Images {
    durable: Vec<u8>,
    syncing: Option<(Ticket, Vec<u8>)>,
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

/// A record's checksum; version 1 had no salt.
fn checksum(salt: Option<u32>, extent: [u8; 8]) -> [u8; 4] {
    match salt {
        Some(salt) => crc32c::crc32c_append(crc32c::crc32c(&salt.to_le_bytes()), &extent),
        None => crc32c::crc32c(&extent),
    }
    .to_le_bytes()
}

fn record(salt: u32, extent: u64) -> [u8; RECORD as usize] {
    let e = extent.to_le_bytes();
    let mut r = [0u8; RECORD as usize];
    r[..8].copy_from_slice(&e);
    r[8..].copy_from_slice(&checksum(Some(salt), e));
    r
}

/// The salt after `salt`, skipping any under which the zeros past the end would read as a
/// record (extent 0 with a zero checksum).
fn next_salt(salt: u32) -> u32 {
    let mut s = salt.wrapping_add(1);
    while checksum(Some(s), [0; 8]) == [0; 4] {
        s = s.wrapping_add(1);
    }
    s
}

fn header(salt: u32) -> [u8; HEADER as usize] {
    let mut h = [0u8; HEADER as usize];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[12..].copy_from_slice(&salt.to_le_bytes());
    h
}

/// A log file of `cap` bytes holding `extents` under `salt`, the rest zeros.
fn image(salt: u32, extents: &[u64], cap: u64) -> Vec<u8> {
    let mut img = header(salt).to_vec();
    img.extend(extents.iter().flat_map(|&e| record(salt, e)));
    let len = (img.len() as u64).max(cap);
    img.resize(usize::try_from(len).unwrap_or(usize::MAX), 0);
    img
}

impl IntentLog {
    /// Opens the log at `path` and answers the extents it holds (none if it is absent). An extent
    /// at or past `extents` (the volume never shrinks) or a bad header is an error, never
    /// silently dropped. A version 1 log is rewritten as version 2 (durably) before it is used.
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
            salt: 0,
            cap: 0,
            #[cfg(test)]
            images: Default::default(),
        };
        if (raw.len() as u64) < HEADER {
            return Ok((log, Vec::new()));
        }
        let version = u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]);
        if &raw[..8] != MAGIC || !(version == 1 || version == VERSION) {
            return Err(bad("bad magic or version".into()));
        }
        let salt =
            (version == VERSION).then(|| u32::from_le_bytes([raw[12], raw[13], raw[14], raw[15]]));
        let mut logged = Vec::new();
        for r in raw[HEADER as usize..].chunks_exact(RECORD as usize) {
            let mut e = [0u8; 8];
            e.copy_from_slice(&r[..8]);
            if checksum(salt, e) != r[8..] {
                break;
            }
            let e = u64::from_le_bytes(e);
            if e >= extents {
                return Err(bad(format!(
                    "extent {e} is past the volume's {extents} extents"
                )));
            }
            logged.push(e);
        }
        log.salt = match salt {
            Some(s) => s,
            None => {
                // Version 1: the same extents in a new file, stored whole before it replaces
                // the old one (a cut leaves one or the other).
                let salt = next_salt(0);
                let img = image(salt, &logged, CAPACITY);
                let tmp = path.with_extension("log.tmp");
                crate::seam::power::io(&tmp)?;
                std::fs::write(&tmp, &img)?;
                File::open(&tmp)?.sync_all()?;
                std::fs::rename(&tmp, path)?;
                crate::format::sync_dir(path)?;
                salt
            }
        };
        log.file = Some(Arc::new(
            OpenOptions::new().read(true).write(true).open(path)?,
        ));
        log.len = HEADER + RECORD * logged.len() as u64;
        log.synced = log.len;
        log.cap = match salt {
            Some(_) => raw.len() as u64,
            None => CAPACITY.max(log.len),
        };
        #[cfg(test)]
        {
            log.images_mut().durable = std::fs::read(path)?;
        }
        Ok((log, logged))
    }

    /// Records appended since the last `clear`.
    pub fn records(&self) -> u64 {
        self.len.saturating_sub(HEADER) / RECORD
    }

    /// The file with a durable header and zeros after it (created, fsync'd, its directory
    /// fsync'd, on first use).
    fn file(&mut self) -> io::Result<&File> {
        if self.file.is_none() {
            let salt = next_salt(self.salt);
            let img = image(salt, &[], CAPACITY);
            crate::seam::power::io(&self.path)?;
            let f = File::create(&self.path)?;
            crate::seam::power::io(&self.path)?;
            f.write_all_at(&img, 0)?;
            crate::seam::power::io(&self.path)?;
            f.sync_all()?;
            crate::seam::power::io(&self.path)?;
            crate::format::sync_dir(&self.path)?;
            self.salt = salt;
            self.cap = img.len() as u64;
            self.len = HEADER;
            self.synced = HEADER;
            #[cfg(test)]
            {
                self.images_mut().durable = img;
            }
            self.file = Some(Arc::new(f));
        }
        match &self.file {
            Some(f) => Ok(f),
            None => Err(io::Error::other("intent log not open")),
        }
    }

    /// Writes records for `extents` (not synced): durable once a sync covers the ticket. On an
    /// error nothing counts as written: the next write goes over the same place. A log that
    /// outgrows the file doubles it with zeros in the same write (that one sync also commits the
    /// new size).
    pub fn write(&mut self, extents: &[u64]) -> io::Result<Ticket> {
        self.file()?;
        let at = self.len;
        let mut buf: Vec<u8> = extents.iter().flat_map(|&e| record(self.salt, e)).collect();
        let end = at + buf.len() as u64;
        let mut cap = self.cap;
        if end > cap {
            cap = (cap * 2).max(end);
            buf.resize(buf.len() + (cap - end) as usize, 0);
        }
        let Some(f) = &self.file else {
            return Err(io::Error::other("intent log not open"));
        };
        crate::seam::power::io(&self.path)?;
        f.write_all_at(&buf, at)?;
        self.cap = cap;
        self.len = end;
        self.unsynced.extend(extents.iter().map(|&e| (e, end)));
        Ok(Ticket {
            gen: self.gen,
            upto: end,
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
    pub fn sync_start(&self) -> io::Result<(Arc<File>, PathBuf, Ticket)> {
        let f = match &self.file {
            Some(f) => Arc::clone(f),
            None => return Err(io::Error::other("intent log not open")),
        };
        let t = Ticket {
            gen: self.gen,
            upto: self.len,
        };
        #[cfg(test)]
        {
            self.images_mut().syncing = Some((t, std::fs::read(&self.path)?));
        }
        Ok((f, self.path.clone(), t))
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
                let mut i = self.images_mut();
                if let Some((_, img)) = i.syncing.take().filter(|(st, _)| *st == t) {
                    i.durable = img;
                }
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
    /// ones included: their tickets count as durable from here). A new salt in the header voids
    /// every record; nothing is truncated, so the file keeps its blocks. Not synced: a cut before
    /// the next append's fdatasync leaves the old header and records, a superset; a header that
    /// reached the disk without the records after it reads as an empty log, which the stored
    /// bitmap covers.
    pub fn clear(&mut self) -> io::Result<()> {
        let Some(f) = &self.file else {
            return Ok(());
        };
        let salt = next_salt(self.salt);
        let written =
            crate::seam::power::io(&self.path).and_then(|()| f.write_all_at(&header(salt), 0));
        if written.is_err() {
            // Which header the file holds is unknown: the next write makes the log anew (the
            // stored bitmap covers every extent either way).
            self.file = None;
        }
        self.salt = salt;
        self.len = HEADER;
        self.synced = HEADER;
        self.unsynced.clear();
        self.gen += 1;
        written
    }

    /// Unit tests' power loss: what no fdatasync covered is gone (the file reads as the last
    /// sync left it).
    #[cfg(test)]
    pub fn lose_unsynced(&self) {
        if let Some(f) = &self.file {
            let img = self.images_mut().durable.clone();
            let _ = f.write_all_at(&img, 0);
            let _ = f.set_len(img.len() as u64);
        }
    }

    #[cfg(test)]
    fn images_mut(&self) -> std::sync::MutexGuard<'_, Images> {
        self.images.lock().unwrap_or_else(|p| p.into_inner())
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
        f.write_all_at(&record(log.salt, 5)[..6], HEADER + 3 * RECORD)
            .unwrap();
        let (mut log, logged) = IntentLog::open(&p, 100).unwrap();
        assert_eq!(logged, vec![3, 7, 99]);
        let mut bad = record(log.salt, 6);
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

    #[test]
    fn the_log_is_written_in_place_and_emptying_it_keeps_its_blocks() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("intent.log");
        let len = || std::fs::metadata(&p).unwrap().len();
        let (mut log, _) = IntentLog::open(&p, 1000).unwrap();
        log.append(&[1, 2, 3]).unwrap();
        assert_eq!(len(), CAPACITY, "created at its capacity");
        log.append(&[4]).unwrap();
        assert_eq!(len(), CAPACITY, "an append changes no size");
        log.clear().unwrap();
        assert_eq!(len(), CAPACITY, "emptying truncates nothing");
        assert!(IntentLog::open(&p, 1000).unwrap().1.is_empty());
        // The new salt's first record lands on the old ones: only it counts.
        log.append(&[9]).unwrap();
        assert_eq!(IntentLog::open(&p, 1000).unwrap().1, vec![9]);
        assert_eq!(len(), CAPACITY);
    }

    #[test]
    fn a_log_that_outgrows_its_file_doubles_it() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("intent.log");
        let (mut log, _) = IntentLog::open(&p, 1 << 20).unwrap();
        let n = (CAPACITY - HEADER) / RECORD + 1;
        let extents: Vec<u64> = (0..n).collect();
        log.append(&extents[..10]).unwrap();
        log.append(&extents[10..]).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 2 * CAPACITY);
        let (mut log, logged) = IntentLog::open(&p, 1 << 20).unwrap();
        assert_eq!(logged, extents);
        log.append(&[n]).unwrap();
        assert_eq!(IntentLog::open(&p, 1 << 20).unwrap().1.len() as u64, n + 1);
    }

    #[test]
    fn a_version_1_log_is_read_and_rewritten_as_version_2() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("intent.log");
        let mut v1 = MAGIC.to_vec();
        v1.extend(1u32.to_le_bytes());
        v1.extend(0u32.to_le_bytes());
        for e in [5u64, 17] {
            v1.extend(e.to_le_bytes());
            v1.extend(checksum(None, e.to_le_bytes()));
        }
        v1.extend([1, 2, 3]); // a torn append
        std::fs::write(&p, &v1).unwrap();
        let (mut log, logged) = IntentLog::open(&p, 100).unwrap();
        assert_eq!(logged, vec![5, 17]);
        let raw = std::fs::read(&p).unwrap();
        assert_eq!(raw[8..12], VERSION.to_le_bytes());
        assert_eq!(raw.len() as u64, CAPACITY);
        log.append(&[42]).unwrap();
        assert_eq!(IntentLog::open(&p, 100).unwrap().1, vec![5, 17, 42]);
    }

    #[test]
    fn a_power_cut_keeps_what_a_sync_covered_and_an_unsynced_clear_leaves_a_superset() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("intent.log");
        let (mut log, _) = IntentLog::open(&p, 100).unwrap();
        log.append(&[1, 2]).unwrap();
        log.write(&[3]).unwrap();
        log.lose_unsynced();
        assert_eq!(IntentLog::open(&p, 100).unwrap().1, vec![1, 2]);
        // Emptied and written again, nothing synced: the cut brings the old records back.
        let (mut log, _) = IntentLog::open(&p, 100).unwrap();
        log.clear().unwrap();
        log.write(&[7]).unwrap();
        log.lose_unsynced();
        assert_eq!(IntentLog::open(&p, 100).unwrap().1, vec![1, 2]);
        // The new header alone on disk: an empty log (the stored bitmap covers the old extents).
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(&header(next_salt(log.salt)), 0).unwrap();
        assert!(IntentLog::open(&p, 100).unwrap().1.is_empty());
    }
}
