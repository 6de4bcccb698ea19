//! Data that tests write and compare.

use std::{os::unix::fs::FileExt, path::Path};

/// The engine's block size.
pub const BLOCK: u64 = 4096;

/// Deterministic pseudo-random bytes (xorshift, a word at a time), so content can be regenerated to
/// compare; different seeds give different bytes.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// `len` bytes at `offset` of a file.
pub fn file_bytes(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let f =
        std::fs::File::open(path).unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
    let mut b = vec![0u8; len];
    f.read_exact_at(&mut b, offset).unwrap_or_else(|e| {
        panic!(
            "cannot read {len} bytes at {offset} of {}: {e}",
            path.display()
        )
    });
    b
}

/// Whether block `block` of a file is all `byte`.
pub fn file_block_is(path: &Path, block: u64, byte: u8) -> bool {
    file_bytes(path, block * BLOCK, BLOCK as usize)
        .iter()
        .all(|b| *b == byte)
}

#[cfg(test)]
mod tests {
    use super::pattern;

    #[test]
    fn pattern_is_deterministic_of_any_length_and_differs_by_seed() {
        assert_eq!(pattern(7, 4096), pattern(7, 4096));
        assert_eq!(pattern(7, 13), pattern(7, 4096)[..13]);
        assert_ne!(pattern(7, 4096), pattern(8, 4096));
        assert!(pattern(0, 4096).iter().any(|b| *b != 0));
    }
}
