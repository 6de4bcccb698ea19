//! `tandem-engine seed`: fills a fresh state dir and data file from an NBD export (a snapshot's,
//! `<volume>@snapshot/<id>`), so that `serve` then runs it as a volume with that content.
//!
//! Order (each step durable before the next):
//! 1. `seed` marker stored with `done: false` (the dir is now half-seeded: `serve` refuses it);
//! 2. the data file emptied (truncated to 0, then to the size: sparse zeros);
//! 3. every non-zero block copied from the export (zero blocks skipped: the file stays sparse);
//!    the data file fdatasync'd;
//! 4. `pending_to_peer` stored with every copied block, so a secondary receives them even when
//!    the pair does not start with a full copy;
//! 5. the marker stored with `done: true`.
//!
//! A seed interrupted anywhere restarts from step 1 with the same arguments. Seeding a done dir
//! from the same export is a no-op; a dir holding another volume (its `meta`, or a marker naming
//! another volume, size or source) is refused, and so is a dir that `serve` already ran without a seed.

use std::{
    fs::OpenOptions,
    io,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::{
    bitmap::Bitmap,
    nbd::proto::{self as p, Request},
};

pub const MARKER: &str = "seed";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SeedMarker {
    pub volume: String,
    pub size: u64,
    pub block_size: u64,
    pub export: String,
    pub done: bool,
    /// Non-zero blocks copied (when done).
    pub blocks: u64,
}

/// What `seed` does.
#[derive(Debug, Clone)]
pub struct SeedArgs {
    pub from: String,
    pub export: String,
    pub state_dir: PathBuf,
    pub data: PathBuf,
    pub volume: String,
    pub size: u64,
    pub block_size: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Outcome {
    Seeded { blocks: u64, source_size: u64 },
    AlreadySeeded { blocks: u64 },
}

fn marker_path(state_dir: &Path) -> PathBuf {
    state_dir.join(MARKER)
}

fn load_marker(state_dir: &Path) -> io::Result<Option<SeedMarker>> {
    let p = marker_path(state_dir);
    match std::fs::read(&p) {
        Ok(b) => crate::format::meta::decode(&b)
            .map(Some)
            .map_err(|e| io::Error::other(format!("{}: damaged seed marker ({e:?})", p.display()))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

pub fn store_marker(state_dir: &Path, m: &SeedMarker) -> io::Result<()> {
    let p = marker_path(state_dir);
    crate::seam::power::io(&p)?;
    let tmp = state_dir.join("seed.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    io::Write::write_all(&mut f, &crate::format::meta::encode(m))?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, &p)?;
    crate::format::sync_dir(&p)
}

/// `serve`'s check: a seed that did not finish leaves a dir that must not serve.
pub fn refuse_half_seeded(state_dir: &Path) -> io::Result<()> {
    match load_marker(state_dir)? {
        Some(m) if !m.done => Err(io::Error::other(format!(
            "state dir {} is half-seeded from export {:?} (the seed was interrupted): run \
             `tandem-engine seed` again with the same arguments before serving",
            state_dir.display(),
            m.export
        ))),
        _ => Ok(()),
    }
}

/// A byte stream to the NBD server: TCP or a unix socket.
trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

async fn connect(from: &str) -> io::Result<Box<dyn Stream>> {
    if let Some(path) = from.strip_prefix("unix:") {
        let s = tokio::net::UnixStream::connect(path)
            .await
            .map_err(|e| io::Error::new(e.kind(), format!("NBD socket {path}: {e}")))?;
        Ok(Box::new(s))
    } else {
        let s = tokio::net::TcpStream::connect(from)
            .await
            .map_err(|e| io::Error::new(e.kind(), format!("NBD server {from}: {e}")))?;
        s.set_nodelay(true)?;
        Ok(Box::new(s))
    }
}

/// Reads `len` bytes at `offset` (one request at a time: a restore is bounded by the disk).
async fn read_at(
    s: &mut Box<dyn Stream>,
    handle: u64,
    offset: u64,
    len: u32,
) -> anyhow::Result<Vec<u8>> {
    let req = Request {
        flags: 0,
        kind: p::CMD_READ,
        handle,
        offset,
        length: len,
    };
    s.write_all(&req.encode()).await?;
    s.flush().await?;
    let reply = p::client::read_reply(s).await?;
    if reply.handle != handle {
        anyhow::bail!("NBD reply for handle {}, expected {handle}", reply.handle);
    }
    if reply.error != 0 {
        anyhow::bail!(
            "NBD read of {len} bytes at {offset} failed with errno {}",
            reply.error
        );
    }
    let mut buf = vec![0u8; len as usize];
    s.read_exact(&mut buf).await?;
    Ok(buf)
}

/// Runs the seed (see the module comment).
pub async fn seed(a: &SeedArgs) -> anyhow::Result<Outcome> {
    let bs = a.block_size;
    if bs == 0 || bs % 512 != 0 || a.size == 0 || a.size % bs != 0 {
        anyhow::bail!(
            "--size {} must be a positive multiple of the block size {bs}",
            a.size
        );
    }
    std::fs::create_dir_all(&a.state_dir)?;
    let want = SeedMarker {
        volume: a.volume.clone(),
        size: a.size,
        block_size: bs,
        export: a.export.clone(),
        done: false,
        blocks: 0,
    };
    let meta = crate::meta::Meta::load(&a.state_dir.join("meta"))?;
    let marker = load_marker(&a.state_dir)?;
    if let Some(m) = &meta {
        if m.volume != a.volume {
            anyhow::bail!(
                "state dir {} holds volume {:?}, not {:?}: refusing to seed over it",
                a.state_dir.display(),
                m.volume,
                a.volume
            );
        }
    }
    match &marker {
        Some(m) if m.volume != want.volume || m.export != want.export || m.block_size != bs => {
            anyhow::bail!(
                "state dir {} was seeded for volume {:?} from export {:?}, not {:?} from {:?}: \
                 refusing to seed over it",
                a.state_dir.display(),
                m.volume,
                m.export,
                a.volume,
                a.export
            );
        }
        // Invariant: a done seed is never redone: the volume may have been written since.
        // Test: `tests/snapshot.rs` `seed_is_idempotent_and_refuses_other_dirs`.
        Some(m) if m.done => return Ok(Outcome::AlreadySeeded { blocks: m.blocks }),
        Some(m) if m.size != a.size => {
            anyhow::bail!(
                "state dir {} is half-seeded at size {}, not {}",
                a.state_dir.display(),
                m.size,
                a.size
            );
        }
        Some(_) => {
            tracing::info!("an earlier seed of this dir was interrupted: starting over");
        }
        None if meta.is_some() => {
            anyhow::bail!(
                "state dir {} already holds volume {:?} (an engine served it): refusing to seed over it",
                a.state_dir.display(),
                a.volume
            );
        }
        None => {}
    }
    // Connect first: a source that is not there leaves the dir as it was.
    let mut s = connect(&a.from).await?;
    let info = p::client::handshake_async(&mut s, &a.export, &[]).await?;
    if info.size > a.size {
        anyhow::bail!(
            "export {:?} is {} bytes, more than --size {}: a restore may grow a volume, never shrink it",
            a.export,
            info.size,
            a.size
        );
    }
    store_marker(&a.state_dir, &want)?;
    let data = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&a.data)?;
    // Empty and sparse, whatever an interrupted run (or anything else) left in it.
    data.set_len(0)?;
    data.set_len(a.size)?;
    let mut pending = Bitmap::new(a.size.div_ceil(u64::from(crate::geometry::BLOCK_SIZE)));
    const CHUNK: u64 = 4 << 20;
    let mut off = 0u64;
    let mut handle = 0u64;
    let mut copied = 0u64;
    while off < info.size {
        let n = (info.size - off).min(CHUNK);
        handle += 1;
        let buf = read_at(&mut s, handle, off, n as u32).await?;
        let mut i = 0usize;
        while i < buf.len() {
            let e = (i + bs as usize).min(buf.len());
            let blk = &buf[i..e];
            if blk.iter().any(|&b| b != 0) {
                data.write_all_at(blk, off + i as u64)?;
                let at = off + i as u64;
                let bs4k = u64::from(crate::geometry::BLOCK_SIZE);
                for b in at / bs4k..(at + blk.len() as u64).div_ceil(bs4k) {
                    pending.set(b);
                }
                copied += 1;
            }
            i = e;
        }
        off += n;
    }
    data.sync_all()?;
    pending.store(&a.state_dir.join("pending_to_peer"))?;
    let mut done = want;
    done.done = true;
    done.blocks = copied;
    store_marker(&a.state_dir, &done)?;
    Ok(Outcome::Seeded {
        blocks: copied,
        source_size: info.size,
    })
}
