//! A snapshot's copy-on-write area (`snapshots/<id>.cow`): the old content of each block of the
//! data file, saved the first time that block is overwritten after the snapshot was taken.
//!
//! File: a 32-byte header { magic "TNDCOWAR" | version u32 | block size u32 | blocks u64 |
//! crc32c(first 24 bytes) u32 | 0 u32 }, then records appended in order, each a 32-byte header
//! { magic "TNDCOWRC" | block u64 | kind u32 (1 data, 2 zeros) | crc32c(data) u32 |
//! crc32c(first 28 bytes) u32 } followed, for kind 1, by the block's old bytes.
//!
//! Durability: a batch of records is fdatasync'd before `preserve` returns, and the data file is
//! written only after it returns, so a record the data file depends on is always whole. A torn
//! tail (records appended but never synced before a power cut) belongs to blocks whose data-file
//! write never started: it is cut off at open.

use std::{
    collections::HashMap,
    fs::{File, OpenOptions},
    io,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    sync::{RwLock, RwLockReadGuard, RwLockWriteGuard},
};

const FILE_MAGIC: &[u8; 8] = b"TNDCOWAR";
const REC_MAGIC: &[u8; 8] = b"TNDCOWRC";
const VERSION: u32 = 1;
pub const HEADER: u64 = 32;
const KIND_DATA: u32 = 1;
const KIND_ZERO: u32 = 2;
/// Blocks read from the data file per pass while preserving a large range.
const RUN: u64 = 256;

/// Where the snapshot's copy of a preserved block is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Loc {
    Zero,
    /// Offset of the block's bytes in the area file.
    At(u64),
}

#[derive(Debug)]
struct Inner {
    file: File,
    /// End of the last synced record: everything before it is durable.
    end: u64,
    map: HashMap<u64, Loc>,
    /// Set when a write or sync of the area failed, or the snapshot was deleted.
    failed: Option<String>,
    /// The snapshot was deleted: reads fail too (what is saved stays readable after a failure).
    retired: bool,
}

/// One snapshot's area. `preserve` runs before every change of the data file (`store.rs`).
#[derive(Debug)]
pub struct CowArea {
    path: PathBuf,
    block_size: u64,
    /// The snapshot's size in blocks: blocks past it (a later resize) are not preserved.
    blocks: u64,
    inner: RwLock<Inner>,
    /// Unit tests' power loss: the file's length at its last fdatasync.
    #[cfg(test)]
    synced_len: std::sync::atomic::AtomicU64,
}

fn le32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn file_header(block_size: u64, blocks: u64) -> [u8; HEADER as usize] {
    let mut h = [0u8; HEADER as usize];
    h[0..8].copy_from_slice(FILE_MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&(block_size as u32).to_le_bytes());
    h[16..24].copy_from_slice(&blocks.to_le_bytes());
    let crc = crc32c::crc32c(&h[0..24]);
    h[24..28].copy_from_slice(&crc.to_le_bytes());
    h
}

fn record_header(block: u64, kind: u32, data: &[u8]) -> [u8; HEADER as usize] {
    let mut h = [0u8; HEADER as usize];
    h[0..8].copy_from_slice(REC_MAGIC);
    h[8..16].copy_from_slice(&block.to_le_bytes());
    h[16..20].copy_from_slice(&kind.to_le_bytes());
    let dcrc = if kind == KIND_DATA {
        crc32c::crc32c(data)
    } else {
        0
    };
    h[20..24].copy_from_slice(&dcrc.to_le_bytes());
    let crc = crc32c::crc32c(&h[0..24]);
    h[24..28].copy_from_slice(&crc.to_le_bytes());
    h
}

impl CowArea {
    /// A new, empty area, durable (file and directory entry) before it is used.
    pub fn create(path: &Path, block_size: u64, blocks: u64) -> io::Result<CowArea> {
        crate::seam::power::io(path)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        file.write_all_at(&file_header(block_size, blocks), 0)?;
        file.sync_all()?;
        crate::format::sync_dir(path)?;
        Ok(CowArea {
            path: path.to_path_buf(),
            block_size,
            blocks,
            inner: RwLock::new(Inner {
                file,
                end: HEADER,
                map: HashMap::new(),
                failed: None,
                retired: false,
            }),
            #[cfg(test)]
            synced_len: HEADER.into(),
        })
    }

    /// Opens an area: reads every whole record; a torn tail is cut off (see the module comment).
    /// A bad file header, or a record for a block past the snapshot, is an error.
    pub fn open(path: &Path, block_size: u64, blocks: u64) -> io::Result<CowArea> {
        let bad = |why: String| io::Error::other(format!("{}: {why}", path.display()));
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        let len = file.metadata()?.len();
        let mut h = [0u8; HEADER as usize];
        file.read_exact_at(&mut h, 0)
            .map_err(|e| bad(format!("no header ({e})")))?;
        if &h[0..8] != FILE_MAGIC || le32(&h, 24) != crc32c::crc32c(&h[0..24]) {
            return Err(bad("bad header (magic or checksum)".into()));
        }
        if le32(&h, 8) != VERSION {
            return Err(bad(format!("unknown version {}", le32(&h, 8))));
        }
        if u64::from(le32(&h, 12)) != block_size || le64(&h, 16) != blocks {
            return Err(bad(format!(
                "made for {} blocks of {} bytes, not {blocks} of {block_size}",
                le64(&h, 16),
                le32(&h, 12)
            )));
        }
        let mut map = HashMap::new();
        let mut at = HEADER;
        let mut data = vec![0u8; block_size as usize];
        while at + HEADER <= len {
            let mut r = [0u8; HEADER as usize];
            file.read_exact_at(&mut r, at)?;
            if &r[0..8] != REC_MAGIC || le32(&r, 24) != crc32c::crc32c(&r[0..24]) {
                break;
            }
            let block = le64(&r, 8);
            let kind = le32(&r, 16);
            let loc = match kind {
                KIND_ZERO => Loc::Zero,
                KIND_DATA => {
                    if at + HEADER + block_size > len {
                        break;
                    }
                    file.read_exact_at(&mut data, at + HEADER)?;
                    if crc32c::crc32c(&data) != le32(&r, 20) {
                        break;
                    }
                    Loc::At(at + HEADER)
                }
                _ => break,
            };
            if block >= blocks {
                return Err(bad(format!("a record for block {block} past the snapshot")));
            }
            // The first record of a block is the snapshot's content; a block is preserved once.
            map.entry(block).or_insert(loc);
            at += HEADER
                + match loc {
                    Loc::Zero => 0,
                    Loc::At(_) => block_size,
                };
        }
        if at < len {
            // Unsynced records of writes that never reached the data file.
            file.set_len(at)?;
            file.sync_all()?;
        }
        Ok(CowArea {
            path: path.to_path_buf(),
            block_size,
            blocks,
            inner: RwLock::new(Inner {
                file,
                end: at,
                map,
                failed: None,
                retired: false,
            }),
            #[cfg(test)]
            synced_len: at.into(),
        })
    }

    fn read_inner(&self) -> RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_inner(&self) -> RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes the area holds on disk (headers and saved blocks).
    pub fn bytes(&self) -> u64 {
        self.read_inner().end
    }

    /// Blocks saved so far.
    pub fn preserved(&self) -> u64 {
        self.read_inner().map.len() as u64
    }

    /// The area is no longer used (the snapshot is deleted): reads fail from now on.
    pub fn retire(&self) {
        let mut g = self.write_inner();
        g.failed = Some("the snapshot was deleted".into());
        g.retired = true;
    }

    /// Saves the old content of every block of `[offset, offset+len)` not saved yet, reading it
    /// with `read_old` (the data file), and makes the saved copies durable.
    ///
    /// Invariant: when this returns Ok, every block of the range holds, in this area and durably
    /// (fdatasync'd), the content it had when the snapshot was taken; the caller overwrites the
    /// data file only afterwards. Test: `snapshot::cow::tests::power_loss_at_any_point_keeps_the_snapshot`.
    pub fn preserve(
        &self,
        offset: u64,
        len: u64,
        read_old: &dyn Fn(&mut [u8], u64) -> io::Result<()>,
    ) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let bs = self.block_size;
        let first = offset / bs;
        let last = (offset + len).div_ceil(bs).min(self.blocks);
        if first >= last {
            return Ok(());
        }
        // Quick check under the shared lock: most writes touch blocks saved long ago.
        {
            let g = self.read_inner();
            if let Some(why) = &g.failed {
                return Err(self.failed_error(why));
            }
            if (first..last).all(|b| g.map.contains_key(&b)) {
                return Ok(());
            }
        }
        let mut g = self.write_inner();
        if let Some(why) = &g.failed {
            return Err(self.failed_error(why));
        }
        let mut added: Vec<(u64, Loc)> = Vec::new();
        let mut at = g.end;
        let mut buf = vec![0u8; (RUN * bs) as usize];
        let mut out: Vec<u8> = Vec::new();
        let mut b = first;
        while b < last {
            if g.map.contains_key(&b) {
                b += 1;
                continue;
            }
            // A run of unsaved blocks, read from the data file at once.
            let mut e = b + 1;
            while e < last && e - b < RUN && !g.map.contains_key(&e) {
                e += 1;
            }
            let n = ((e - b) * bs) as usize;
            read_old(&mut buf[..n], b * bs)?;
            out.clear();
            for (i, blk) in (b..e).enumerate() {
                let d = &buf[i * bs as usize..(i + 1) * bs as usize];
                if d.iter().all(|&x| x == 0) {
                    out.extend_from_slice(&record_header(blk, KIND_ZERO, d));
                    added.push((blk, Loc::Zero));
                } else {
                    out.extend_from_slice(&record_header(blk, KIND_DATA, d));
                    added.push((blk, Loc::At(at + out.len() as u64)));
                    out.extend_from_slice(d);
                }
            }
            if let Err(e) = self.append(&g.file, &out, at) {
                return Err(self.fail(&mut g, "write", e));
            }
            at += out.len() as u64;
            b = e;
        }
        if let Err(e) = self.sync(&g.file) {
            return Err(self.fail(&mut g, "fdatasync", e));
        }
        g.end = at;
        g.map.extend(added);
        Ok(())
    }

    fn sync(&self, file: &File) -> io::Result<()> {
        crate::seam::power::io(&self.path)?;
        file.sync_data()?;
        #[cfg(test)]
        if let Ok(m) = file.metadata() {
            self.synced_len
                .store(m.len(), std::sync::atomic::Ordering::SeqCst);
        }
        Ok(())
    }

    fn append(&self, file: &File, bytes: &[u8], at: u64) -> io::Result<()> {
        crate::seam::power::io(&self.path)?;
        file.write_all_at(bytes, at)
    }

    /// A failed write or sync fails the area: a sync that succeeds later says nothing about the
    /// pages the kernel dropped. Every later data-file write touching an unsaved block fails too
    /// (EIO) until the snapshot is deleted or the engine restarts.
    fn fail(&self, g: &mut Inner, what: &str, e: io::Error) -> io::Error {
        let why = format!("{what} of the copy-on-write area failed: {e}");
        g.failed = Some(why.clone());
        self.failed_error(&why)
    }

    fn failed_error(&self, why: &str) -> io::Error {
        io::Error::other(format!("snapshot area {}: {why}", self.path.display()))
    }

    /// Reads the snapshot's bytes `[offset, offset + buf.len())`: saved blocks from the area,
    /// the others from the data file (`read_data`). Under the shared lock, so no block can be
    /// saved, and then overwritten, between the check and the read of the data file.
    pub fn read(
        &self,
        buf: &mut [u8],
        offset: u64,
        read_data: &dyn Fn(&mut [u8], u64) -> io::Result<()>,
    ) -> io::Result<()> {
        let g = self.read_inner();
        if g.retired {
            return Err(self.failed_error("the snapshot was deleted"));
        }
        let bs = self.block_size;
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        while pos < end {
            let blk = pos / bs;
            let in_blk = pos % bs;
            let n = (bs - in_blk).min(end - pos);
            let dst = &mut buf[(pos - offset) as usize..(pos - offset + n) as usize];
            match g.map.get(&blk) {
                Some(Loc::Zero) => dst.fill(0),
                Some(Loc::At(at)) => g.file.read_exact_at(dst, at + in_blk)?,
                None => {
                    // Extend to the run of unsaved blocks: one read of the data file.
                    let mut e = pos + n;
                    while e < end && !g.map.contains_key(&(e / bs)) {
                        e = ((e / bs + 1) * bs).min(end);
                    }
                    read_data(
                        &mut buf[(pos - offset) as usize..(e - offset) as usize],
                        pos,
                    )?;
                    pos = e;
                    continue;
                }
            }
            pos += n;
        }
        Ok(())
    }

    /// Unit tests' power loss: what no fdatasync covered is gone.
    #[cfg(test)]
    pub fn lose_unsynced(&self) {
        let g = self.read_inner();
        let _ = g
            .file
            .set_len(self.synced_len.load(std::sync::atomic::Ordering::SeqCst));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::BlockStore;
    use std::sync::Arc;

    const BS: u64 = 4096;

    fn block(tag: u8) -> Vec<u8> {
        vec![tag; BS as usize]
    }

    fn read_snap(area: &CowArea, store: &BlockStore, blocks: u64) -> Vec<u8> {
        let mut out = vec![0u8; (blocks * BS) as usize];
        area.read(&mut out, 0, &|b, o| store.read_at(b, o)).unwrap();
        out
    }

    #[test]
    fn a_snapshot_keeps_its_content_while_the_data_file_changes() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlockStore::open_or_create(&dir.path().join("data"), 16 * BS).unwrap();
        for b in 0..8 {
            store.write_at(&block(b as u8 + 1), b * BS).unwrap();
        }
        let before = {
            let mut v = vec![0u8; (16 * BS) as usize];
            store.read_at(&mut v, 0).unwrap();
            v
        };
        let area = Arc::new(CowArea::create(&dir.path().join("a.cow"), BS, 16).unwrap());
        store.add_cow(Arc::clone(&area));
        store.write_at(&block(0xee), 2 * BS).unwrap();
        store.write_at(&block(0xdd), 2 * BS).unwrap();
        store.write_at(&[7u8; 100], 5 * BS + 10).unwrap();
        store.punch_hole(6 * BS, 4 * BS).unwrap();
        store.zero_range(0, BS).unwrap();
        store.write_zeros(12 * BS, BS).unwrap();
        assert_eq!(read_snap(&area, &store, 16), before);
        // Unaligned reads of the snapshot return the same bytes.
        let mut part = vec![0u8; 9000];
        area.read(&mut part, 2 * BS - 100, &|b, o| store.read_at(b, o))
            .unwrap();
        assert_eq!(
            part,
            before[(2 * BS - 100) as usize..(2 * BS - 100) as usize + 9000]
        );
        // Reopened (a restart), it still reads the snapshot.
        let again = CowArea::open(&dir.path().join("a.cow"), BS, 16).unwrap();
        assert_eq!(read_snap(&again, &store, 16), before);
        // Blocks 0, 2, 5, 6..10 and 12 were saved; 6..8 held data, 8..10 and 12 were holes.
        assert_eq!(again.preserved(), 8);
    }

    #[test]
    fn several_snapshots_each_keep_their_own_point() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlockStore::open_or_create(&dir.path().join("data"), 4 * BS).unwrap();
        store.write_at(&block(1), 0).unwrap();
        let a = Arc::new(CowArea::create(&dir.path().join("a.cow"), BS, 4).unwrap());
        store.add_cow(Arc::clone(&a));
        store.write_at(&block(2), 0).unwrap();
        let b = Arc::new(CowArea::create(&dir.path().join("b.cow"), BS, 4).unwrap());
        store.add_cow(Arc::clone(&b));
        store.write_at(&block(3), 0).unwrap();
        store.remove_cow(&a);
        store.write_at(&block(4), 0).unwrap();
        assert_eq!(read_snap(&b, &store, 1), block(2));
        a.retire();
        assert!(a
            .read(&mut [0u8; 16], 0, &|b, o| store.read_at(b, o))
            .is_err());
    }

    /// Power loss after every file operation in turn of a workload over a snapshot: once the
    /// snapshot is made, what it reads after the cut (data file's unsynced writes undone, the
    /// area's unsynced tail dropped, area reopened) is always the content at the snapshot.
    #[test]
    fn power_loss_at_any_point_keeps_the_snapshot() {
        let blocks = 32u64;
        let mut cut_at = 0;
        loop {
            let dir = tempfile::tempdir().unwrap();
            let store = BlockStore::open_or_create(&dir.path().join("data"), blocks * BS).unwrap();
            for b in 0..blocks / 2 {
                store.write_at(&block(b as u8 + 1), b * BS).unwrap();
            }
            store.sync().unwrap();
            let mut want = vec![0u8; (blocks * BS) as usize];
            store.read_at(&mut want, 0).unwrap();
            let path = dir.path().join("s.cow");
            let area = Arc::new(CowArea::create(&path, BS, blocks).unwrap());
            store.add_cow(Arc::clone(&area));
            let cut = crate::seam::power::Cut::after(dir.path(), cut_at);
            // Overwrites, a trim over data and holes, syncs in between: stop at the first failure.
            let steps: Vec<Box<dyn Fn() -> io::Result<()>>> = vec![
                Box::new(|| store.write_at(&block(0xa0), 3 * BS)),
                Box::new(|| store.write_at(&vec![0xa1; 3 * BS as usize], 7 * BS)),
                Box::new(|| store.sync()),
                Box::new(|| store.punch_hole(12 * BS, 8 * BS)),
                Box::new(|| store.write_at(&block(0xa2), 3 * BS)),
                Box::new(|| store.write_at(&block(0xa3), 30 * BS)),
                Box::new(|| store.sync()),
                Box::new(|| store.write_zeros(0, 2 * BS)),
            ];
            for s in &steps {
                if s().is_err() {
                    break;
                }
            }
            drop(steps);
            let tripped = cut.tripped();
            drop(cut);
            // The cut: page cache gone; the machine restarts.
            store.lose_unsynced();
            area.lose_unsynced();
            drop(store);
            let store = BlockStore::open_or_create(&dir.path().join("data"), blocks * BS).unwrap();
            let reopened = CowArea::open(&path, BS, blocks).unwrap();
            assert_eq!(
                read_snap(&reopened, &store, blocks),
                want,
                "power cut after {cut_at} file operations"
            );
            if !tripped {
                break;
            }
            cut_at += 1;
        }
        assert!(cut_at > 5, "the workload did {cut_at} file operations");
    }

    #[test]
    fn a_failed_area_refuses_the_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlockStore::open_or_create(&dir.path().join("data"), 4 * BS).unwrap();
        store.write_at(&block(1), 0).unwrap();
        let area = Arc::new(CowArea::create(&dir.path().join("s.cow"), BS, 4).unwrap());
        store.add_cow(Arc::clone(&area));
        {
            let _eio = crate::seam::power::Cut::fault(
                &dir.path().join("s.cow"),
                1,
                crate::seam::power::Kind::Eio,
            );
            assert!(store.write_at(&block(2), 0).is_err());
        }
        // The data file was not touched, and later writes to unsaved blocks keep failing.
        assert_eq!(read_snap(&area, &store, 1), block(1));
        let mut now = block(0);
        store.read_at(&mut now, 0).unwrap();
        assert_eq!(now, block(1));
        assert!(store.write_at(&block(3), 0).is_err());
    }

    #[test]
    fn a_damaged_header_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.cow");
        CowArea::create(&p, BS, 4).unwrap();
        std::fs::write(&p, b"garbage garbage garbage garbage garbage").unwrap();
        assert!(CowArea::open(&p, BS, 4).is_err());
        CowArea::create(&p, BS, 4).unwrap();
        assert!(CowArea::open(&p, BS, 8).is_err());
    }
}
