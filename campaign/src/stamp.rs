//! Self-identifying sector contents. Every 512-byte sector a campaign writes carries the id of
//! the write, the sector's own number and a checksum, then filler derived from both; a read
//! decodes each sector back to the write it came from, to zeros, or to garbage (a torn or
//! corrupted sector), and a sector written somewhere else is recognised as misplaced.

use crate::prng::{mix, Rng};

pub const SECTOR: u64 = 512;
const WORDS: usize = (SECTOR / 8) as usize;

/// What one sector read back as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Val {
    /// All zeros: the initial content, a TRIM or a WRITE_ZEROES.
    Zero,
    /// The intact stamp of write `id` for this very sector.
    Write(u64),
    /// An intact stamp of write `id`, but for sector `from`: data landed at the wrong place.
    Misplaced { id: u64, from: u64 },
    /// Neither zeros nor an intact stamp (the first two words as found): torn or corrupt.
    Torn { word0: u64, word1: u64 },
}

/// A run of consecutive sectors that read back as the same value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// Absolute sector number of the first sector.
    pub start: u64,
    pub len: u64,
    pub val: Val,
}

fn check(id: u64, sector: u64) -> u64 {
    mix(id ^ mix(sector))
}

/// The 512 bytes write `id` puts in `sector`.
pub fn sector_bytes(out: &mut [u8], id: u64, sector: u64) {
    let c = check(id, sector);
    let mut words = [0u64; WORDS];
    words[0] = id;
    words[1] = sector;
    words[2] = c;
    let mut r = Rng::new(c);
    for w in words.iter_mut().skip(3) {
        *w = r.next_u64();
    }
    for (chunk, w) in out.chunks_exact_mut(8).zip(words) {
        chunk.copy_from_slice(&w.to_le_bytes());
    }
}

/// The payload of write `id` over `buf.len() / 512` sectors starting at `first`.
pub fn fill(buf: &mut [u8], id: u64, first: u64) {
    for (i, s) in buf.chunks_exact_mut(SECTOR as usize).enumerate() {
        sector_bytes(s, id, first + i as u64);
    }
}

fn word(b: &[u8], i: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[i * 8..i * 8 + 8]);
    u64::from_le_bytes(a)
}

/// Decodes one sector read at `sector`.
pub fn decode_sector(b: &[u8], sector: u64) -> Val {
    if b.iter().all(|x| *x == 0) {
        return Val::Zero;
    }
    let (id, from) = (word(b, 0), word(b, 1));
    let torn = Val::Torn {
        word0: id,
        word1: from,
    };
    if word(b, 2) != check(id, from) {
        return torn;
    }
    let mut want = [0u8; SECTOR as usize];
    sector_bytes(&mut want, id, from);
    if want[..] != b[..SECTOR as usize] {
        return torn;
    }
    if from == sector {
        Val::Write(id)
    } else {
        Val::Misplaced { id, from }
    }
}

/// Decodes a read of `buf.len() / 512` sectors starting at `first` into runs.
pub fn decode(buf: &[u8], first: u64) -> Vec<Run> {
    let mut runs: Vec<Run> = Vec::new();
    for (i, s) in buf.chunks_exact(SECTOR as usize).enumerate() {
        let sector = first + i as u64;
        let val = decode_sector(s, sector);
        match runs.last_mut() {
            Some(r) if r.val == val && matches!(val, Val::Zero | Val::Write(_)) => r.len += 1,
            _ => runs.push(Run {
                start: sector,
                len: 1,
                val,
            }),
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_zero_torn_and_misplaced() {
        let mut b = vec![0u8; 8 * 512];
        fill(&mut b[512..4096], 7, 101);
        let runs = decode(&b, 100);
        assert_eq!(
            runs,
            vec![
                Run {
                    start: 100,
                    len: 1,
                    val: Val::Zero
                },
                Run {
                    start: 101,
                    len: 7,
                    val: Val::Write(7)
                },
            ]
        );
        // A sector half old, half new is torn.
        let mut old = vec![0u8; 512];
        sector_bytes(&mut old, 3, 101);
        b[512 + 256..1024].copy_from_slice(&old[256..]);
        assert!(matches!(decode(&b, 100)[1].val, Val::Torn { word0: 7, .. }));
        // A stamp read at the wrong place is misplaced.
        assert_eq!(
            decode(&b[1024..1536], 50)[0].val,
            Val::Misplaced { id: 7, from: 102 }
        );
    }
}
