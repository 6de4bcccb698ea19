//! Exact losses after a forced promotion, kept on the returning old primary (issue 12, item 2).
//!
//! A primary that was force-promoted away steps down when it returns (`Volume::step_down`) and
//! asks the new primary to overwrite the blocks of its table (`resend_bitmap`): writes it
//! acknowledged that may never have reached the other side. Before any of those blocks is
//! overwritten, its local content is compared with the incoming copy: equal means the new primary
//! has it (not lost); different means it is lost, and its old content goes to the export first.
//!
//! On disk, `lost/epoch-<old>-to-<new>/` in the state dir:
//! - `blocks.img`: a sparse raw file of the volume's size holding only the lost blocks, at their
//!   own offsets (`cmp`, `dd`, `losetup` work on it);
//! - `manifest.json`: `{volume, old_epoch, new_epoch, block_size, blocks, bytes, created_unix_ms,
//!   created (the same time in RFC 3339, for people; never read back), complete}`, replaced atomically (temp file, fsync, rename, fsync dir) whenever blocks are
//!   added; `complete` once the new primary's resync has ended;
//! - `unchecked` (while not complete): the blocks of the returned table not yet compared, in the
//!   bitmap file format. The manifest is written last when an export starts, so a directory
//!   without one vouches for nothing and is ignored.

use std::{
    collections::BTreeSet,
    fs::File,
    io,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Mutex, MutexGuard,
    },
};

use serde::{Deserialize, Serialize};

use crate::{bitmap::Bitmap, format::sync_dir, geometry::BS, store::BlockStore};

/// The exports' directory inside the state dir.
pub const DIR: &str = "lost";
const IMG: &str = "blocks.img";
const MANIFEST: &str = "manifest.json";
const UNCHECKED: &str = "unchecked";

/// What `manifest.json` says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub volume: String,
    /// The epoch the old primary served at when it acknowledged these blocks.
    pub old_epoch: u64,
    /// The epoch of the forced promotion that lost them.
    pub new_epoch: u64,
    pub block_size: u64,
    /// Lost blocks, ascending; their old content is in `blocks.img` at `block * block_size`.
    pub blocks: Vec<u64>,
    pub bytes: u64,
    pub created_unix_ms: u64,
    /// The new primary's resync ended: every block of the returned table was decided.
    pub complete: bool,
}

/// The manifest's codec: JSON, checked on the way in. A manifest that does not parse or does not
/// fit the volume is an error at open, never replaced (it vouches for blocks that may already be
/// overwritten in the data file).
pub mod manifest {
    use super::Manifest;
    use crate::geometry::BS;

    /// The manifest as written: its fields and `created`, the RFC 3339 form of `created_unix_ms`.
    #[derive(serde::Serialize)]
    struct Written<'a> {
        #[serde(flatten)]
        manifest: &'a Manifest,
        #[serde(skip_serializing_if = "Option::is_none")]
        created: Option<String>,
    }

    pub fn encode(m: &Manifest) -> Vec<u8> {
        let written = Written {
            manifest: m,
            created: crate::report::rfc3339_ms(m.created_unix_ms),
        };
        // A struct of strings, integers and a list of integers always serializes.
        let mut v = serde_json::to_vec_pretty(&written).unwrap_or_default();
        v.push(b'\n');
        v
    }

    pub fn decode(b: &[u8], volume: &str, volume_bytes: u64) -> Result<Manifest, String> {
        let m: Manifest = serde_json::from_slice(b).map_err(|e| e.to_string())?;
        if m.volume != volume {
            return Err(format!("written for volume {:?}, not {volume:?}", m.volume));
        }
        if m.block_size != BS {
            return Err(format!("block size {}, not {BS}", m.block_size));
        }
        if m.old_epoch >= m.new_epoch {
            return Err(format!(
                "epochs {} to {} do not increase",
                m.old_epoch, m.new_epoch
            ));
        }
        let blocks = volume_bytes / BS;
        if m.blocks.windows(2).any(|w| w[0] >= w[1])
            || m.blocks.last().is_some_and(|&b| b >= blocks)
        {
            return Err("blocks are not ascending within the volume".into());
        }
        if m.bytes != m.blocks.len() as u64 * BS {
            return Err(format!(
                "bytes {} does not match {} blocks",
                m.bytes,
                m.blocks.len()
            ));
        }
        Ok(m)
    }
}

/// What the bytes about to land on a block of the returned table are.
#[derive(Debug, Clone, Copy)]
pub enum Incoming<'a> {
    /// The whole block's new content.
    Block(&'a [u8]),
    /// The whole block becomes zeros (a trim or zeroing record).
    Zeros,
    /// Part of the block changes: whether the new primary had the old content is unknown, so the
    /// block counts as lost.
    Part,
}

/// An export's progress, for status and the new primary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub dir: PathBuf,
    pub new_epoch: u64,
    pub blocks: u64,
    pub complete: bool,
}

struct Export {
    dir: PathBuf,
    manifest: Manifest,
    listed: BTreeSet<u64>,
    unchecked: Bitmap,
    unchecked_dirty: bool,
    img: File,
}

impl Export {
    fn summary(&self) -> Summary {
        Summary {
            dir: self.dir.clone(),
            new_epoch: self.manifest.new_epoch,
            blocks: self.listed.len() as u64,
            complete: self.manifest.complete,
        }
    }

    /// The old content of `lost` goes into `blocks.img`, which is fdatasync'd, then the manifest
    /// lists it (atomic replace). Only then may the caller overwrite those blocks.
    fn add(&mut self, lost: &[(u64, Vec<u8>)]) -> io::Result<()> {
        let img = self.dir.join(IMG);
        for (b, data) in lost {
            crate::seam::power::io(&img)?;
            self.img.write_all_at(data, b * BS)?;
        }
        crate::seam::power::io(&img)?;
        self.img.sync_data()?;
        let mut next = self.manifest.clone();
        let mut listed = self.listed.clone();
        listed.extend(lost.iter().map(|(b, _)| *b));
        next.blocks = listed.iter().copied().collect();
        next.bytes = next.blocks.len() as u64 * BS;
        store_manifest(&self.dir, &next)?;
        self.manifest = next;
        self.listed = listed;
        Ok(())
    }

    fn store_unchecked(&mut self) -> io::Result<()> {
        if self.unchecked_dirty {
            self.unchecked.store(&self.dir.join(UNCHECKED))?;
            self.unchecked_dirty = false;
        }
        Ok(())
    }
}

fn store_manifest(dir: &Path, m: &Manifest) -> io::Result<()> {
    let path = dir.join(MANIFEST);
    crate::seam::power::io(&path)?;
    let tmp = dir.join("manifest.json.tmp");
    let mut f = File::create(&tmp)?;
    io::Write::write_all(&mut f, &manifest::encode(m))?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, &path)?;
    sync_dir(&path)
}

fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn parse_name(name: &str) -> Option<(u64, u64)> {
    let (old, new) = name.strip_prefix("epoch-")?.split_once("-to-")?;
    Some((old.parse().ok()?, new.parse().ok()?))
}

#[derive(Default)]
struct LossState {
    /// The export still comparing (at most one).
    active: Option<Export>,
    /// The newest finished export.
    done: Option<Summary>,
}

/// The volume's loss exports.
pub struct Losses {
    root: PathBuf,
    volume: String,
    /// Grows with the volume (`grow`).
    size: std::sync::atomic::AtomicU64,
    /// An export is comparing: checked on every batch a secondary applies, without the lock.
    armed: AtomicBool,
    state: Mutex<LossState>,
}

impl Losses {
    /// Loads the exports under `state_dir/lost`. A damaged manifest (or an unfinished export
    /// without its `unchecked` set) is an error: guessing could let a lost block be overwritten.
    pub fn open(state_dir: &Path, volume: &str, size: u64) -> Result<Self, String> {
        Self::open_grown(state_dir, volume, size, &[])
    }

    /// `open` for a volume that had `earlier` sizes (in blocks) before it grew.
    pub fn open_grown(
        state_dir: &Path,
        volume: &str,
        size: u64,
        earlier: &[u64],
    ) -> Result<Self, String> {
        let root = state_dir.join(DIR);
        let mut st = LossState::default();
        let entries = match std::fs::read_dir(&root) {
            Ok(e) => e
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| e.to_string())?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(format!("{}: {e}", root.display())),
        };
        for entry in entries {
            let dir = entry.path();
            let Some((old, new)) = entry.file_name().to_str().and_then(parse_name) else {
                continue;
            };
            let path = dir.join(MANIFEST);
            let bytes = match std::fs::read(&path) {
                Ok(b) => b,
                // Its creation was cut short: nothing was exported under it.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(format!("{}: {e}", path.display())),
            };
            let bad = |why: String| format!("loss export manifest {}: {why}", path.display());
            let m = manifest::decode(&bytes, volume, size).map_err(bad)?;
            if (m.old_epoch, m.new_epoch) != (old, new) {
                return Err(bad("its epochs differ from its directory's name".into()));
            }
            if m.complete {
                let s = Summary {
                    dir,
                    new_epoch: m.new_epoch,
                    blocks: m.blocks.len() as u64,
                    complete: true,
                };
                if st.done.as_ref().is_none_or(|d| d.new_epoch < s.new_epoch) {
                    st.done = Some(s);
                }
                continue;
            }
            if st.active.is_some() {
                return Err(bad("a second unfinished loss export".into()));
            }
            let unchecked = Bitmap::load_grown(&dir.join(UNCHECKED), size / BS, earlier)
                .map_err(|e| bad(e.to_string()))?
                .ok_or_else(|| bad("unfinished, and its unchecked set is missing".into()))?;
            let img = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(dir.join(IMG))
                .map_err(|e| bad(format!("{IMG}: {e}")))?;
            st.active = Some(Export {
                dir,
                listed: m.blocks.iter().copied().collect(),
                manifest: m,
                unchecked,
                unchecked_dirty: false,
                img,
            });
        }
        Ok(Self {
            root,
            volume: volume.to_string(),
            size: size.into(),
            armed: AtomicBool::new(st.active.is_some()),
            state: Mutex::new(st),
        })
    }

    /// The volume grew to `size` bytes: an export still comparing keeps its blocks (all below the
    /// old size), its unchecked set grows with nothing set.
    pub fn grow(&self, size: u64) {
        let mut st = self.state();
        if let Some(a) = st.active.as_mut() {
            a.unchecked.grow(size / BS);
        }
        drop(st);
        self.size.fetch_max(size, Ordering::AcqRel);
    }

    /// An export is comparing.
    pub fn armed(&self) -> bool {
        self.armed.load(Ordering::Acquire)
    }

    fn state(&self) -> MutexGuard<'_, LossState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The export shown in status: the one comparing, else the newest finished one.
    pub fn latest(&self) -> Option<Summary> {
        let st = self.state();
        st.active.as_ref().map(Export::summary).or(st.done.clone())
    }

    /// The newest finished export: (new epoch, lost blocks), told to the new primary.
    pub fn finished(&self) -> Option<(u64, u64)> {
        let st = self.state();
        if st.active.is_some() {
            return None;
        }
        st.done.as_ref().map(|s| (s.new_epoch, s.blocks))
    }

    /// A primary at `old_epoch` steps down to `new_epoch` with `table` unsent: its blocks are to
    /// be compared before they are overwritten. Safe to repeat (the same epochs add to the same
    /// export). An unfinished export of other epochs is closed first: what it has not compared is
    /// still in the table, so the new one compares it. Returns the new export, if one began.
    pub fn begin(
        &self,
        old_epoch: u64,
        new_epoch: u64,
        table: &Bitmap,
    ) -> io::Result<Option<Summary>> {
        if table.is_empty() {
            return Ok(None);
        }
        let mut st = self.state();
        if let Some(a) = st.active.as_mut() {
            if (a.manifest.old_epoch, a.manifest.new_epoch) == (old_epoch, new_epoch) {
                a.unchecked.union_with(table);
                a.unchecked_dirty = true;
                a.store_unchecked()?;
                return Ok(None);
            }
        }
        if let Some(a) = st.active.as_mut() {
            let s = close(a)?;
            st.active = None;
            st.done = Some(s);
            self.armed.store(false, Ordering::Release);
        }
        let dir = self.root.join(format!("epoch-{old_epoch}-to-{new_epoch}"));
        std::fs::create_dir_all(&dir)?;
        sync_dir(&dir)?;
        sync_dir(&self.root)?;
        let img_path = dir.join(IMG);
        crate::seam::power::io(&img_path)?;
        let img = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&img_path)?;
        img.set_len(self.size.load(Ordering::Acquire))?;
        img.sync_all()?;
        table.store(&dir.join(UNCHECKED))?;
        let manifest = Manifest {
            volume: self.volume.clone(),
            old_epoch,
            new_epoch,
            block_size: BS,
            blocks: Vec::new(),
            bytes: 0,
            created_unix_ms: now_unix_ms(),
            complete: false,
        };
        // Written last: the export exists once its manifest does.
        store_manifest(&dir, &manifest)?;
        let export = Export {
            dir,
            manifest,
            listed: BTreeSet::new(),
            unchecked: table.clone(),
            unchecked_dirty: false,
            img,
        };
        let s = export.summary();
        st.active = Some(export);
        self.armed.store(true, Ordering::Release);
        Ok(Some(s))
    }

    /// Decides every block of the returned table that `touches` is about to overwrite (the first
    /// touch of a block decides): equal content is not lost; any other is exported. Returns the
    /// number of blocks newly exported.
    ///
    /// Invariant: a lost block's old content is in `blocks.img`, fdatasync'd, and listed in the
    /// manifest (renamed into place, directory fsync'd) before this returns, and the caller
    /// overwrites nothing of the batch before it returns; on an error nothing is marked decided.
    /// Tests: `loss::tests::an_export_is_durable_before_the_block_it_keeps_is_overwritten` (power
    /// cut at every file operation), `tests/losses.rs`.
    pub fn check(&self, store: &BlockStore, touches: &[(u64, Incoming<'_>)]) -> io::Result<u64> {
        if !self.armed.load(Ordering::Acquire) {
            return Ok(0);
        }
        let mut st = self.state();
        let Some(a) = st.active.as_mut() else {
            return Ok(0);
        };
        let mut decided = BTreeSet::new();
        let mut equal = Vec::new();
        let mut lost = Vec::new();
        for &(b, incoming) in touches {
            if !a.unchecked.get(b) || !decided.insert(b) {
                continue;
            }
            if a.listed.contains(&b) {
                // Exported before a restart; the data file may hold either copy now.
                equal.push(b);
                continue;
            }
            let mut old = vec![0u8; BS as usize];
            store.read_at(&mut old, b * BS)?;
            let same = match incoming {
                Incoming::Block(new) => new == old.as_slice(),
                Incoming::Zeros => old.iter().all(|&x| x == 0),
                Incoming::Part => false,
            };
            if same {
                equal.push(b);
            } else {
                lost.push((b, old));
            }
        }
        if !lost.is_empty() {
            a.add(&lost)?;
        }
        for b in equal.into_iter().chain(lost.iter().map(|(b, _)| *b)) {
            a.unchecked.clear(b);
            a.unchecked_dirty = true;
        }
        Ok(lost.len() as u64)
    }

    /// Stores which blocks are decided. Called before the secondary forgets overwritten blocks
    /// from its table: a block it no longer asks back is never stored as still to compare.
    pub fn persist(&self) -> io::Result<()> {
        if !self.armed.load(Ordering::Acquire) {
            return Ok(());
        }
        match self.state().active.as_mut() {
            Some(a) => a.store_unchecked(),
            None => Ok(()),
        }
    }

    /// The new primary's resync ended. Blocks of the table it never sent (`still_asked(b)`: the
    /// secondary still asks for them, so they hold the old content) may be lacking there: they are
    /// exported too, then the export is complete. Returns it, if one was comparing.
    pub fn finish(
        &self,
        store: &BlockStore,
        still_asked: impl Fn(u64) -> bool,
    ) -> io::Result<Option<Summary>> {
        if !self.armed.load(Ordering::Acquire) {
            return Ok(None);
        }
        let mut st = self.state();
        let Some(a) = st.active.as_mut() else {
            return Ok(None);
        };
        let mut lost = Vec::new();
        for b in a.unchecked.iter_ones() {
            if still_asked(b) && !a.listed.contains(&b) {
                let mut old = vec![0u8; BS as usize];
                store.read_at(&mut old, b * BS)?;
                lost.push((b, old));
            }
        }
        if !lost.is_empty() {
            a.add(&lost)?;
        }
        // On an error the export stays active: finished by the next resync, or after a restart.
        let s = close(a)?;
        st.active = None;
        st.done = Some(s.clone());
        self.armed.store(false, Ordering::Release);
        Ok(Some(s))
    }
}

/// Marks an export complete (manifest first, then its `unchecked` set goes).
fn close(a: &mut Export) -> io::Result<Summary> {
    let mut m = a.manifest.clone();
    m.complete = true;
    store_manifest(&a.dir, &m)?;
    a.manifest = m;
    let path = a.dir.join(UNCHECKED);
    match std::fs::remove_file(&path) {
        Ok(()) => sync_dir(&path)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    Ok(a.summary())
}

#[cfg(test)]
mod tests;
