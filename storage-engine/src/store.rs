//! The block store: a raw image file holding the volume's bytes at their offsets.
//! Positioned I/O (pread/pwrite) lets many requests use one file handle at once.

use std::{
    fs::{File, OpenOptions},
    io,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    sync::Arc,
};

use rustix::fs::{fadvise, fallocate, Advice, FallocateFlags};

use crate::snapshot::cow::CowArea;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("data file {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "data file {path} is {actual} bytes but the volume size is {expected} bytes; \
         refusing to truncate or grow it (move it away or pass --size {actual})"
    )]
    SizeMismatch {
        path: PathBuf,
        actual: u64,
        expected: u64,
    },
    #[error("volume size {0} is not a multiple of 4096 bytes")]
    UnalignedSize(u64),
    #[error(
        "data file {path} is {actual} bytes, larger than the volume's {expected}, and holds data \
         past {expected}: not a grow that was cut short; refusing to truncate it"
    )]
    DataPastSize {
        path: PathBuf,
        actual: u64,
        expected: u64,
    },
}

/// A raw image file of fixed size.
#[derive(Debug)]
pub struct BlockStore {
    file: Arc<File>,
    path: PathBuf,
    /// Grows (never shrinks) once a grow is committed (`Volume::grow_to`); read on every request.
    size: std::sync::atomic::AtomicU64,
    /// An fdatasync failed. The kernel may have dropped the writes it could not write back and
    /// reports that once: a later fdatasync that succeeds says nothing about them. Every later
    /// operation fails, so nothing is acknowledged as durable that may not be, until a restart
    /// recovers from the tables. Test: `takeover::powerloss::failpoint_campaign`.
    failed: std::sync::atomic::AtomicBool,
    /// The copy-on-write areas of the snapshots taken of this file (`snapshot::cow`). Every
    /// change holds it shared from saving the old blocks to its own write, so adding an area
    /// (exclusive) waits for changes in flight and every later change goes through it.
    cow: std::sync::RwLock<Vec<Arc<CowArea>>>,
    /// Unit tests' power loss: the old bytes under every change no fdatasync has covered yet.
    #[cfg(test)]
    unsynced: std::sync::Mutex<Vec<(u64, Vec<u8>)>>,
    /// Unit tests' power loss: the file's length before an extension no fsync has covered yet.
    #[cfg(test)]
    unsynced_len: std::sync::Mutex<Option<u64>>,
}

impl BlockStore {
    /// Opens `path`, creating a sparse file of `size` bytes if it does not exist.
    /// An existing file of another size is refused, never truncated.
    pub fn open_or_create(path: &Path, size: u64) -> Result<Self, StoreError> {
        if size == 0 || size % 4096 != 0 {
            return Err(StoreError::UnalignedSize(size));
        }
        let io_err = |source| StoreError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io_err)?;
        let actual = file.metadata().map_err(io_err)?.len();
        if actual == 0 {
            file.set_len(size).map_err(io_err)?;
            file.sync_all().map_err(io_err)?;
        } else if actual != size {
            return Err(StoreError::SizeMismatch {
                path: path.to_path_buf(),
                actual,
                expected: size,
            });
        }
        // A block device's I/O is random, and its client does its own readahead. Readahead here
        // would also fill the page cache with large folios, and on kernels that have them every
        // later 4 KiB write walks a whole folio's buffers (several times the cost of the write).
        fadvise(&file, 0, None, Advice::Random).map_err(|e| io_err(e.into()))?;
        Ok(Self {
            file: Arc::new(file),
            path: path.to_path_buf(),
            size: size.into(),
            failed: Default::default(),
            cow: Default::default(),
            #[cfg(test)]
            unsynced: Default::default(),
            #[cfg(test)]
            unsynced_len: Default::default(),
        })
    }

    /// Opens the data file of a volume whose committed size is `size` (its `meta`). A file longer
    /// than that is a grow cut short before `meta` took the new size: nothing was ever written
    /// past `size` (no request reaches past the committed size), so it is cut back to `size`
    /// (durably) and the volume opens at its old size. A longer file holding data past `size` is
    /// no such thing and is refused untouched. Test: `volume::resize_tests::power_loss_mid_grow`.
    pub fn open_committed(path: &Path, size: u64) -> Result<Self, StoreError> {
        let io_err = |source| StoreError::Io {
            path: path.to_path_buf(),
            source,
        };
        let actual = match std::fs::metadata(path) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
            Err(e) => return Err(io_err(e)),
        };
        if actual > size && size > 0 && size % 4096 == 0 {
            let file = OpenOptions::new().write(true).open(path).map_err(io_err)?;
            use rustix::fs::{seek, SeekFrom};
            let data_past = match seek(&file, SeekFrom::Data(size)) {
                Ok(_) => true,
                Err(e) if e == rustix::io::Errno::NXIO => false,
                Err(e) => return Err(io_err(e.into())),
            };
            if data_past {
                return Err(StoreError::DataPastSize {
                    path: path.to_path_buf(),
                    actual,
                    expected: size,
                });
            }
            tracing::warn!(
                path = %path.display(),
                file_bytes = actual,
                volume_bytes = size,
                "a grow was cut short before it was committed: the volume keeps its size"
            );
            file.set_len(size).map_err(io_err)?;
            file.sync_all().map_err(io_err)?;
        }
        Self::open_or_create(path, size)
    }

    pub fn size(&self) -> u64 {
        self.size.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Step 1 of a grow: the file gets its new length (the new range a hole, reading zeros) and
    /// the length is made durable (fsync). The size served stays the old one until `publish`.
    pub fn extend_file(&self, new_size: u64) -> io::Result<()> {
        self.check_failed()?;
        if new_size % 4096 != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("size {new_size} is not a multiple of 4096 bytes"),
            ));
        }
        let len = self.file.metadata()?.len();
        if new_size <= len {
            return Ok(());
        }
        crate::seam::power::io(&self.path)?;
        #[cfg(test)]
        if let Ok(mut u) = self.unsynced_len.lock() {
            u.get_or_insert(len);
        }
        self.file.set_len(new_size)?;
        crate::seam::power::io(&self.path).map_err(|e| self.sync_failed(e))?;
        self.file.sync_all().map_err(|e| self.sync_failed(e))?;
        #[cfg(test)]
        self.forget_unsynced();
        Ok(())
    }

    /// The last step of a grow: requests may reach `new_size` from now on. Never shrinks.
    pub fn publish_size(&self, new_size: u64) {
        self.size
            .fetch_max(new_size, std::sync::atomic::Ordering::AcqRel);
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn check_failed(&self) -> io::Result<()> {
        if self.failed.load(std::sync::atomic::Ordering::Acquire) {
            return Err(io::Error::other(format!(
                "{}: an earlier fdatasync failed, so writes since the last good one may be lost; \
                 restart the engine",
                self.path.display()
            )));
        }
        Ok(())
    }

    /// Whether an fdatasync of this file has failed (the engine must restart).
    pub fn failed(&self) -> bool {
        self.failed.load(std::sync::atomic::Ordering::Acquire)
    }

    /// From now on every change of this file first saves the old blocks into `area`.
    pub fn add_cow(&self, area: Arc<CowArea>) {
        self.cow
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push(area);
    }

    /// Stops saving blocks into `area` (its snapshot is deleted); waits for changes in flight.
    pub fn remove_cow(&self, area: &Arc<CowArea>) {
        self.cow
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|a| !Arc::ptr_eq(a, area));
    }

    /// Holds the areas shared for one change: saves the old content of `[offset, offset+len)`
    /// into each first.
    // Invariant: the data file is changed only after every snapshot's area holds the old blocks
    // durably (`CowArea::preserve`). Test: `snapshot::cow::tests::power_loss_at_any_point_keeps_the_snapshot`.
    fn before_change(
        &self,
        offset: u64,
        len: u64,
    ) -> io::Result<std::sync::RwLockReadGuard<'_, Vec<Arc<CowArea>>>> {
        let areas = self.cow.read().unwrap_or_else(|p| p.into_inner());
        for a in areas.iter() {
            a.preserve(offset, len, &|buf, at| self.file.read_exact_at(buf, at))?;
        }
        Ok(areas)
    }

    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.check_failed()?;
        self.file.read_exact_at(buf, offset)
    }

    /// `len` bytes at `offset` into fresh memory, without zeroing it first.
    pub fn read_vec(&self, len: usize, offset: u64) -> io::Result<Vec<u8>> {
        self.check_failed()?;
        let mut buf = Vec::with_capacity(len);
        while buf.len() < len {
            let at = offset + buf.len() as u64;
            match rustix::io::pread(&self.file, rustix::buffer::spare_capacity(&mut buf), at) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(buf)
    }

    pub fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        self.check_failed()?;
        let _areas = self.before_change(offset, data.len() as u64)?;
        if let Err(e) = crate::seam::power::io(&self.path) {
            if crate::seam::power::is_short(&e) {
                // A write that lands in part, then fails.
                let half = &data[..data.len() / 2];
                #[cfg(test)]
                self.remember(offset, half.len() as u64);
                self.file.write_all_at(half, offset)?;
                return Err(io::Error::from_raw_os_error(5));
            }
            return Err(e);
        }
        #[cfg(test)]
        self.remember(offset, data.len() as u64);
        self.file.write_all_at(data, offset)
    }

    /// A failed fdatasync: the file is failed from now on.
    fn sync_failed(&self, e: io::Error) -> io::Error {
        self.failed
            .store(true, std::sync::atomic::Ordering::Release);
        // The kernel may have dropped what it could not write back.
        #[cfg(test)]
        self.lose_unsynced();
        e
    }

    /// Makes every completed write durable (fdatasync).
    pub fn sync(&self) -> io::Result<()> {
        self.check_failed()?;
        crate::seam::power::io(&self.path).map_err(|e| self.sync_failed(e))?;
        self.file.sync_data().map_err(|e| self.sync_failed(e))?;
        #[cfg(test)]
        self.forget_unsynced();
        Ok(())
    }

    /// fdatasync on a blocking thread, so the async runtime keeps serving other requests.
    pub async fn sync_async(&self) -> io::Result<()> {
        self.check_failed()?;
        crate::seam::power::io(&self.path).map_err(|e| self.sync_failed(e))?;
        let f = Arc::clone(&self.file);
        tokio::task::spawn_blocking(move || f.sync_data())
            .await
            .map_err(io::Error::other)?
            .map_err(|e| self.sync_failed(e))?;
        #[cfg(test)]
        self.forget_unsynced();
        Ok(())
    }

    #[cfg(test)]
    fn remember(&self, offset: u64, len: u64) {
        let len = len.min(self.size().saturating_sub(offset));
        let mut old = vec![0u8; len as usize];
        if self.file.read_exact_at(&mut old, offset).is_ok() {
            if let Ok(mut u) = self.unsynced.lock() {
                u.push((offset, old));
            }
        }
    }

    #[cfg(test)]
    fn forget_unsynced(&self) {
        if let Ok(mut u) = self.unsynced.lock() {
            u.clear();
        }
        if let Ok(mut u) = self.unsynced_len.lock() {
            *u = None;
        }
    }

    /// Unit tests' power loss: every change since the last fdatasync is undone, as if the page
    /// cache had never been written back.
    #[cfg(test)]
    pub fn lose_unsynced(&self) {
        let undo = self
            .unsynced
            .lock()
            .map(|mut u| std::mem::take(&mut *u))
            .unwrap_or_default();
        for (offset, old) in undo.into_iter().rev() {
            let _ = self.file.write_all_at(&old, offset);
        }
        if let Some(len) = self.unsynced_len.lock().ok().and_then(|mut u| u.take()) {
            let _ = self.file.set_len(len);
        }
    }

    /// Deallocates a range; it reads back as zeros afterwards.
    pub fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        self.check_failed()?;
        let _areas = self.before_change(offset, len)?;
        crate::seam::power::io(&self.path)?;
        #[cfg(test)]
        self.remember(offset, len);
        match fallocate(
            &*self.file,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            offset,
            len,
        ) {
            Ok(()) => Ok(()),
            Err(e) if e == rustix::io::Errno::OPNOTSUPP => self.zeros_unchecked(offset, len),
            Err(e) => Err(e.into()),
        }
    }

    /// Zeroes a range keeping it allocated (NBD_CMD_FLAG_NO_HOLE).
    pub fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        self.check_failed()?;
        let _areas = self.before_change(offset, len)?;
        crate::seam::power::io(&self.path)?;
        #[cfg(test)]
        self.remember(offset, len);
        match fallocate(&*self.file, FallocateFlags::ZERO_RANGE, offset, len) {
            Ok(()) => Ok(()),
            Err(e) if e == rustix::io::Errno::OPNOTSUPP => self.zeros_unchecked(offset, len),
            Err(e) => Err(e.into()),
        }
    }

    /// Byte ranges that hold data (SEEK_DATA / SEEK_HOLE); holes read as zeros.
    pub fn allocated_ranges(&self) -> io::Result<Vec<(u64, u64)>> {
        use rustix::fs::{seek, SeekFrom};
        let mut out = Vec::new();
        let mut pos = 0u64;
        let size = self.size();
        while pos < size {
            let start = match seek(&*self.file, SeekFrom::Data(pos)) {
                Ok(s) => s,
                Err(e) if e == rustix::io::Errno::NXIO => break,
                Err(e) if e == rustix::io::Errno::INVAL => return Ok(vec![(0, size)]),
                Err(e) => return Err(e.into()),
            };
            let end = seek(&*self.file, SeekFrom::Hole(start))
                .map_err(io::Error::from)?
                .min(size);
            if end <= start {
                break;
            }
            out.push((start, end));
            pos = end;
        }
        Ok(out)
    }

    /// Writes zero bytes over a range, so it is allocated and reads as zeros.
    pub fn write_zeros(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_failed()?;
        let _areas = self.before_change(offset, len)?;
        self.zeros_unchecked(offset, len)
    }

    /// `write_zeros` for a caller that already saved the range (holds the areas).
    fn zeros_unchecked(&self, mut offset: u64, len: u64) -> io::Result<()> {
        crate::seam::power::io(&self.path)?;
        #[cfg(test)]
        self.remember(offset, len);
        const CHUNK: u64 = 1 << 20;
        let zeros = vec![0u8; CHUNK.min(len) as usize];
        let end = offset + len;
        while offset < end {
            let n = (end - offset).min(CHUNK) as usize;
            self.file.write_all_at(&zeros[..n], offset)?;
            offset += n as u64;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn refuses_other_size_and_keeps_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("data");
        let s = BlockStore::open_or_create(&p, 1 << 20).unwrap();
        s.write_at(b"hello", 0).unwrap();
        drop(s);
        let err = BlockStore::open_or_create(&p, 2 << 20).unwrap_err();
        assert!(matches!(err, StoreError::SizeMismatch { actual, .. } if actual == 1 << 20));
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 1 << 20);
        let s = BlockStore::open_or_create(&p, 1 << 20).unwrap();
        let mut b = [0u8; 5];
        s.read_at(&mut b, 0).unwrap();
        assert_eq!(&b, b"hello");
    }

    #[test]
    fn refuses_unaligned_size() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            BlockStore::open_or_create(&dir.path().join("d"), 1000),
            Err(StoreError::UnalignedSize(1000))
        ));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Write(u64, Vec<u8>),
        Punch(u64, u64),
        Zero(u64, u64),
    }

    fn op(size: u64) -> impl Strategy<Value = Op> {
        prop_oneof![
            (0..size, proptest::collection::vec(any::<u8>(), 1..9000)).prop_map(move |(o, d)| {
                let o = o.min(size - d.len() as u64);
                Op::Write(o, d)
            }),
            (0..size, 0u64..20000).prop_map(move |(o, l)| Op::Punch(o, l.min(size - o))),
            (0..size, 0u64..20000).prop_map(move |(o, l)| Op::Zero(o, l.min(size - o))),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// The store behaves like a byte array under writes, hole punches and zeroing.
        #[test]
        fn matches_reference_image(ops in proptest::collection::vec(op(64 * 1024), 1..40)) {
            let size = 64 * 1024u64;
            let dir = tempfile::tempdir().unwrap();
            let s = BlockStore::open_or_create(&dir.path().join("d"), size).unwrap();
            let mut model = vec![0u8; size as usize];
            for o in ops {
                match o {
                    Op::Write(off, d) => {
                        s.write_at(&d, off).unwrap();
                        model[off as usize..off as usize + d.len()].copy_from_slice(&d);
                    }
                    Op::Punch(off, l) => {
                        s.punch_hole(off, l).unwrap();
                        model[off as usize..(off + l) as usize].fill(0);
                    }
                    Op::Zero(off, l) => {
                        s.zero_range(off, l).unwrap();
                        model[off as usize..(off + l) as usize].fill(0);
                    }
                }
            }
            let mut got = vec![0u8; size as usize];
            s.read_at(&mut got, 0).unwrap();
            prop_assert!(got == model);
            // The NBD read path's unzeroed reads see the same bytes, at any offset and length.
            prop_assert!(s.read_vec(size as usize, 0).unwrap() == model);
            prop_assert!(s.read_vec(40_001, 1_003).unwrap()[..] == model[1_003..41_004]);
        }
    }
}
