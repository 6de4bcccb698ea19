//! The replication journal: write records in sequence order, the unit of forward replication
//! (claim 7: oldest to newest). Bounded by bytes; on overflow it is emptied and the caller falls
//! back to a table-driven resync, because every unacknowledged block is also in the differential table.

use std::collections::VecDeque;

use bytes::Bytes;

/// One host write, as replicated. `data` is empty for a zeroing write of `zero_len` bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub seq: u64,
    pub epoch: u64,
    pub timestamp_us: u64,
    pub offset: u64,
    pub data: Bytes,
    pub zero_len: u64,
}

impl Record {
    pub fn len(&self) -> u64 {
        if self.data.is_empty() {
            self.zero_len
        } else {
            self.data.len() as u64
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes this record costs in the journal and on the wire.
    pub fn cost(&self) -> u64 {
        self.data.len() as u64 + 64
    }
}

/// Result of appending to a full journal.
#[derive(Debug, PartialEq, Eq)]
pub enum Append {
    Kept,
    /// The journal overflowed and was emptied: the replica must be resynced from the table.
    Overflowed,
}

#[derive(Debug)]
pub struct Journal {
    records: VecDeque<Record>,
    bytes: u64,
    capacity: u64,
    /// The journal holds every record with seq >= `from` (that is at most `next` - 1).
    from: u64,
    next: u64,
}

impl Journal {
    /// An empty journal whose next record gets `next_seq`.
    pub fn new(capacity: u64, next_seq: u64) -> Self {
        Self {
            records: VecDeque::new(),
            bytes: 0,
            capacity,
            from: next_seq,
            next: next_seq,
        }
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Held records fill a quarter of the capacity: the peer should make them durable soon, so
    /// the journal can trim before it overflows.
    pub fn filling(&self) -> bool {
        self.bytes.saturating_mul(4) >= self.capacity
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// The seq the next appended record must carry.
    pub fn next_seq(&self) -> u64 {
        self.next
    }

    /// The highest seq ever appended (0 if none).
    pub fn last_seq(&self) -> u64 {
        self.next - 1
    }

    /// Appends a record whose seq is `next_seq()`.
    pub fn append(&mut self, r: Record) -> Append {
        debug_assert_eq!(r.seq, self.next);
        self.next = r.seq + 1;
        if self.bytes + r.cost() > self.capacity {
            self.reset();
            return Append::Overflowed;
        }
        self.bytes += r.cost();
        self.records.push_back(r);
        Append::Kept
    }

    /// Drops every record; the journal restarts at the next seq.
    pub fn reset(&mut self) {
        self.records.clear();
        self.bytes = 0;
        self.from = self.next;
    }

    /// Whether every record from `seq` on is still here (so replication can resume at `seq`).
    pub fn covers(&self, seq: u64) -> bool {
        seq >= self.from && seq <= self.next
    }

    /// Skips the numbering forward (a restarted primary learns the peer saw higher seqs).
    pub fn bump_to(&mut self, next: u64) {
        if next > self.next {
            self.reset();
            self.next = next;
            self.from = next;
        }
    }

    /// Up to `max_bytes` of records starting at `seq` (at least one if any).
    pub fn read_from(&self, seq: u64, max_bytes: u64) -> Vec<Record> {
        let Some(front) = self.records.front() else {
            return Vec::new();
        };
        let skip = seq.saturating_sub(front.seq) as usize;
        let mut out = Vec::new();
        let mut bytes = 0;
        for r in self.records.iter().skip(skip) {
            if !out.is_empty() && bytes + r.cost() > max_bytes {
                break;
            }
            bytes += r.cost();
            out.push(r.clone());
        }
        out
    }

    /// Records from `seq` on, borrowed (no copies on the acknowledgement path).
    pub fn iter_from(&self, seq: u64) -> impl Iterator<Item = &Record> + '_ {
        let skip = self
            .records
            .front()
            .map_or(0, |f| seq.saturating_sub(f.seq) as usize);
        self.records.iter().skip(skip)
    }

    /// Timestamp of the oldest record still held (not yet acknowledged).
    pub fn oldest_timestamp_us(&self) -> Option<u64> {
        self.records.front().map(|r| r.timestamp_us)
    }

    /// Forgets records the peer acknowledged (seq <= `acked`).
    pub fn trim(&mut self, acked: u64) {
        while let Some(r) = self.records.front() {
            if r.seq > acked {
                break;
            }
            self.bytes -= r.cost();
            self.records.pop_front();
        }
        self.from = self.from.max((acked + 1).min(self.next));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rec(seq: u64, n: usize) -> Record {
        Record {
            seq,
            epoch: 1,
            timestamp_us: seq * 10,
            offset: seq * 4096,
            data: Bytes::from(vec![seq as u8; n]),
            zero_len: 0,
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Append(usize),
        Trim(u64),
        Read(u64),
    }

    proptest! {
        /// The journal returns exactly the records after a cursor, in order, while it covers the cursor;
        /// after an overflow it stops covering anything older.
        #[test]
        fn ordered_and_bounded(ops in proptest::collection::vec(prop_oneof![
            (1usize..3000).prop_map(Op::Append),
            (0u64..60).prop_map(Op::Trim),
            (0u64..60).prop_map(Op::Read),
        ], 1..80)) {
            let mut j = Journal::new(16 * 1024, 1);
            let mut all: Vec<Record> = Vec::new();
            let mut trimmed = 0u64;
            for op in ops {
                match op {
                    Op::Append(n) => {
                        let r = rec(j.next_seq(), n);
                        all.push(r.clone());
                        j.append(r);
                        prop_assert!(j.bytes() <= 16 * 1024);
                    }
                    Op::Trim(a) => { j.trim(a); trimmed = trimmed.max(a); }
                    Op::Read(s) => {
                        if j.covers(s) {
                            let got = j.read_from(s, u64::MAX);
                            let want: Vec<_> = all.iter().filter(|r| r.seq >= s).cloned().collect();
                            prop_assert_eq!(got, want);
                        }
                    }
                }
                prop_assert_eq!(j.last_seq(), all.len() as u64);
            }
        }
    }

    #[test]
    fn overflow_resets_and_reports() {
        let mut j = Journal::new(10_000, 1);
        assert_eq!(j.append(rec(1, 4000)), Append::Kept);
        assert_eq!(j.append(rec(2, 4000)), Append::Kept);
        assert!(j.covers(1));
        assert_eq!(j.append(rec(3, 4000)), Append::Overflowed);
        assert!(j.is_empty());
        assert!(!j.covers(2));
        assert!(j.covers(4));
        assert_eq!(j.next_seq(), 4);
        assert_eq!(j.read_from(1, 1).len(), 0);
        j.append(rec(4, 10));
        j.append(rec(5, 10));
        assert_eq!(
            j.read_from(4, 1).len(),
            1,
            "at least one record even over budget"
        );
        j.trim(4);
        assert!(!j.covers(4) && j.covers(5));
        j.bump_to(100);
        assert_eq!(j.next_seq(), 100);
        assert!(j.is_empty() && !j.covers(5));
    }
}
