//! Bitmaps: the differential table (`pending_to_peer`), the write-intent extents, and later the
//! handoff table and overlay presence. One bit per block; persisted whole with a checksum.
//!
//! File format: { magic "TNDBMAP\0" (8) | version u32 LE | bits u64 LE | crc32c(body) u32 LE | body }
//! - version 1 (dense): body = every word, u64 LE;
//! - version 2 (sparse): body = (word index u64 LE, word u64 LE) for each nonzero word, ascending;
//! - version 3 (runs): body = the runs of set bits, ascending, each as two LEB128 varints: the gap
//!   from the end of the previous run (from bit 0 for the first), and the run's length minus one.
//!
//! A table is written in the smallest of the three, so a 1 TiB volume's table (32 MiB dense) costs
//! what is set, not what could be; a scattered backlog costs 2-4 bytes per block as runs where the
//! sparse form costs 16 per nonzero word (issue 17: the handoff table is stored on the ready path).

use std::{
    fs::{self, File},
    io::{self, Write},
    path::Path,
};

use crate::meta::sync_dir;

const MAGIC: &[u8; 8] = b"TNDBMAP\0";
const DENSE: u32 = 1;
const SPARSE: u32 = 2;
const RUNS: u32 = 3;
const HEADER: usize = 24;

/// Appends `v` as an LEB128 varint (7 bits a byte, low first).
fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Reads an LEB128 varint at `*at`, advancing it. Refuses a truncated one, and one longer than
/// ten bytes or past 64 bits, so a hostile body cannot make the parser loop or wrap.
fn get_varint(bytes: &[u8], at: &mut usize) -> Result<u64, String> {
    let start = *at;
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let Some(&b) = bytes.get(*at) else {
            return Err(format!("varint at byte {start} is truncated"));
        };
        *at += 1;
        let part = u64::from(b & 0x7f);
        if shift == 63 && part > 1 {
            return Err(format!("varint at byte {start} overflows 64 bits"));
        }
        v |= part << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(format!("varint at byte {start} is longer than ten bytes"))
}

/// The bits of the last word that lie inside a table of `bits` bits.
fn tail_mask_of(bits: u64) -> u64 {
    match bits % 64 {
        0 => !0,
        r => (1u64 << r) - 1,
    }
}

/// Positions of the set bits of `w`, ascending.
fn ones_of(mut w: u64) -> impl Iterator<Item = u64> {
    std::iter::from_fn(move || {
        if w == 0 {
            return None;
        }
        let t = u64::from(w.trailing_zeros());
        w &= w - 1;
        Some(t)
    })
}

/// A table as the handoff sends it (`HandoffReply.pending_runs` or `.pending_words`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WireTable {
    /// `Bitmap::to_runs`.
    Runs(Vec<u8>),
    /// `Bitmap::to_sparse`.
    Words(Vec<u8>),
}

impl WireTable {
    pub fn len(&self) -> usize {
        match self {
            Self::Runs(b) | Self::Words(b) => b.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn name(&self) -> &'static str {
        match self {
            Self::Runs(_) => "runs",
            Self::Words(_) => "words",
        }
    }
}

/// A bitmap in its file form, taken under a lock and written after it is released.
pub struct EncodedBitmap(Vec<u8>);

impl EncodedBitmap {
    fn with_body(version: u32, bits: u64, body: &[u8]) -> Self {
        let mut v = Vec::with_capacity(HEADER + body.len());
        v.extend_from_slice(MAGIC);
        v.extend_from_slice(&version.to_le_bytes());
        v.extend_from_slice(&bits.to_le_bytes());
        v.extend_from_slice(&crc32c::crc32c(body).to_le_bytes());
        v.extend_from_slice(body);
        Self(v)
    }

    /// The file form of a table of `bits` bits whose runs form (`Bitmap::to_runs`) is `runs`, as
    /// received: the handoff stores the peer's bytes without walking the table again. Only for
    /// bytes `Bitmap::from_runs(bits, runs)` accepted (the file then loads as that table).
    pub fn from_runs(bits: u64, runs: &[u8]) -> Self {
        Self::with_body(RUNS, bits, runs)
    }

    /// Bytes in the file.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Writes durably and atomically (temp file, fsync, rename, fsync dir).
    pub fn store(&self, path: &Path) -> io::Result<()> {
        crate::seam::power::io(path)?;
        // A temp name of its own: two threads may store the same bitmap at once (checkpoint and
        // flush), and must not rename each other's half-written file.
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = path.with_extension(format!("tmp{n}"));
        let mut f = File::create(&tmp)?;
        f.write_all(&self.0)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)?;
        sync_dir(path)
    }
}

/// One bitmap file written from several threads (a checkpoint, a host FLUSH, the merge, the drain).
///
/// Invariant: a store's snapshot is taken and renamed into place within one turn, so a snapshot
/// taken later is never overwritten by one taken earlier (two racing renames could otherwise leave
/// the older table on disk: a FLUSHed overlay bit or a marked pending bit would vanish). Tests:
/// `takeover::tests::a_flushed_overlay_write_survives_a_racing_checkpoint`,
/// `repl::tracker::tests::marked_pending_blocks_survive_a_racing_checkpoint`.
pub struct BitmapFile {
    path: std::path::PathBuf,
    turn: std::sync::Mutex<()>,
}

/// The right to snapshot and store one bitmap file; stores of that file wait for it.
pub struct StoreTurn<'a> {
    path: &'a Path,
    _turn: std::sync::MutexGuard<'a, ()>,
}

impl BitmapFile {
    pub fn new(path: std::path::PathBuf) -> Self {
        Self {
            path,
            turn: std::sync::Mutex::new(()),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits for this file's turn; take the snapshot after this returns.
    pub fn turn(&self) -> StoreTurn<'_> {
        StoreTurn {
            path: &self.path,
            _turn: self.turn.lock().unwrap_or_else(|p| p.into_inner()),
        }
    }
}

impl StoreTurn<'_> {
    pub fn store(&self, b: &EncodedBitmap) -> io::Result<()> {
        b.store(self.path)
    }
}

/// Memory follows what is set, not the volume (issue 17: engine RSS <= 64 MiB + 1 bit per 4 KiB):
/// a table starts as a map of its nonzero words and turns dense (one bit per block, with a summary
/// bit per word) only once a quarter of its words are nonzero, where the array is the smaller.
/// A 4 TiB volume's table (128 MiB dense) with a scattered backlog of 262,144 blocks costs a few
/// MiB, and so does each copy of it (handoff, drain, heartbeat). Small tables (up to 64 KiB dense)
/// are dense from the start. A dense table is written only where a bit is set (fresh zeroed pages
/// stay untouched). Tests: `tests::a_scattered_huge_table_costs_what_is_set`,
/// `tests::walks_of_a_dense_huge_table_touch_only_its_set_words`.
pub struct Bitmap {
    bits: u64,
    words: Words,
    ones: u64,
}

enum Words {
    /// The nonzero words by index.
    Sparse(std::collections::BTreeMap<usize, u64>),
    /// Every word; bit j of `summary` is set iff `words[j]` is nonzero, so walks over a large,
    /// mostly clear table cost what is set.
    Dense { words: Vec<u64>, summary: Vec<u64> },
}

/// Tables of at most this many words are dense from the start (64 KiB).
const DENSE_FROM_START: usize = 8192;

impl Clone for Bitmap {
    /// Copies the set words only: a derived clone would write every word of a dense copy.
    fn clone(&self) -> Self {
        let words = match &self.words {
            Words::Sparse(m) => Words::Sparse(m.clone()),
            Words::Dense { summary, .. } => {
                let n = self.word_count();
                let mut words = vec![0u64; n];
                let mut copy = vec![0u64; summary.len()];
                for (wi, w) in self.nonzero_words() {
                    words[wi] = w;
                    copy[wi / 64] |= 1 << (wi % 64);
                }
                Words::Dense {
                    words,
                    summary: copy,
                }
            }
        };
        Self {
            bits: self.bits,
            words,
            ones: self.ones,
        }
    }
}

impl PartialEq for Bitmap {
    fn eq(&self, other: &Self) -> bool {
        self.bits == other.bits
            && self.ones == other.ones
            && self.nonzero_words().eq(other.nonzero_words())
    }
}

impl Eq for Bitmap {}

impl std::fmt::Debug for Bitmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bitmap({} of {} set)", self.ones, self.bits)
    }
}

impl Bitmap {
    pub fn new(bits: u64) -> Self {
        let n = bits.div_ceil(64) as usize;
        let words = if n <= DENSE_FROM_START {
            Words::Dense {
                words: vec![0; n],
                summary: vec![0; n.div_ceil(64)],
            }
        } else {
            Words::Sparse(Default::default())
        };
        Self {
            bits,
            words,
            ones: 0,
        }
    }

    pub fn full(bits: u64) -> Self {
        let mut b = Self::new(bits);
        b.set_range(0, bits);
        b
    }

    pub fn len(&self) -> u64 {
        self.bits
    }

    pub fn is_empty(&self) -> bool {
        self.ones == 0
    }

    /// Number of set bits.
    pub fn count(&self) -> u64 {
        self.ones
    }

    fn word_count(&self) -> usize {
        self.bits.div_ceil(64) as usize
    }

    /// Word `wi` (zero if none is stored).
    fn word(&self, wi: usize) -> u64 {
        match &self.words {
            Words::Sparse(m) => m.get(&wi).copied().unwrap_or(0),
            Words::Dense { words, .. } => words.get(wi).copied().unwrap_or(0),
        }
    }

    /// Replaces word `wi` (inside the table, tail already masked), keeping the count and summary.
    fn put_word(&mut self, wi: usize, w: u64) {
        let old = self.word(wi);
        if old == w {
            return;
        }
        self.ones = self.ones - u64::from(old.count_ones()) + u64::from(w.count_ones());
        match &mut self.words {
            Words::Sparse(m) => {
                if w == 0 {
                    m.remove(&wi);
                } else {
                    m.insert(wi, w);
                }
            }
            Words::Dense { words, summary } => {
                words[wi] = w;
                if w == 0 {
                    summary[wi / 64] &= !(1 << (wi % 64));
                } else {
                    summary[wi / 64] |= 1 << (wi % 64);
                }
            }
        }
        if let Words::Sparse(m) = &self.words {
            // A map entry costs about four words: past a quarter of the words the array is smaller.
            if m.len() > self.word_count() / 4 {
                self.densify();
            }
        }
    }

    fn densify(&mut self) {
        let n = self.word_count();
        if let Words::Sparse(m) = &self.words {
            let mut words = vec![0u64; n];
            let mut summary = vec![0u64; n.div_ceil(64)];
            for (&wi, &w) in m {
                words[wi] = w;
                summary[wi / 64] |= 1 << (wi % 64);
            }
            self.words = Words::Dense { words, summary };
        }
    }

    pub fn get(&self, i: u64) -> bool {
        i < self.bits && self.word((i / 64) as usize) & (1 << (i % 64)) != 0
    }

    /// Sets bit `i`; returns whether it was clear before.
    pub fn set(&mut self, i: u64) -> bool {
        if i >= self.bits {
            return false;
        }
        let wi = (i / 64) as usize;
        let w = self.word(wi);
        let m = 1u64 << (i % 64);
        if w & m != 0 {
            return false;
        }
        self.put_word(wi, w | m);
        true
    }

    /// Clears bit `i`; returns whether it was set before.
    pub fn clear(&mut self, i: u64) -> bool {
        if i >= self.bits {
            return false;
        }
        let wi = (i / 64) as usize;
        let w = self.word(wi);
        let m = 1u64 << (i % 64);
        if w & m == 0 {
            return false;
        }
        self.put_word(wi, w & !m);
        true
    }

    pub fn set_range(&mut self, from: u64, to: u64) {
        let to = to.min(self.bits);
        let mut i = from;
        while i < to {
            // A word at a time.
            let wi = (i / 64) as usize;
            let end = to.min((wi as u64 + 1) * 64);
            let lo = i % 64;
            let n = end - i;
            let m = if n == 64 { !0 } else { ((1u64 << n) - 1) << lo };
            self.or_word(wi, m);
            i = end;
        }
    }

    /// Grows the table to `bits` bits; the new bits are clear (a grown volume's new blocks are
    /// zeros on both sides, so nothing is owed for them). Never shrinks.
    pub fn grow(&mut self, bits: u64) {
        if bits <= self.bits {
            return;
        }
        let mut grown = Self::new(bits);
        grown.union_with(self);
        *self = grown;
    }

    /// Clears every bit, and gives a large dense table's memory back.
    pub fn clear_all(&mut self) {
        *self = Self::new(self.bits);
    }

    /// The nonzero words with their indexes, ascending (without a lookup per word: a map's
    /// lookups made every walk cost n log n).
    fn nonzero_words(&self) -> Box<dyn Iterator<Item = (usize, u64)> + Send + Sync + '_> {
        match &self.words {
            Words::Sparse(m) => Box::new(m.iter().map(|(&i, &w)| (i, w))),
            Words::Dense { words, summary } => {
                Box::new(summary.iter().enumerate().flat_map(move |(si, &s)| {
                    ones_of(s).map(move |t| {
                        let wi = si * 64 + t as usize;
                        (wi, words[wi])
                    })
                }))
            }
        }
    }

    /// Set bits in ascending order.
    pub fn iter_ones(&self) -> impl Iterator<Item = u64> + '_ {
        self.nonzero_words()
            .flat_map(|(wi, w)| ones_of(w).map(move |t| wi as u64 * 64 + t))
    }

    /// The first set bit at or after `from`.
    pub fn next_one(&self, from: u64) -> Option<u64> {
        if from >= self.bits {
            return None;
        }
        let wi = (from / 64) as usize;
        let w = self.word(wi) & (!0u64 << (from % 64));
        if w != 0 {
            return Some(wi as u64 * 64 + u64::from(w.trailing_zeros()));
        }
        let next = wi + 1;
        let j = match &self.words {
            Words::Sparse(m) => *m.range(next..).next()?.0,
            Words::Dense { summary, .. } => {
                // The next nonzero word after `wi`, found through the summary.
                let mut si = next / 64;
                let mut s = summary.get(si)? & (!0u64 << (next % 64));
                while s == 0 {
                    si += 1;
                    s = *summary.get(si)?;
                }
                si * 64 + s.trailing_zeros() as usize
            }
        };
        Some(j as u64 * 64 + u64::from(self.word(j).trailing_zeros()))
    }

    /// Sets every bit set in `other` (bits past this table's end are ignored). Costs `other`'s set
    /// words.
    pub fn union_with(&mut self, other: &Bitmap) {
        let n = self.word_count();
        for (wi, w) in other.nonzero_words() {
            if wi >= n {
                break;
            }
            self.or_word(wi, w);
        }
    }

    /// ORs `w` into word `wi`, keeping the count and the summary; bits past the end are dropped.
    /// Writes the word only if that sets a bit (an untouched page stays untouched).
    fn or_word(&mut self, wi: usize, mut w: u64) {
        if wi + 1 == self.word_count() {
            w &= self.tail_mask();
        }
        let old = self.word(wi);
        if w & !old != 0 {
            self.put_word(wi, old | w);
        }
    }

    /// Little-endian bytes, bit i of the table = bit (i % 8) of byte i / 8 (the wire form).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.word_count() * 8];
        for (wi, w) in self.nonzero_words() {
            v[wi * 8..wi * 8 + 8].copy_from_slice(&w.to_le_bytes());
        }
        v.truncate(self.bits.div_ceil(8) as usize);
        v
    }

    pub fn from_bytes(bits: u64, bytes: &[u8]) -> Option<Self> {
        if bytes.len() as u64 != bits.div_ceil(8) {
            return None;
        }
        let mut b = Self::new(bits);
        for (i, chunk) in bytes.chunks(8).enumerate() {
            let mut a = [0u8; 8];
            a[..chunk.len()].copy_from_slice(chunk);
            b.or_word(i, u64::from_le_bytes(a));
        }
        Some(b)
    }

    /// The nonzero words as (index, word) pairs, u64 little-endian each (the sparse wire form).
    pub fn to_sparse(&self) -> Vec<u8> {
        let mut v = Vec::new();
        for (i, w) in self.nonzero_words() {
            v.extend_from_slice(&(i as u64).to_le_bytes());
            v.extend_from_slice(&w.to_le_bytes());
        }
        v
    }

    /// Parses `to_sparse`'s form; `None` if malformed (odd length, index out of range or not
    /// ascending).
    pub fn from_sparse(bits: u64, bytes: &[u8]) -> Option<Self> {
        if bytes.len() % 16 != 0 {
            return None;
        }
        let mut b = Builder::new(bits);
        let mut next = 0u64;
        for pair in bytes.chunks_exact(16) {
            let mut a = [0u8; 8];
            a.copy_from_slice(&pair[..8]);
            let i = u64::from_le_bytes(a);
            a.copy_from_slice(&pair[8..]);
            if i < next || i >= b.words as u64 {
                return None;
            }
            // The cost follows the pairs, not the volume.
            b.or_word(i as usize, u64::from_le_bytes(a));
            next = i + 1;
        }
        Some(b.finish())
    }

    /// The handoff's wire form: runs when the receiver reads them (`runs_ok`) and they are no
    /// larger than the sparse form, else the sparse form (the message cap is sized for it).
    pub fn wire_form(&self, runs_ok: bool) -> WireTable {
        match runs_ok
            .then(|| self.runs_within(self.sparse_len()))
            .flatten()
        {
            Some(r) => WireTable::Runs(r),
            None => WireTable::Words(self.to_sparse()),
        }
    }

    /// Nonzero words.
    fn nonzero_word_count(&self) -> usize {
        match &self.words {
            Words::Sparse(m) => m.len(),
            Words::Dense { summary, .. } => summary.iter().map(|s| s.count_ones() as usize).sum(),
        }
    }

    /// Bytes of the sparse form (`to_sparse`), without making it.
    pub fn sparse_len(&self) -> usize {
        self.nonzero_word_count() * 16
    }

    /// The runs of set bits, as the version 3 file body: (gap since the previous run's end, length
    /// minus one), LEB128 each. A block in a word of its own costs 2-6 bytes where the sparse form
    /// costs 16. Costs the nonzero words.
    pub fn to_runs(&self) -> Vec<u8> {
        self.runs_within(usize::MAX).unwrap_or_default()
    }

    /// `to_runs`, given up (`None`) as soon as it would exceed `limit` bytes (a table of short
    /// runs, where another form is smaller).
    pub fn runs_within(&self, limit: usize) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        let mut end = 0u64; // where the previous run ended (exclusive)
        let mut open: Option<(u64, u64)> = None; // the run being extended
        for (wi, mut w) in self.nonzero_words() {
            let base = wi as u64 * 64;
            while w != 0 {
                let t = u64::from(w.trailing_zeros());
                let len = u64::from((w >> t).trailing_ones());
                let (s, e) = (base + t, base + t + len);
                w = if t + len >= 64 {
                    0
                } else {
                    w & (!0u64 << (t + len))
                };
                match open {
                    Some((rs, re)) if re == s => open = Some((rs, e)),
                    Some((rs, re)) => {
                        put_varint(&mut out, rs - end);
                        put_varint(&mut out, re - rs - 1);
                        end = re;
                        if out.len() > limit {
                            return None;
                        }
                        open = Some((s, e));
                    }
                    None => open = Some((s, e)),
                }
            }
        }
        if let Some((rs, re)) = open {
            put_varint(&mut out, rs - end);
            put_varint(&mut out, re - rs - 1);
        }
        (out.len() <= limit).then_some(out)
    }

    /// Parses `to_runs`'s form. Refused with the reason: a truncated or overlong varint, a run
    /// reaching past the table's end. Costs the bytes plus the words the runs cover, never more
    /// (every run covers at least one bit, each inside the table).
    pub fn from_runs(bits: u64, bytes: &[u8]) -> Result<Self, String> {
        let mut b = Builder::new(bits);
        let (mut at, mut end) = (0usize, 0u64);
        while at < bytes.len() {
            let gap = get_varint(bytes, &mut at)?;
            let len = get_varint(bytes, &mut at)?;
            let s = end.checked_add(gap).filter(|&s| s < bits);
            let e = s.and_then(|s| s.checked_add(len)).filter(|&e| e < bits);
            let (Some(s), Some(e)) = (s, e.map(|e| e + 1)) else {
                return Err(format!(
                    "the run ending at byte {at} reaches past the table's {bits} bits"
                ));
            };
            let mut i = s;
            while i < e {
                let wi = i / 64;
                let top = e.min((wi + 1) * 64);
                let n = top - i;
                let m = if n == 64 {
                    !0
                } else {
                    ((1u64 << n) - 1) << (i % 64)
                };
                b.or_word(wi as usize, m);
                i = top;
            }
            end = e;
        }
        Ok(b.finish())
    }

    /// The bits of the last word that lie inside the bitmap.
    fn tail_mask(&self) -> u64 {
        tail_mask_of(self.bits)
    }

    /// The file form, the smallest of dense, sparse and runs. Cheap to take under a lock: it costs
    /// the set words (the runs walk stops once it is no smaller than another form).
    pub fn encode(&self) -> EncodedBitmap {
        let (dense, sparse) = (self.word_count() * 8, self.sparse_len());
        // Runs only when strictly smaller: an empty table stays the older sparse form.
        let best = dense.min(sparse);
        if best > 0 {
            if let Some(runs) = self.runs_within(best - 1) {
                return EncodedBitmap::with_body(RUNS, self.bits, &runs);
            }
        }
        let (version, body) = if sparse < dense {
            (SPARSE, self.to_sparse())
        } else {
            let mut body = vec![0u8; dense];
            for (wi, w) in self.nonzero_words() {
                body[wi * 8..wi * 8 + 8].copy_from_slice(&w.to_le_bytes());
            }
            (DENSE, body)
        };
        EncodedBitmap::with_body(version, self.bits, &body)
    }

    /// Writes the bitmap durably and atomically (temp file, fsync, rename, fsync dir).
    pub fn store(&self, path: &Path) -> io::Result<()> {
        self.encode().store(path)
    }

    /// Loads a bitmap of `bits` bits; `Ok(None)` if absent; an error if corrupt or of another size.
    pub fn load(path: &Path, bits: u64) -> io::Result<Option<Self>> {
        Self::load_grown(path, bits, &[])
    }

    /// `load`, also accepting a file of one of the `earlier` sizes the volume had before it grew
    /// (tables grow on disk only at their next store, after the new size is in `meta`): it loads
    /// grown, the new bits clear. Only sizes the volume had: the size field is outside the
    /// checksum, so any smaller value could mask set bits away.
    pub fn load_grown(path: &Path, bits: u64, earlier: &[u64]) -> io::Result<Option<Self>> {
        let b = match fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let bad = |why: &str| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {why}", path.display()),
            )
        };
        if b.len() < HEADER || &b[0..8] != MAGIC {
            return Err(bad("bad magic"));
        }
        let mut u4 = [0u8; 4];
        u4.copy_from_slice(&b[8..12]);
        let version = u32::from_le_bytes(u4);
        if ![DENSE, SPARSE, RUNS].contains(&version) {
            return Err(bad("unknown version"));
        }
        let mut u8b = [0u8; 8];
        u8b.copy_from_slice(&b[12..20]);
        let stored = u64::from_le_bytes(u8b);
        if stored != bits && !earlier.contains(&stored) {
            return Err(bad("bitmap size differs from the volume"));
        }
        u4.copy_from_slice(&b[20..24]);
        let body = &b[HEADER..];
        if crc32c::crc32c(body) != u32::from_le_bytes(u4) {
            return Err(bad("checksum mismatch or truncated"));
        }
        if version == SPARSE {
            let mut m =
                Self::from_sparse(stored, body).ok_or_else(|| bad("malformed sparse body"))?;
            m.grow(bits);
            return Ok(Some(m));
        }
        if version == RUNS {
            let mut m = Self::from_runs(stored, body)
                .map_err(|why| bad(&format!("malformed runs body: {why}")))?;
            m.grow(bits);
            return Ok(Some(m));
        }
        if body.len() as u64 != stored.div_ceil(64) * 8 {
            return Err(bad("truncated"));
        }
        let mut m = Self::new(stored);
        for (i, c) in body.chunks_exact(8).enumerate() {
            u8b.copy_from_slice(c);
            // Bits past the end are never counted or walked (the checksum covers them, not their
            // meaning): `or_word` drops them.
            m.or_word(i, u64::from_le_bytes(u8b));
        }
        m.grow(bits);
        Ok(Some(m))
    }
}

/// Builds a table from words given in ascending index order (a parse): pairs collected in a
/// vector and made a map in one bulk build, dense as soon as a quarter of the words are set. A map
/// insert per word cost n log n and most of a scattered handoff's parse.
struct Builder {
    bits: u64,
    words: usize,
    pairs: Vec<(usize, u64)>,
    dense: Option<Bitmap>,
}

impl Builder {
    fn new(bits: u64) -> Self {
        let words = bits.div_ceil(64) as usize;
        let start = Bitmap::new(bits);
        // Small tables are dense from the start anyway.
        let dense = matches!(start.words, Words::Dense { .. }).then_some(start);
        Self {
            bits,
            words,
            pairs: Vec::new(),
            dense,
        }
    }

    /// ORs `w` into word `wi`; `wi` never below the last one given (checked by the callers).
    fn or_word(&mut self, wi: usize, w: u64) {
        if let Some(d) = &mut self.dense {
            d.or_word(wi, w);
            return;
        }
        match self.pairs.last_mut() {
            Some((last, x)) if *last == wi => *x |= w,
            _ => self.pairs.push((wi, w)),
        }
        if self.pairs.len() > self.words / 4 {
            let mut d = Bitmap::new(self.bits);
            d.densify();
            for (i, w) in self.pairs.drain(..) {
                d.or_word(i, w);
            }
            self.dense = Some(d);
        }
    }

    fn finish(self) -> Bitmap {
        if let Some(d) = self.dense {
            return d;
        }
        let tail = tail_mask_of(self.bits);
        let last = self.words.saturating_sub(1);
        let mut ones = 0u64;
        let map: std::collections::BTreeMap<usize, u64> = self
            .pairs
            .into_iter()
            .map(|(i, w)| (i, if i == last { w & tail } else { w }))
            .filter(|&(_, w)| w != 0)
            .inspect(|&(_, w)| ones += u64::from(w.count_ones()))
            .collect();
        Bitmap {
            bits: self.bits,
            words: Words::Sparse(map),
            ones,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[derive(Debug, Clone)]
    enum Op {
        Set(u64),
        Clear(u64),
        Range(u64, u64),
        ClearAll,
    }

    fn ops(max: u64, span: u64) -> impl Strategy<Value = Vec<Op>> {
        proptest::collection::vec(
            prop_oneof![
                (0..max).prop_map(Op::Set),
                (0..max).prop_map(Op::Clear),
                (0..max, 0..span).prop_map(|(a, l)| Op::Range(a, a + l)),
                Just(Op::ClearAll),
            ],
            0..60,
        )
    }

    proptest! {
        /// The bitmap behaves like a set of block numbers, and survives the wire and file forms.
        #[test]
        fn matches_a_set(bits in 1u64..700, ops in ops(800, 100)) {
            check_against_a_set(bits, ops)?;
        }

        /// The same across several summary words (a summary word covers 4096 bits).
        #[test]
        fn matches_a_set_across_summary_words(bits in 1u64..20_000, ops in ops(21_000, 3_000)) {
            check_against_a_set(bits, ops)?;
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// The same for a table large enough to start as a map of words, through its turn to dense
        /// (a range of 150,000 bits covers a quarter of its words).
        #[test]
        fn matches_a_set_when_sparse(bits in 590_000u64..620_000, ops in ops(630_000, 150_000)) {
            check_against_a_set(bits, ops)?;
        }
    }

    fn check_against_a_set(bits: u64, ops: Vec<Op>) -> Result<(), TestCaseError> {
        {
            let mut b = Bitmap::new(bits);
            let mut m = BTreeSet::new();
            for op in ops {
                match op {
                    Op::Set(i) => {
                        prop_assert_eq!(b.set(i), i < bits && m.insert(i));
                    }
                    Op::Clear(i) => {
                        prop_assert_eq!(b.clear(i), m.remove(&i));
                    }
                    Op::Range(f, t) => {
                        b.set_range(f, t);
                        m.extend(f..t.min(bits));
                    }
                    Op::ClearAll => {
                        b.clear_all();
                        m.clear();
                    }
                }
                prop_assert_eq!(b.count(), m.len() as u64);
                match &b.words {
                    Words::Dense { words, summary } => {
                        for (wi, w) in words.iter().enumerate() {
                            prop_assert_eq!(summary[wi / 64] & (1 << (wi % 64)) != 0, *w != 0);
                        }
                    }
                    Words::Sparse(m) => prop_assert!(m.values().all(|&w| w != 0)),
                }
            }
            prop_assert_eq!(
                b.iter_ones().collect::<Vec<_>>(),
                m.iter().copied().collect::<Vec<_>>()
            );
            for from in (0..bits)
                .step_by((bits / 37).max(1) as usize)
                .chain([bits - 1])
            {
                prop_assert_eq!(b.next_one(from), m.range(from..).next().copied());
            }
            let back = Bitmap::from_bytes(bits, &b.to_bytes()).unwrap();
            prop_assert_eq!(&back, &b);
            prop_assert_eq!(&Bitmap::from_sparse(bits, &b.to_sparse()).unwrap(), &b);
            // The runs form against the older ones: the same table, and in its map or array form
            // as the table itself would be after the same sets.
            let runs = Bitmap::from_runs(bits, &b.to_runs()).unwrap();
            prop_assert_eq!(&runs, &b);
            prop_assert_eq!(
                is_sparse(&runs),
                runs.nonzero_word_count() * 4 <= runs.word_count()
                    && runs.word_count() > DENSE_FROM_START
            );
            let wire = b.wire_form(true);
            prop_assert!(wire.len() <= b.sparse_len());
            let parsed = match &wire {
                WireTable::Runs(r) => Bitmap::from_runs(bits, r).unwrap(),
                WireTable::Words(w) => Bitmap::from_sparse(bits, w).unwrap(),
            };
            prop_assert_eq!(&parsed, &b);
            prop_assert_eq!(b.wire_form(false), WireTable::Words(b.to_sparse()));
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("bm");
            b.store(&p).unwrap();
            prop_assert_eq!(Bitmap::load(&p, bits).unwrap(), Some(b));
        }
        Ok(())
    }

    proptest! {
        /// Any bytes parse as runs into a well-formed table, or are refused: never a panic, never
        /// a bit past the end, and what parses encodes back to a form that parses the same.
        #[test]
        fn any_bytes_parse_as_runs_or_are_refused(
            bits in 1u64..5_000,
            bytes in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            if let Ok(b) = Bitmap::from_runs(bits, &bytes) {
                prop_assert!(b.count() <= bits);
                prop_assert!(b.iter_ones().all(|i| i < bits));
                prop_assert_eq!(b.iter_ones().count() as u64, b.count());
                prop_assert_eq!(Bitmap::from_runs(bits, &b.to_runs()).unwrap(), b);
            }
        }
    }

    fn version_of(p: &Path) -> u32 {
        let raw = fs::read(p).unwrap();
        u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]])
    }

    /// A table is stored in the smallest of its forms: runs for a few scattered bits or long
    /// runs, sparse words for a few busy words, dense for many busy words; an empty table stays
    /// the sparse form an older engine reads.
    #[test]
    fn each_table_is_stored_in_its_smallest_form() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bm");
        let bits = 1u64 << 28; // 1 TiB of 4 KiB blocks: 32 MiB dense
        let mut b = Bitmap::new(bits);
        for i in [0, 12345, bits - 1] {
            b.set(i);
        }
        let check = |b: &Bitmap, version: u32, len: usize| {
            b.store(&p).unwrap();
            assert_eq!(
                (version_of(&p), fs::metadata(&p).unwrap().len()),
                (version, (HEADER + len) as u64)
            );
            assert_eq!(Bitmap::load(&p, b.len()).unwrap().as_ref(), Some(b));
        };
        // Runs: (0, 0), (12344, 0), (bits - 1 - 12346, 0): 1 + 1 + 2 + 1 + 4 + 1 bytes.
        check(&b, RUNS, 10);
        check(&Bitmap::new(bits), SPARSE, 0);
        check(&Bitmap::full(1000), RUNS, 3);
        // Every other bit of a quarter of the words: 32 runs a word, 16 bytes a word sparse.
        let mut busy = Bitmap::new(1 << 16);
        for w in (0..1024).step_by(4) {
            busy.or_word(w, 0x5555_5555_5555_5555);
        }
        check(&busy, SPARSE, 256 * 16);
        let mut all = Bitmap::new(1 << 12);
        for w in 0..64 {
            all.or_word(w, 0x5555_5555_5555_5555);
        }
        check(&all, DENSE, 64 * 8);
    }

    #[test]
    fn malformed_runs_are_refused_with_their_reason() {
        let refused = |bits: u64, bytes: &[u8], why: &str| {
            let e = Bitmap::from_runs(bits, bytes).unwrap_err();
            assert!(e.contains(why), "{bytes:?}: {e}");
        };
        refused(1000, &[0x80], "truncated");
        refused(1000, &[5], "truncated");
        let mut long = vec![0xff; 9];
        long.extend([0x81, 0]);
        refused(1000, &long, "longer than ten bytes");
        refused(
            1000,
            &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02],
            "overflows",
        );
        // A gap or a length past the end; and one that would wrap 64 bits.
        refused(1000, &[0xe8, 0x07, 0], "past the table");
        refused(1000, &[0, 0xe8, 0x07], "past the table");
        refused(1000, &[0xe7, 0x07, 0, 0, 0], "past the table");
        let max = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01];
        refused(
            u64::MAX,
            &[&[0, 0][..], &max, &max].concat(),
            "past the table",
        );
        // The last bit, and runs that meet (gap 0) are fine.
        let b = Bitmap::from_runs(1000, &[0xe7, 0x07, 0]).unwrap();
        assert_eq!(b.iter_ones().collect::<Vec<_>>(), vec![999]);
        let b = Bitmap::from_runs(1000, &[1, 1, 0, 0]).unwrap();
        assert_eq!(b.iter_ones().collect::<Vec<_>>(), vec![1, 2, 3]);
        // A runs file with a flipped bit fails its checksum; a bad body, its parse.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bm");
        let mut big = Bitmap::new(1 << 20);
        big.set(7);
        big.store(&p).unwrap();
        assert_eq!(version_of(&p), RUNS);
        let mut raw = fs::read(&p).unwrap();
        let n = raw.len();
        raw[n - 1] ^= 1;
        fs::write(&p, &raw).unwrap();
        assert!(Bitmap::load(&p, 1 << 20).is_err());
        EncodedBitmap::from_runs(1 << 20, &[0x80])
            .store(&p)
            .unwrap();
        let e = Bitmap::load(&p, 1 << 20).unwrap_err().to_string();
        assert!(e.contains("malformed runs body"), "{e}");
    }

    fn is_sparse(b: &Bitmap) -> bool {
        matches!(b.words, Words::Sparse(_))
    }

    /// A 4 TiB volume's table with a scattered backlog of 262,144 blocks (1 GiB of writes, each
    /// block in a word of its own): it and every copy the takeover path makes of it (clone,
    /// merge, the wire and file forms parsed back, grown) stay maps of their set words, a few MiB
    /// where the dense array is 128 MiB (issue 17).
    #[test]
    fn a_scattered_huge_table_costs_what_is_set() {
        let bits = 1u64 << 30;
        let n = 262_144u64;
        let mut a = Bitmap::new(bits);
        for k in 0..n {
            a.set(k * (bits / n) + k % 64);
        }
        let b = a.clone();
        let mut c = Bitmap::new(bits);
        c.union_with(&a);
        let d = Bitmap::from_sparse(bits, &a.to_sparse()).unwrap();
        let g = Bitmap::from_runs(bits, &a.to_runs()).unwrap();
        let mut e = Bitmap::new(bits - 4096);
        e.union_with(&a);
        e.grow(bits);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bm");
        a.store(&p).unwrap();
        // Runs: a gap of 4095-4096 blocks (two varint bytes; one for block 0's) and a length
        // (one) per block.
        assert_eq!(fs::metadata(&p).unwrap().len(), HEADER as u64 + n * 3 - 1);
        assert_eq!(a.wire_form(true).len() as u64, n * 3 - 1);
        let f = Bitmap::load(&p, bits).unwrap().unwrap();
        for m in [&a, &b, &c, &d, &f, &g] {
            assert!(is_sparse(m));
            assert_eq!(m, &a);
        }
        // Merged into a smaller table (the last block is past its end), then grown.
        assert!(is_sparse(&e) && e.count() == n - 1 && !e.get(bits - 4096 + 63));
        assert_eq!(a.next_one(5), Some(bits / n + 1));
        c.clear_all();
        assert!(c.is_empty() && c.next_one(0).is_none());
    }

    /// Pages of `v`'s buffer the process has in memory (/proc/self/pagemap, bit 63: present).
    fn resident_pages(v: &[u64]) -> usize {
        use std::io::{Read, Seek, SeekFrom};
        const PAGE: usize = 4096;
        let start = v.as_ptr() as usize / PAGE;
        let end = (v.as_ptr() as usize + std::mem::size_of_val(v)).div_ceil(PAGE);
        let mut f = File::open("/proc/self/pagemap").unwrap();
        f.seek(SeekFrom::Start(start as u64 * 8)).unwrap();
        let mut raw = vec![0u8; (end - start) * 8];
        f.read_exact(&mut raw).unwrap();
        raw.chunks_exact(8).filter(|e| e[7] & 0x80 != 0).count()
    }

    fn dense_words(b: &Bitmap) -> &[u64] {
        match &b.words {
            Words::Dense { words, .. } => words,
            Words::Sparse(_) => panic!("a sparse table"),
        }
    }

    /// A 4 TiB volume's table made dense, with few bits set: cloning it and merging it into
    /// another dense one write only the set words, so fresh zeroed pages stay untouched.
    #[test]
    fn walks_of_a_dense_huge_table_touch_only_its_set_words() {
        let bits = 1u64 << 30;
        let set: Vec<u64> = (0..100).map(|i| i * (bits / 100) + 7).collect();
        let mut a = Bitmap::new(bits);
        a.densify();
        for &i in &set {
            a.set(i);
        }
        let few = 2 * set.len(); // a page per set word, with room for the allocator's header
        let b = a.clone();
        let mut c = Bitmap::new(bits);
        c.densify();
        c.union_with(&a);
        for m in [&a, &b, &c] {
            let pages = resident_pages(dense_words(m));
            assert!(pages <= few, "{pages} pages");
            assert_eq!(m.iter_ones().collect::<Vec<_>>(), set);
        }
    }

    #[test]
    fn malformed_sparse_forms_are_refused() {
        let pair = |i: u64, w: u64| [i.to_le_bytes(), w.to_le_bytes()].concat();
        // Descending or repeated indexes, an index past the end, a ragged length.
        assert!(Bitmap::from_sparse(1000, &[pair(3, 1), pair(2, 1)].concat()).is_none());
        assert!(Bitmap::from_sparse(1000, &[pair(3, 1), pair(3, 2)].concat()).is_none());
        assert!(Bitmap::from_sparse(1000, &pair(16, 1)).is_none());
        assert!(Bitmap::from_sparse(1000, &pair(1, 1)[..15]).is_none());
        // Bits past the end are dropped, not counted.
        let b = Bitmap::from_sparse(1000, &pair(15, u64::MAX)).unwrap();
        assert_eq!(b.count(), 1000 - 15 * 64);
        // A sparse file with a flipped bit fails its checksum.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bm");
        let mut big = Bitmap::new(1 << 20);
        big.set(7);
        big.store(&p).unwrap();
        let mut raw = fs::read(&p).unwrap();
        let n = raw.len();
        raw[n - 1] ^= 1;
        fs::write(&p, raw).unwrap();
        assert!(Bitmap::load(&p, 1 << 20).is_err());
    }

    #[test]
    fn load_rejects_corruption_and_wrong_size() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bm");
        let mut b = Bitmap::new(1000);
        b.set(5);
        b.store(&p).unwrap();
        assert!(Bitmap::load(&p, 999).is_err());
        // Stored before the volume grew: loads grown, the new bits clear; only from a size the
        // volume had.
        assert!(Bitmap::load(&p, 5000).is_err());
        assert!(Bitmap::load_grown(&p, 5000, &[999]).is_err());
        let grown = Bitmap::load_grown(&p, 5000, &[700, 1000]).unwrap().unwrap();
        assert_eq!((grown.len(), grown.count()), (5000, 1));
        assert!(grown.get(5) && !grown.get(1000) && grown.next_one(6).is_none());
        let mut raw = fs::read(&p).unwrap();
        let n = raw.len();
        raw[n - 1] ^= 1;
        fs::write(&p, raw).unwrap();
        assert!(Bitmap::load(&p, 1000).is_err());
        assert!(Bitmap::load(&dir.path().join("none"), 1000)
            .unwrap()
            .is_none());
        assert!(Bitmap::from_bytes(1000, &[0u8; 3]).is_none());
    }
}
