//! The volume's block geometry: the unit of every table, of proxied reads and of drained images.
//! A leaf module: everything that counts in blocks imports it, it imports nothing.

/// Tracking block: the unit of the differential table and of proxied reads.
pub const BLOCK_SIZE: u32 = 4096;
/// `BLOCK_SIZE` as the type offsets are counted in.
pub const BS: u64 = BLOCK_SIZE as u64;

/// Number of whole blocks in `bytes` (a volume's size is a multiple of the block).
pub fn blocks_in(bytes: u64) -> u64 {
    bytes / BS
}

/// The blocks a byte range touches, as `first..end` (empty for an empty range).
pub fn blocks_of(offset: u64, len: u64) -> std::ops::Range<u64> {
    if len == 0 {
        return offset / BS..offset / BS;
    }
    offset / BS..(offset + len).div_ceil(BS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_range_covers_every_block_it_touches() {
        assert_eq!(blocks_of(0, 4096), 0..1);
        assert_eq!(blocks_of(4095, 2), 0..2);
        assert_eq!(blocks_of(8192, 0), 2..2);
        assert_eq!(blocks_in(3 * BS + 7), 3);
    }
}
