//! The `attach-fuse` daemon: one NBD export exposed as the single file `disk` of a FUSE filesystem, so
//! that a loop device (with direct I/O) can turn it into a block device on machines without nbd.ko.
//!
//! Every FUSE request is forwarded to the [`NbdClient`] without waiting: the reply object travels with
//! the NBD request and is answered from the client's reader thread, so the kernel can keep as many
//! requests in flight as it likes. The file is opened with `FOPEN_DIRECT_IO` (no page cache in the
//! FUSE layer, so the loop device's direct I/O reaches the engine unchanged) and
//! `FOPEN_PARALLEL_DIRECT_WRITES` (no inode lock serialising writes).
//!
//! Mapping: read → NBD_CMD_READ, write → NBD_CMD_WRITE, fsync/flush → NBD_CMD_FLUSH,
//! fallocate(PUNCH_HOLE | ZERO_RANGE) → NBD_CMD_WRITE_ZEROES (the loop driver turns discards and
//! write-zeroes into these; a punched hole must read back as zeros, which TRIM does not promise).
//!
//! A point-in-time view (issue 18) of a filesystem is served with an [`Overlay`]: the export is
//! read-only, but the file takes writes, which land in a throw-away local file and are read back
//! from there. That is what lets a read-only mount replay the journal of the crash-consistent
//! image (ext4, xfs) without ever writing to the engine.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, MountOption, OpenAccMode, OpenFlags, ReplyAttr, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyWrite, Request, WriteFlags,
};

use crate::nbd::{
    libc_errno, ClientOptions, Command, LinkState, NbdAddr, NbdClient, TF_SEND_FLUSH,
    TF_SEND_WRITE_ZEROES,
};

/// The one file in the filesystem.
pub const DISK_NAME: &str = "disk";
const DISK_INO: INodeNo = INodeNo(2);
const TTL: Duration = Duration::from_secs(3600);
/// Largest single FUSE read/write we ask the kernel for (also bounds each NBD request).
const MAX_IO: u32 = 1 << 20;

const FALLOC_FL_KEEP_SIZE: i32 = 0x01;
const FALLOC_FL_PUNCH_HOLE: i32 = 0x02;
const FALLOC_FL_ZERO_RANGE: i32 = 0x10;

/// The overlay's unit: the smallest logical block a loop device has, so every write the kernel
/// sends covers whole sectors and never needs a read of the export first.
const SECTOR: u64 = 512;
/// Sectors tracked per bitmap chunk (one `[u64; 64]`: 2 MiB of the disk).
const CHUNK_SECTORS: u64 = 64 * 64;

/// A copy-on-write layer over a read-only export: written sectors live in a local sparse file
/// and are read from there; everything else comes from the engine. Nothing in it is durable or
/// ever sent to the engine: it dies with the daemon (a new attachment starts empty, and the
/// mount replays the journal again).
pub struct Overlay {
    file: std::fs::File,
    /// Written sectors, by chunk (memory follows what was written, not the disk's size).
    written: Mutex<HashMap<u64, Box<[u64; 64]>>>,
}

impl Overlay {
    /// A fresh, empty overlay in `path` (an old file there is replaced).
    pub fn create(path: &Path) -> io::Result<Overlay> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        Ok(Overlay {
            file,
            written: Mutex::new(HashMap::new()),
        })
    }

    /// Stores `data` at `offset`; both must be whole sectors (EINVAL otherwise).
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), i32> {
        let len = data.len() as u64;
        if offset % SECTOR != 0 || len % SECTOR != 0 {
            return Err(libc_errno::EINVAL);
        }
        // The data first, then the bits: a read that sees a bit finds the data behind it.
        self.file
            .write_all_at(data, offset)
            .map_err(|_| libc_errno::EIO)?;
        let mut w = self.written.lock().unwrap_or_else(|p| p.into_inner());
        for s in offset / SECTOR..(offset + len) / SECTOR {
            let bits = w
                .entry(s / CHUNK_SECTORS)
                .or_insert_with(|| Box::new([0; 64]));
            let i = s % CHUNK_SECTORS;
            bits[(i / 64) as usize] |= 1 << (i % 64);
        }
        Ok(())
    }

    /// Replaces in `buf` (the export's bytes at `offset`) every sector the overlay holds.
    pub fn patch(&self, offset: u64, buf: &mut [u8]) -> Result<(), i32> {
        let end = offset + buf.len() as u64;
        let mut held = Vec::new();
        {
            let w = self.written.lock().unwrap_or_else(|p| p.into_inner());
            if w.is_empty() {
                return Ok(());
            }
            for s in offset / SECTOR..end.div_ceil(SECTOR) {
                let Some(bits) = w.get(&(s / CHUNK_SECTORS)) else {
                    continue;
                };
                let i = s % CHUNK_SECTORS;
                if bits[(i / 64) as usize] & (1 << (i % 64)) != 0 {
                    held.push(s);
                }
            }
        }
        for s in held {
            // The part of sector `s` that lies inside [offset, end).
            let (from, to) = ((s * SECTOR).max(offset), ((s + 1) * SECTOR).min(end));
            let dst = &mut buf[(from - offset) as usize..(to - offset) as usize];
            self.file
                .read_exact_at(dst, from)
                .map_err(|_| libc_errno::EIO)?;
        }
        Ok(())
    }
}

/// The FUSE filesystem: a root directory holding `disk`.
pub struct NbdFs {
    client: Arc<NbdClient>,
    read_only: bool,
    /// Writes go here, not to the engine (a view of a filesystem).
    overlay: Option<Arc<Overlay>>,
    started: SystemTime,
    max_io: u32,
}

impl NbdFs {
    pub fn new(client: Arc<NbdClient>, force_read_only: bool) -> Self {
        Self::with_overlay(client, force_read_only, None)
    }

    /// With an overlay the file takes writes even though the export is read-only.
    pub fn with_overlay(
        client: Arc<NbdClient>,
        force_read_only: bool,
        overlay: Option<Arc<Overlay>>,
    ) -> Self {
        let info = client.info();
        // Stay within the server's maximum payload, in whole pages.
        let max_io = MAX_IO.min(info.max_payload).max(4096) / 4096 * 4096;
        NbdFs {
            read_only: force_read_only || (info.read_only() && overlay.is_none()),
            overlay,
            started: SystemTime::now(),
            client,
            max_io,
        }
    }

    fn attr(&self, ino: INodeNo) -> Option<FileAttr> {
        let (kind, perm, size, nlink) = match ino {
            INodeNo::ROOT => (FileType::Directory, 0o500, 0, 2),
            DISK_INO => (
                FileType::RegularFile,
                if self.read_only { 0o400 } else { 0o600 },
                // The export's size now: it grows with an online expansion (`grow`).
                self.client.info().size,
                1,
            ),
            _ => return None,
        };
        Some(FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: self.started,
            mtime: self.started,
            ctime: self.started,
            crtime: self.started,
            kind,
            perm,
            nlink,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        })
    }

    /// Submits one NBD request and answers FUSE from the completion.
    fn flush_to_engine(&self, reply: ReplyEmpty) {
        // An overlay promises no durability: it is thrown away with the view.
        if self.read_only || self.overlay.is_some() || !self.client.info().can(TF_SEND_FLUSH) {
            reply.ok();
            return;
        }
        self.client.submit(
            Command::flush(),
            Box::new(move |r| match r {
                Ok(_) => reply.ok(),
                Err(e) => reply.error(Errno::from_i32(e)),
            }),
        );
    }
}

/// Splits `[offset, end)` into NBD requests of at most 1 GiB (the request length is 32-bit).
fn zero_pieces(offset: u64, end: u64) -> Vec<(u64, u32)> {
    const PIECE: u64 = 1 << 30;
    (offset..end)
        .step_by(PIECE as usize)
        .map(|o| (o, (end - o).min(PIECE) as u32))
        .collect()
}

/// Completes one FUSE request once all of its NBD pieces have completed (first error wins).
struct Join {
    left: AtomicUsize,
    error: Mutex<Option<i32>>,
    reply: Mutex<Option<ReplyEmpty>>,
}

impl Join {
    fn piece_done(&self, r: Result<(), i32>) {
        if let Err(e) = r {
            let mut err = self.error.lock().unwrap_or_else(|p| p.into_inner());
            err.get_or_insert(e);
        }
        if self.left.fetch_sub(1, Ordering::AcqRel) == 1 {
            let reply = self.reply.lock().unwrap_or_else(|p| p.into_inner()).take();
            let err = *self.error.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(reply) = reply {
                match err {
                    None => reply.ok(),
                    Some(e) => reply.error(Errno::from_i32(e)),
                }
            }
        }
    }
}

impl fuser::Filesystem for NbdFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        // Let the kernel keep several direct I/Os of one file in flight (the loop device's aio).
        let _ = config.add_capabilities(InitFlags::FUSE_ASYNC_DIO);
        let _ = config.set_max_write(self.max_io);
        let _ = config.set_max_readahead(self.max_io);
        let _ = config.set_max_background(128);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent == INodeNo::ROOT && name == DISK_NAME {
            if let Some(a) = self.attr(DISK_INO) {
                reply.entry(&TTL, &a, Generation(0));
                return;
            }
        }
        reply.error(Errno::ENOENT);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        // The size is the volume's: refuse to change it, accept everything else as a no-op.
        if size.is_some_and(|s| s != self.client.info().size) {
            reply.error(Errno::EPERM);
            return;
        }
        match self.attr(ino) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino != INodeNo::ROOT {
            reply.error(Errno::ENOTDIR);
            return;
        }
        let entries = [
            (INodeNo::ROOT, FileType::Directory, "."),
            (INodeNo::ROOT, FileType::Directory, ".."),
            (DISK_INO, FileType::RegularFile, DISK_NAME),
        ];
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(*ino, (i + 1) as u64, *kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if ino != DISK_INO {
            reply.error(Errno::EISDIR);
            return;
        }
        if self.read_only && flags.acc_mode() != OpenAccMode::O_RDONLY {
            reply.error(Errno::EROFS);
            return;
        }
        reply.opened(
            FileHandle(0),
            FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES,
        );
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if ino != DISK_INO {
            reply.error(Errno::EISDIR);
            return;
        }
        let end = self.client.info().size;
        if offset >= end || size == 0 {
            reply.data(&[]);
            return;
        }
        let len = u64::from(size.min(self.max_io)).min(end - offset) as u32;
        let overlay = self.overlay.clone();
        self.client.submit(
            Command::read(offset, len),
            Box::new(move |r| match r {
                Ok(mut data) => match overlay.map_or(Ok(()), |o| o.patch(offset, &mut data)) {
                    Ok(()) => reply.data(&data),
                    Err(e) => reply.error(Errno::from_i32(e)),
                },
                Err(e) => reply.error(Errno::from_i32(e)),
            }),
        );
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if ino != DISK_INO {
            reply.error(Errno::EISDIR);
            return;
        }
        if self.read_only {
            reply.error(Errno::EROFS);
            return;
        }
        if data.is_empty() {
            reply.written(0);
            return;
        }
        let end = self.client.info().size;
        if offset >= end {
            reply.error(Errno::from_i32(libc_errno::ENOSPC));
            return;
        }
        // A write running past the end is cut at the end, like a block device's.
        let len = (data.len() as u64).min(end - offset) as usize;
        let written = len as u32;
        if let Some(o) = &self.overlay {
            match o.write(offset, &data[..len]) {
                Ok(()) => reply.written(written),
                Err(e) => reply.error(Errno::from_i32(e)),
            }
            return;
        }
        self.client.submit(
            Command::write(offset, data[..len].to_vec()),
            Box::new(move |r| match r {
                Ok(_) => reply.written(written),
                Err(e) => reply.error(Errno::from_i32(e)),
            }),
        );
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        self.flush_to_engine(reply);
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.flush_to_engine(reply);
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if ino != DISK_INO {
            reply.error(Errno::EISDIR);
            return;
        }
        if self.read_only {
            reply.error(Errno::EROFS);
            return;
        }
        if self.overlay.is_some() {
            // A read-only mount replaying its journal never discards; the kernel stops asking.
            reply.error(Errno::EOPNOTSUPP);
            return;
        }
        let end = offset.saturating_add(length).min(self.client.info().size);
        if mode & !(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE) != 0 {
            reply.error(Errno::EOPNOTSUPP);
            return;
        }
        if mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE) == 0 {
            // Plain allocation: every byte of the volume already exists.
            reply.ok();
            return;
        }
        if offset >= end {
            reply.ok();
            return;
        }
        let info = self.client.info();
        // TRIM would be cheaper but does not promise zeros on read-back; without WRITE_ZEROES the
        // kernel learns (EOPNOTSUPP) that this file cannot punch holes and stops asking.
        if !info.can(TF_SEND_WRITE_ZEROES) {
            reply.error(Errno::EOPNOTSUPP);
            return;
        }
        let pieces = zero_pieces(offset, end);
        let join = Arc::new(Join {
            left: AtomicUsize::new(pieces.len()),
            error: Mutex::new(None),
            reply: Mutex::new(Some(reply)),
        });
        for (o, l) in pieces {
            let j = join.clone();
            self.client.submit(
                Command::write_zeroes(o, l),
                Box::new(move |r| j.piece_done(r.map(|_| ()))),
            );
        }
    }
}

/// Arguments of the daemon (the hidden `attach-fuse` subcommand).
#[derive(Clone, Debug)]
pub struct DaemonArgs {
    pub nbd: String,
    pub export: String,
    /// The attachment's directory: `fuse/` (mount point), `status.json`.
    pub dir: PathBuf,
    pub read_only: bool,
    /// Serve a read-only export writable through a throw-away [`Overlay`] (`<dir>/overlay`).
    pub overlay: bool,
    pub io_timeout: Duration,
    /// How long I/O waits for an unreachable engine before it fails with EIO.
    pub reconnect_timeout: Duration,
    /// Threads reading /dev/fuse (each with its own cloned fd when more than one).
    pub fuse_threads: usize,
}

pub fn mountpoint(dir: &Path) -> PathBuf {
    dir.join("fuse")
}

pub fn disk_path(dir: &Path) -> PathBuf {
    mountpoint(dir).join(DISK_NAME)
}

/// The throw-away overlay of a view (outside the FUSE mount).
pub fn overlay_path(dir: &Path) -> PathBuf {
    dir.join("overlay")
}

pub fn status_path(dir: &Path) -> PathBuf {
    dir.join("status.json")
}

/// What the daemon tells the plugin through `status.json`.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DaemonStatus {
    pub pid: u32,
    pub size: u64,
    pub link: LinkState,
    /// Size refreshes done (SIGUSR1, `grow`), whatever their outcome: the plugin waits for it to
    /// move past the count it read before asking.
    #[serde(default)]
    pub refreshes: u64,
    /// Why the last refresh failed; `None` when it succeeded.
    #[serde(default)]
    pub refresh_error: Option<String>,
}

/// The signal that asks the daemon to learn the export's size again (online expansion).
pub const REFRESH_SIGNAL: rustix::process::Signal = rustix::process::Signal::USR1;

/// Learns the export's size again and makes the kernel see it: the client replaces its connection
/// when the export grew (`NbdClient::refresh_size`), then the disk file's cached attributes are
/// invalidated (they live an hour otherwise), so the next `stat` reads the new size and the loop
/// device can take it (`losetup -c`).
fn refresh(
    client: &NbdClient,
    notifier: &fuser::Notifier,
    status: &Mutex<DaemonStatus>,
    dir: &Path,
) {
    let outcome = client
        .refresh_size()
        .map_err(|e| e.to_string())
        .and_then(|size| {
            // Offset -1: the attributes only (the file has no page cache: direct I/O).
            notifier
                .inval_inode(DISK_INO, -1, 0)
                .map(|()| size)
                .map_err(|e| format!("invalidating the disk file's attributes: {e}"))
        });
    let mut s = status.lock().unwrap_or_else(|p| p.into_inner());
    s.refreshes += 1;
    match outcome {
        Ok(size) => {
            if size != s.size {
                tracing::info!(from = s.size, to = size, "the export grew");
            }
            s.size = size;
            s.refresh_error = None;
        }
        Err(e) => {
            tracing::warn!(error = %e, "size refresh failed");
            s.refresh_error = Some(e);
        }
    }
    write_status(dir, &s);
}

fn write_status(dir: &Path, status: &DaemonStatus) {
    let tmp = dir.join("status.json.tmp");
    let ok = serde_json::to_vec(status)
        .map_err(io::Error::other)
        .and_then(|b| std::fs::write(&tmp, b))
        .and_then(|_| std::fs::rename(&tmp, status_path(dir)));
    if let Err(e) = ok {
        tracing::warn!("cannot write {}: {e}", status_path(dir).display());
    }
}

/// Marks a daemon failure where the engine answered but refused the export (wrong role, unknown
/// export): the daemon exits with [`EXIT_REFUSED`] so the plugin can tell it from a crash.
#[derive(Debug, thiserror::Error)]
#[error("the engine refused the export")]
pub struct EngineRefused;

/// Exit status of the daemon when the engine refused the export.
pub const EXIT_REFUSED: u8 = 3;

/// The line the daemon prints on stdout once the file is ready; the plugin waits for it.
pub const READY_PREFIX: &str = "READY ";

/// Runs the daemon until SIGTERM/SIGINT (then unmounts, flushes, disconnects) or until someone
/// unmounts the filesystem. Returns an error before printing READY if the export cannot be served.
pub fn run_daemon(args: DaemonArgs) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let addr = NbdAddr::parse(&args.nbd)?;
    let dir = args.dir.clone();
    let pid = std::process::id();
    let status = Arc::new(Mutex::new(DaemonStatus {
        pid,
        ..DaemonStatus::default()
    }));
    let (st2, dir2) = (status.clone(), dir.clone());
    let observer = Box::new(move |link: &LinkState| {
        let mut s = st2.lock().unwrap_or_else(|p| p.into_inner());
        s.link = link.clone();
        write_status(&dir2, &s);
    });
    let client = NbdClient::connect(
        addr,
        &args.export,
        ClientOptions {
            io_timeout: args.io_timeout,
            reconnect_timeout: args.reconnect_timeout,
            ..ClientOptions::default()
        },
        Some(observer),
    )
    .map_err(|e| {
        let refused = e.is_refusal();
        let e = anyhow::Error::new(e).context(format!(
            "connect to NBD export {:?} at {}",
            args.export, args.nbd
        ));
        if refused {
            e.context(EngineRefused)
        } else {
            e
        }
    })?;
    let size = client.info().size;
    {
        let mut s = status.lock().unwrap_or_else(|p| p.into_inner());
        s.size = size;
        write_status(&dir, &s);
    }
    let client = Arc::new(client);
    let mnt = mountpoint(&dir);
    std::fs::create_dir_all(&mnt).with_context(|| format!("create {}", mnt.display()))?;
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        MountOption::FSName(format!("tandem:{}", args.export)),
        MountOption::Subtype("tandem".into()),
        MountOption::NoDev,
        MountOption::NoSuid,
        MountOption::NoExec,
        MountOption::NoAtime,
    ];
    if args.read_only {
        config.mount_options.push(MountOption::RO);
    }
    config.n_threads = Some(args.fuse_threads.clamp(1, 16));
    config.clone_fd = args.fuse_threads > 1;
    let overlay = if args.overlay {
        let p = overlay_path(&dir);
        let o = Overlay::create(&p).with_context(|| format!("create {}", p.display()))?;
        Some(Arc::new(o))
    } else {
        None
    };
    let fs = NbdFs::with_overlay(client.clone(), args.read_only, overlay);
    let session = fuser::Session::new(fs, &mnt, &config)
        .with_context(|| format!("mount FUSE at {}", mnt.display()))?;
    let bg = session.spawn().context("start the FUSE session")?;
    tracing::info!(export = %args.export, size, mountpoint = %mnt.display(), "serving");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // Installed before READY: the plugin may ask for a refresh as soon as it knows the daemon,
    // and SIGUSR1's default action would kill it.
    let (mut term, mut int, mut grow) = {
        use tokio::signal::unix::{signal, SignalKind};
        let _rt = rt.enter();
        (
            signal(SignalKind::terminate())?,
            signal(SignalKind::interrupt())?,
            signal(SignalKind::user_defined1())?,
        )
    };
    {
        let mut out = io::stdout().lock();
        // The plugin may have gone away; it finds us again through the state dir.
        let _ = writeln!(out, "{READY_PREFIX}{size}");
        let _ = out.flush();
    }

    rt.block_on(async {
        loop {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
                _ = grow.recv() => {
                    let (c, n, st, d) = (client.clone(), bg.notifier(), status.clone(), dir.clone());
                    let _ = tokio::task::spawn_blocking(move || refresh(&c, &n, &st, &d)).await;
                    continue;
                }
                _ = tokio::time::sleep(Duration::from_millis(500)) => {
                    if bg.guard.is_finished() {
                        tracing::info!("FUSE filesystem was unmounted");
                        return Ok::<(), anyhow::Error>(());
                    }
                    continue;
                }
            }
            // Asked to stop: unmount only if nothing holds the file open (a loop device still
            // attached would lose its backing store); otherwise keep serving.
            match rustix::mount::unmount(&mnt, rustix::mount::UnmountFlags::empty()) {
                Ok(()) => return Ok(()),
                Err(e) if e == rustix::io::Errno::INVAL => return Ok(()), // not mounted any more
                Err(e) => tracing::warn!("not stopping: cannot unmount {}: {e}", mnt.display()),
            }
        }
    })?;
    let _ = bg.join();
    match Arc::try_unwrap(client) {
        Ok(c) => c.close(),
        Err(c) => drop(c),
    }
    let _ = std::fs::remove_file(status_path(&dir));
    let _ = std::fs::remove_file(overlay_path(&dir));
    tracing::info!(export = %args.export, "stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::testserver::TestServer;

    #[test]
    fn join_reports_the_first_error_once_all_pieces_finish() {
        // No FUSE reply object can be built outside a session, so exercise the counting directly.
        let j = Join {
            left: AtomicUsize::new(3),
            error: Mutex::new(None),
            reply: Mutex::new(None),
        };
        j.piece_done(Ok(()));
        j.piece_done(Err(5));
        j.piece_done(Err(22));
        assert_eq!(*j.error.lock().unwrap(), Some(5));
        assert_eq!(j.left.load(Ordering::SeqCst), 0);
    }

    /// Written sectors read back from the overlay, the rest stays the export's; only whole
    /// sectors are taken; a fresh overlay forgets everything.
    #[test]
    fn an_overlay_holds_whole_sectors_and_patches_reads() {
        let d = tempfile::tempdir().unwrap();
        let p = overlay_path(d.path());
        let o = Overlay::create(&p).unwrap();
        let export = vec![0xeeu8; 3 * CHUNK_SECTORS as usize * 512];
        let mut buf = export.clone();
        o.patch(0, &mut buf).unwrap();
        assert_eq!(buf, export, "an empty overlay changes nothing");
        // One sector in the first chunk, and a run across the first chunk boundary.
        o.write(512, &[1u8; 512]).unwrap();
        let boundary = CHUNK_SECTORS * 512;
        o.write(boundary - 1024, &[2u8; 2048]).unwrap();
        assert_eq!(o.write(100, &[3u8; 512]), Err(libc_errno::EINVAL));
        assert_eq!(o.write(512, &[3u8; 100]), Err(libc_errno::EINVAL));
        let mut buf = export.clone();
        o.patch(0, &mut buf).unwrap();
        let mut want = export.clone();
        want[512..1024].fill(1);
        want[(boundary - 1024) as usize..(boundary + 1024) as usize].fill(2);
        assert_eq!(buf, want);
        // A read starting and ending inside sectors takes just its part of them.
        let mut part = export[700..(boundary + 10) as usize].to_vec();
        o.patch(700, &mut part).unwrap();
        assert_eq!(part, want[700..(boundary + 10) as usize]);
        let o = Overlay::create(&p).unwrap();
        let mut buf = export.clone();
        o.patch(0, &mut buf).unwrap();
        assert_eq!(buf, export, "a new overlay starts empty");
    }

    #[test]
    fn zeroing_is_split_into_32_bit_requests() {
        assert_eq!(zero_pieces(4096, 8192), vec![(4096, 4096)]);
        let g = 1u64 << 30;
        assert_eq!(
            zero_pieces(512, 2 * g + 1024),
            vec![(512, g as u32), (512 + g, g as u32), (512 + 2 * g, 512)]
        );
        assert!(zero_pieces(10, 10).is_empty());
    }

    #[test]
    fn attributes_follow_the_export() {
        let srv = TestServer::start(3 << 20);
        let c =
            Arc::new(NbdClient::connect(srv.addr(), "v", ClientOptions::default(), None).unwrap());
        let fs = NbdFs::new(c.clone(), false);
        let a = fs.attr(DISK_INO).unwrap();
        assert_eq!(a.size, 3 << 20);
        assert_eq!(a.kind, FileType::RegularFile);
        assert_eq!(a.perm, 0o600);
        assert_eq!(fs.attr(INodeNo::ROOT).unwrap().kind, FileType::Directory);
        assert!(fs.attr(INodeNo(9)).is_none());
        assert_eq!(fs.max_io, MAX_IO);
        let ro = NbdFs::new(c.clone(), true);
        assert_eq!(ro.attr(DISK_INO).unwrap().perm, 0o400);
        // An online expansion: the file grows once the client adopts the new size.
        srv.data.lock().unwrap().resize(5 << 20, 0);
        assert_eq!(c.refresh_size().unwrap(), 5 << 20);
        assert_eq!(fs.attr(DISK_INO).unwrap().size, 5 << 20);
    }
}
