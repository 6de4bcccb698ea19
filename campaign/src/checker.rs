//! The checker: every 512-byte sector is a register. A read of a sector must return a value that
//! was not yet superseded when the read began, from a write invoked before the read completed:
//! - the value of write W is allowed iff W.inv < R.comp and no write W2 of that sector was
//!   acknowledged before R began while starting after W was acknowledged (W2.inv > W.comp,
//!   W2.comp < R.inv); an unacknowledged W (error or cut connection) is never superseded;
//! - zeros are allowed iff no write was acknowledged before R began (the initial content) or
//!   some TRIM / WRITE_ZEROES of the sector qualifies by the same rule;
//! - a torn sector (neither zeros nor an intact stamp) is allowed only while a write or zeroing of
//!   that sector was in flight during the read (invoked before the read completed, not acknowledged
//!   before it began): like a disk's, the engine's reads do not wait for overlapping writes, so a
//!   read racing one may see part of it (the page cache copies bytes, not sectors);
//! - anything else (a stamp of another sector or of no write) is a violation.
//!
//! The check is one sweep over the history in time order, keeping per sector
//! `newest[s]` = the latest invoke time of a write acknowledged so far (which supersedes every
//! write acknowledged before it started), and `zero_until[s]` = the latest acknowledgement of a
//! zeroing op invoked so far (`u64::MAX` if indeterminate).
//!
//! A forced promotion (`Loss`) may drop acknowledged writes the old primary held alone, up to the
//! number of blocks it reported: a superseded value seen after the old primary went down, where
//! the superseding write was acknowledged before the promotion, counts as a *reported loss* as
//! long as all such values of that promotion fall in at most `lost_blocks` distinct 4 KiB blocks;
//! beyond that, each of them is a violation.

use std::collections::HashMap;

use crate::history::{ms, Kind, Op, Time};
use crate::stamp::Val;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum What {
    /// A read during the run returned a superseded value.
    StaleRead,
    /// The final read returned a superseded value: an acknowledged write is gone; `flushed`
    /// when a FUA or a later acknowledged FLUSH covered it.
    LostWrite { flushed: bool },
    /// A read returned a write invoked only after the read completed.
    FromTheFuture,
    /// A stamp of another sector, or of an id that is no write.
    Misplaced,
    /// Neither zeros nor an intact stamp.
    Torn,
}

#[derive(Debug, Clone)]
pub struct Violation {
    pub what: What,
    /// Index of the read in the history.
    pub read: usize,
    /// First sector of the offending run.
    pub sector: u64,
    /// Number of consecutive sectors of that read with the same fault.
    pub sectors: u64,
    pub seen: Val,
    /// Invoke time of the acknowledged write that superseded the value, if that is the fault.
    pub newest: Option<Time>,
}

/// A forced promotion over an unreachable old primary, as the campaign saw it.
#[derive(Debug, Clone, Copy)]
pub struct Loss {
    /// When the old primary stopped serving (its node went down).
    pub cut: Time,
    /// When the forced takeover answered.
    pub promoted: Time,
    /// The takeover's reported `lost_blocks`.
    pub lost_blocks: u64,
}

#[derive(Debug, Default)]
pub struct Checked {
    pub reads_checked: u64,
    pub sectors_checked: u64,
    pub final_sectors: u64,
    pub indeterminate: u64,
    pub errors: u64,
    pub violation_count: u64,
    /// Violations by kind (`StaleRead`, `LostWrite { flushed: true }`, ...).
    pub by_kind: std::collections::BTreeMap<String, u64>,
    /// The first violations found (at most `KEEP`).
    pub violations: Vec<Violation>,
    /// Superseded values explained by a forced promotion's reported loss, and their blocks.
    pub reported_losses: u64,
    pub reported_loss_blocks: u64,
    /// Per forced promotion: the distinct blocks whose acknowledged writes it dropped.
    pub loss_blocks: Vec<u64>,
    /// Candidates for a reported loss: (index of the `Loss`, the violation it would be).
    candidates: Vec<(usize, Violation)>,
}

const KEEP: usize = 20;

impl Checked {
    fn flag(&mut self, v: Violation) {
        self.violation_count += 1;
        *self.by_kind.entry(format!("{:?}", v.what)).or_default() += 1;
        if self.violations.len() < KEEP {
            self.violations.push(v);
        }
    }
}

// Event kinds, in the order ties are processed: a tie never helps a value it should not.
const ZERO_INVOKE: u8 = 0;
const READ_INVOKE: u8 = 1;
const WRITE_ACK: u8 = 2;
const READ_COMPLETE: u8 = 3;
const MUTATE_INVOKE: u8 = 4;

/// Checks `ops` over a volume of `sectors` sectors.
pub fn check(ops: &[Op], sectors: u64) -> Checked {
    check_with_losses(ops, sectors, &[])
}

/// Which forced promotion, if any, may explain a superseded value: the earliest one answered
/// after the superseding write was acknowledged, if the read began after its old primary went down.
struct Losses<'a> {
    losses: &'a [Loss],
    /// Invoke time -> acknowledgement time of every acknowledged mutating op.
    ack_of: HashMap<Time, Time>,
}

impl Losses<'_> {
    fn explains(&self, ops: &[Op], v: &Violation) -> Option<usize> {
        if !matches!(v.what, What::StaleRead | What::LostWrite { .. }) {
            return None;
        }
        let acked = *self.ack_of.get(&v.newest?)?;
        let k = self.losses.iter().position(|l| acked <= l.promoted)?;
        (ops[v.read].inv >= self.losses[k].cut).then_some(k)
    }
}

/// `check`, with the forced promotions of the run: a loss they reported is no violation.
pub fn check_with_losses(ops: &[Op], sectors: u64, losses: &[Loss]) -> Checked {
    let mut out = Checked::default();
    let mut ack_of: HashMap<Time, Time> = HashMap::new();
    if !losses.is_empty() {
        for o in ops.iter().filter(|o| o.mutates()) {
            if let Some(c) = o.acked() {
                let e = ack_of.entry(o.inv).or_insert(c);
                *e = (*e).max(c);
            }
        }
    }
    let lx = Losses { losses, ack_of };
    let flag = |out: &mut Checked, v: Violation| match lx.explains(ops, &v) {
        Some(k) => out.candidates.push((k, v)),
        None => out.flag(v),
    };
    let by_id: HashMap<u64, usize> = ops.iter().enumerate().map(|(i, o)| (o.id, i)).collect();
    let last_flush = ops
        .iter()
        .filter(|o| o.kind == Kind::Flush)
        .filter_map(|o| o.acked().map(|_| o.inv))
        .max()
        .unwrap_or(0);
    let mut ev: Vec<(Time, u8, usize)> = Vec::new();
    for (i, o) in ops.iter().enumerate() {
        if o.acked().is_none() {
            out.indeterminate += u64::from(o.mutates());
            out.errors += u64::from(matches!(o.outcome, crate::history::Outcome::Err(_)));
        }
        if o.mutates() {
            ev.push((o.inv, MUTATE_INVOKE, i));
            if let Some(c) = o.acked() {
                ev.push((c, WRITE_ACK, i));
            }
            if o.zeroes() {
                ev.push((o.inv, ZERO_INVOKE, i));
            }
        }
        if o.kind == Kind::Read && o.acked().is_some() {
            ev.push((o.inv, READ_INVOKE, i));
            ev.push((o.comp, READ_COMPLETE, i));
        }
    }
    ev.sort_unstable();
    let n = sectors as usize;
    let mut newest = vec![0u64; n];
    let mut zero_until = vec![0u64; n];
    // Per sector, the latest acknowledgement of a write or zeroing invoked so far (MAX: never).
    let mut busy_until = vec![0u64; n];
    // Torn runs of in-flight reads, judged at their completion: (start, len).
    let mut torn: HashMap<usize, Vec<(u64, u64)>> = HashMap::new();
    // Zero sectors of in-flight reads that need a zeroing op: (sector, newest at invoke).
    let mut waiting: HashMap<usize, Vec<(u64, Time)>> = HashMap::new();
    let range = |o: &Op| {
        let a = (o.sector as usize).min(n);
        a..(a + o.sectors as usize).min(n)
    };
    for (_, kind, i) in ev {
        let o = &ops[i];
        match kind {
            ZERO_INVOKE => {
                let until = o.acked().unwrap_or(u64::MAX);
                for z in &mut zero_until[range(o)] {
                    *z = (*z).max(until);
                }
            }
            MUTATE_INVOKE => {
                let until = o.acked().unwrap_or(u64::MAX);
                for b in &mut busy_until[range(o)] {
                    *b = (*b).max(until);
                }
            }
            WRITE_ACK => {
                for t in &mut newest[range(o)] {
                    *t = (*t).max(o.inv);
                }
            }
            READ_INVOKE => {
                out.reads_checked += 1;
                let stale = if o.final_read {
                    None
                } else {
                    Some(What::StaleRead)
                };
                let mut need_zero = Vec::new();
                for run in &o.seen {
                    out.sectors_checked += run.len;
                    if o.final_read {
                        out.final_sectors += run.len;
                    }
                    let span = run.start..(run.start + run.len).min(sectors);
                    let v = |what, sector, len, newest| Violation {
                        what,
                        read: i,
                        sector,
                        sectors: len,
                        seen: run.val,
                        newest,
                    };
                    match run.val {
                        Val::Zero => {
                            for s in span {
                                let t = newest[s as usize];
                                if t != 0 {
                                    need_zero.push((s, t));
                                }
                            }
                        }
                        Val::Write(id) => {
                            let w = match by_id.get(&id) {
                                Some(&w) if ops[w].kind == Kind::Write => &ops[w],
                                _ => {
                                    out.flag(v(What::Misplaced, run.start, run.len, None));
                                    continue;
                                }
                            };
                            if !(w.covers(run.start) && w.covers(run.start + run.len - 1)) {
                                out.flag(v(What::Misplaced, run.start, run.len, None));
                                continue;
                            }
                            if w.inv >= o.comp {
                                out.flag(v(What::FromTheFuture, run.start, run.len, None));
                                continue;
                            }
                            let done = w.acked().unwrap_or(u64::MAX);
                            let what = stale.unwrap_or(What::LostWrite {
                                flushed: false, // refined below from the superseding write
                            });
                            let mut bad: Option<(u64, u64, Time)> = None;
                            for s in span {
                                let t = newest[s as usize];
                                if t != 0 && done < t {
                                    match &mut bad {
                                        Some((_, len, _)) => *len += 1,
                                        None => bad = Some((s, 1, t)),
                                    }
                                }
                            }
                            if let Some((s, len, t)) = bad {
                                flag(&mut out, v(what, s, len, Some(t)));
                            }
                        }
                        Val::Misplaced { .. } => {
                            out.flag(v(What::Misplaced, run.start, run.len, None))
                        }
                        Val::Torn { .. } => torn.entry(i).or_default().push((run.start, run.len)),
                    }
                }
                if !need_zero.is_empty() {
                    waiting.insert(i, need_zero);
                }
            }
            READ_COMPLETE => {
                for (start, len) in torn.remove(&i).unwrap_or_default() {
                    let end = (start + len).min(sectors);
                    if (start..end).any(|s| busy_until[s as usize] <= o.inv) {
                        let seen = o
                            .seen
                            .iter()
                            .find(|r| r.start == start)
                            .map_or(Val::Zero, |r| r.val);
                        out.flag(Violation {
                            what: What::Torn,
                            read: i,
                            sector: start,
                            sectors: len,
                            seen,
                            newest: None,
                        });
                    }
                }
                let Some(need) = waiting.remove(&i) else {
                    continue;
                };
                let mut bad: Option<(u64, u64, Time)> = None;
                let flush_bad = |out: &mut Checked, bad: &mut Option<(u64, u64, Time)>| {
                    if let Some((s, len, t)) = bad.take() {
                        let what = if o.final_read {
                            What::LostWrite { flushed: false }
                        } else {
                            What::StaleRead
                        };
                        flag(
                            out,
                            Violation {
                                what,
                                read: i,
                                sector: s,
                                sectors: len,
                                seen: Val::Zero,
                                newest: Some(t),
                            },
                        );
                    }
                };
                for (s, t) in need {
                    if zero_until[s as usize] >= t {
                        continue;
                    }
                    match &mut bad {
                        Some((b, len, _)) if *b + *len == s => *len += 1,
                        _ => {
                            flush_bad(&mut out, &mut bad);
                            bad = Some((s, 1, t));
                        }
                    }
                }
                flush_bad(&mut out, &mut bad);
            }
            _ => {}
        }
    }
    // A forced promotion may drop what it reported, no more.
    for (k, l) in losses.iter().enumerate() {
        let mine: Vec<Violation> = out
            .candidates
            .iter()
            .filter(|(c, _)| *c == k)
            .map(|(_, v)| v.clone())
            .collect();
        let blocks: std::collections::BTreeSet<u64> = mine
            .iter()
            .flat_map(|v| v.sector / 8..=(v.sector + v.sectors - 1) / 8)
            .collect();
        out.loss_blocks.push(blocks.len() as u64);
        if blocks.len() as u64 <= l.lost_blocks {
            out.reported_losses += mine.len() as u64;
            out.reported_loss_blocks += blocks.len() as u64;
        } else {
            *out.by_kind.entry("UnreportedLoss".into()).or_default() += mine.len() as u64;
            for (n, v) in mine.into_iter().enumerate() {
                if n == 0 {
                    // Shown first: the kept list may be full of the sweep's findings already.
                    out.violations.insert(0, v.clone());
                    out.violations.truncate(KEEP);
                    out.violation_count += 1;
                    *out.by_kind.entry(format!("{:?}", v.what)).or_default() += 1;
                } else {
                    out.flag(v);
                }
            }
        }
    }
    out.candidates.clear();
    // A lost write is "flushed" when the write that should have been read was made durable.
    for v in &mut out.violations {
        if let (What::LostWrite { flushed }, Some(t)) = (&mut v.what, v.newest) {
            *flushed = superseding(ops, v.sector, t)
                .is_some_and(|w| w.fua || w.acked().is_some_and(|c| last_flush > c));
        }
    }
    out
}

/// An old primary cut off from its peer that the witness stopped granting (the partition
/// campaign's blackhole + forced round), as the campaign saw it.
#[derive(Debug, Clone, Copy)]
pub struct Fence {
    /// The engine (0: A, 1: B).
    pub engine: usize,
    /// When its link was cut: the last renewal by its peer was stamped before.
    pub cut: Time,
    /// When the last grant by the witness that may have reached it ended (0: none): that grant
    /// was stamped before.
    pub granted: Time,
    /// Its lease, nanoseconds.
    pub lease: Time,
    /// When the link was healed: acknowledgements after it are not this fence's (a later round
    /// may make the engine primary again, legitimately).
    pub until: Time,
    /// When the campaign stopped sending to it, and the earliest time the other engine may have
    /// been promoted, if it was.
    pub unpinned: Time,
    pub promotable: Option<Time>,
}

impl Fence {
    /// The latest its lease could have run: from the latest renewal it could have had.
    pub fn lease_end(&self) -> Time {
        self.cut.max(self.granted) + self.lease
    }
}

/// An acknowledgement by a fenced old primary later than its lease allows.
#[derive(Debug, Clone, Copy)]
pub struct LateAck {
    /// Index of the op in the history.
    pub op: usize,
    /// Index of the fence.
    pub fence: usize,
    /// Nanoseconds past the lease's latest end (> the slack).
    pub late: i64,
}

#[derive(Debug, Default)]
pub struct LeaseChecked {
    /// Writes, zeroings, trims and flushes the fenced engines acknowledged after their cut.
    pub acks_after_cut: u64,
    /// The latest of them, nanoseconds after its cut.
    pub after_cut_max: Time,
    /// The largest (ack time - latest lease end) seen, nanoseconds: negative when every ack came
    /// that much before the lease could have run out. None: no ack after a cut.
    pub margin_max: Option<i64>,
    /// Acknowledgements later than the lease + `slack`: the violation kind `AckAfterLease`.
    pub late: Vec<LateAck>,
}

/// Checks that no fenced old primary acknowledged a change or a flush after its lease ran out:
/// every such acknowledgement after its cut must be received before `Fence::lease_end` + `slack`
/// (the slack covers the reply's way from the engine's lease check to the client).
pub fn check_leases(ops: &[Op], fences: &[Fence], slack: Time) -> LeaseChecked {
    let mut out = LeaseChecked::default();
    for (k, f) in fences.iter().enumerate() {
        let end = f.lease_end();
        for (i, o) in ops.iter().enumerate() {
            let Some(acked) = o.acked() else { continue };
            let counts = o.mutates() || o.kind == Kind::Flush;
            if !counts || o.engine != f.engine || acked <= f.cut || acked > f.until {
                continue;
            }
            out.acks_after_cut += 1;
            out.after_cut_max = out.after_cut_max.max(acked - f.cut);
            let margin = acked as i64 - end as i64;
            out.margin_max = Some(out.margin_max.map_or(margin, |m| m.max(margin)));
            if margin > slack as i64 {
                out.late.push(LateAck {
                    op: i,
                    fence: k,
                    late: margin,
                });
            }
        }
    }
    out
}

/// A human account of a late acknowledgement.
pub fn explain_late(ops: &[Op], fences: &[Fence], l: &LateAck) -> String {
    let f = &fences[l.fence];
    format!(
        "AckAfterLease: {} acknowledged by engine {} {:.1} ms after its lease could have run out \
         (cut {}, last witness grant ended {}, lease {})",
        describe_op(&ops[l.op]),
        ["A", "B"].get(f.engine).copied().unwrap_or("?"),
        l.late as f64 / 1e6,
        ms(f.cut),
        if f.granted == 0 {
            "never".to_string()
        } else {
            ms(f.granted)
        },
        ms(f.lease)
    )
}

/// The acknowledged write of `sector` invoked at `inv` (the one a stale value missed).
fn superseding(ops: &[Op], sector: u64, inv: Time) -> Option<&Op> {
    ops.iter()
        .find(|w| w.mutates() && w.covers(sector) && w.inv == inv && w.acked().is_some())
}

fn describe_op(o: &Op) -> String {
    let end = match o.outcome {
        crate::history::Outcome::Ok => format!("acked {}", ms(o.comp)),
        crate::history::Outcome::Err(e) => format!("errno {e} at {}", ms(o.comp)),
        crate::history::Outcome::Lost => "cut (indeterminate)".to_string(),
    };
    format!(
        "#{} {}{} client {} sectors {}..{} invoked {} {}",
        o.id,
        o.kind.name(),
        if o.fua { "+FUA" } else { "" },
        o.client,
        o.sector,
        o.sector + o.sectors,
        ms(o.inv),
        end
    )
}

/// A human account of one violation: the read, the value, and the candidate writes.
pub fn explain(ops: &[Op], v: &Violation) -> String {
    let r = &ops[v.read];
    let mut s = format!(
        "{:?}: block {} sector {} (+{} sectors) seen {:?}\n  read: {}{}\n",
        v.what,
        v.sector * 512 / 4096,
        v.sector,
        v.sectors - 1,
        v.seen,
        describe_op(r),
        if r.final_read { " (final read)" } else { "" }
    );
    if let Val::Write(id) | Val::Misplaced { id, .. } = v.seen {
        if let Some(w) = ops.iter().find(|o| o.id == id) {
            s += &format!("  value from: {}\n", describe_op(w));
        }
    }
    if let Some(w) = v.newest.and_then(|t| superseding(ops, v.sector, t)) {
        s += &format!("  superseded by: {}\n", describe_op(w));
    }
    let mut cands: Vec<&Op> = ops
        .iter()
        .filter(|w| w.mutates() && w.covers(v.sector) && w.inv < r.comp)
        .collect();
    cands.sort_by_key(|w| w.inv);
    let skip = cands.len().saturating_sub(8);
    s += &format!(
        "  writes of that sector invoked before the read completed (last {}):\n",
        cands.len() - skip
    );
    for w in &cands[skip..] {
        s += &format!("    {}\n", describe_op(w));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::Outcome;
    use crate::stamp::Run;

    const N: u64 = 64;

    struct H(Vec<Op>);

    impl H {
        fn op(
            &mut self,
            kind: Kind,
            sector: u64,
            sectors: u64,
            inv: u64,
            comp: Option<u64>,
        ) -> u64 {
            let id = self.0.len() as u64 + 1;
            let mut o = Op::new(id, 0, kind, sector, sectors, inv);
            if let Some(c) = comp {
                o.comp = c;
                o.outcome = Outcome::Ok;
            }
            self.0.push(o);
            id
        }
        fn w(&mut self, sector: u64, sectors: u64, inv: u64, comp: Option<u64>) -> u64 {
            self.op(Kind::Write, sector, sectors, inv, comp)
        }
        fn r(&mut self, inv: u64, comp: u64, seen: &[(u64, u64, Val)]) {
            let (first, last) = (seen[0].0, seen[seen.len() - 1]);
            let id = self.op(Kind::Read, first, last.0 + last.1 - first, inv, Some(comp));
            let o = self.0.iter_mut().find(|o| o.id == id).unwrap();
            o.seen = seen
                .iter()
                .map(|&(start, len, val)| Run { start, len, val })
                .collect();
        }
        fn final_read(&mut self, inv: u64, seen: &[(u64, u64, Val)]) {
            self.r(inv, inv + 1, seen);
            self.0.last_mut().unwrap().final_read = true;
        }
        fn check(&self) -> Checked {
            check(&self.0, N)
        }
        fn check_losses(&self, losses: &[Loss]) -> Checked {
            check_with_losses(&self.0, N, losses)
        }
    }

    fn whats(c: &Checked) -> Vec<What> {
        c.violations.iter().map(|v| v.what).collect()
    }

    #[test]
    fn legal_histories_pass() {
        let mut h = H(Vec::new());
        // Initial zeros.
        h.r(1, 2, &[(0, 8, Val::Zero)]);
        let w1 = h.w(0, 8, 10, Some(20));
        h.r(21, 22, &[(0, 8, Val::Write(w1))]);
        // A read concurrent with w2 may see either.
        let w2 = h.w(0, 8, 30, Some(40));
        h.r(31, 35, &[(0, 8, Val::Write(w1))]);
        h.r(32, 36, &[(0, 8, Val::Write(w2))]);
        // A read that began before w2's ack and ends after: either.
        h.r(39, 45, &[(0, 8, Val::Write(w1))]);
        // An unaligned write of two sectors in the middle.
        let w3 = h.w(2, 2, 50, Some(60));
        h.r(
            61,
            62,
            &[
                (0, 2, Val::Write(w2)),
                (2, 2, Val::Write(w3)),
                (4, 4, Val::Write(w2)),
            ],
        );
        // A cut write may show up at any time later, and the older value may still be seen.
        let w4 = h.w(8, 8, 70, None);
        h.r(80, 81, &[(8, 8, Val::Zero)]);
        h.r(90, 91, &[(8, 8, Val::Write(w4))]);
        h.r(92, 93, &[(8, 8, Val::Zero)]);
        // A trim, then zeros; a concurrent trim may also explain zeros.
        h.op(Kind::Trim, 0, 4, 100, Some(110));
        h.r(111, 112, &[(0, 4, Val::Zero), (4, 4, Val::Write(w2))]);
        let w5 = h.w(4, 4, 120, Some(130));
        h.op(Kind::Zero, 4, 4, 135, Some(150));
        h.r(131, 140, &[(4, 4, Val::Zero)]);
        h.r(131, 141, &[(4, 4, Val::Write(w5))]);
        // The final read sees the last acknowledged values.
        h.final_read(1000, &[(0, 8, Val::Zero), (8, 8, Val::Write(w4))]);
        let c = h.check();
        assert_eq!(c.violation_count, 0, "{:?}", c.violations);
        assert_eq!(c.reads_checked, 13);
        assert_eq!(c.final_sectors, 16);
        assert_eq!(c.indeterminate, 1);
    }

    #[test]
    fn stale_read_is_flagged() {
        let mut h = H(Vec::new());
        let w1 = h.w(0, 8, 10, Some(20));
        let _w2 = h.w(0, 8, 21, Some(30));
        h.r(31, 32, &[(0, 8, Val::Write(w1))]);
        let c = h.check();
        assert_eq!(whats(&c), vec![What::StaleRead]);
        assert_eq!(c.violations[0].sector, 0);
        assert_eq!(c.violations[0].sectors, 8);
        assert!(explain(&h.0, &c.violations[0]).contains("superseded by: #2 WRITE"));
    }

    #[test]
    fn stale_sector_inside_a_block_is_flagged() {
        let mut h = H(Vec::new());
        let w1 = h.w(0, 8, 10, Some(20));
        let _w2 = h.w(3, 1, 21, Some(30));
        h.r(31, 32, &[(0, 8, Val::Write(w1))]);
        let c = h.check();
        assert_eq!(whats(&c), vec![What::StaleRead]);
        assert_eq!((c.violations[0].sector, c.violations[0].sectors), (3, 1));
    }

    #[test]
    fn zeros_after_an_acknowledged_write_are_stale_unless_a_trim_explains_them() {
        let mut h = H(Vec::new());
        h.op(Kind::Trim, 0, 8, 1, Some(5));
        let _w = h.w(0, 8, 10, Some(20));
        h.r(31, 32, &[(0, 8, Val::Zero)]);
        assert_eq!(whats(&h.check()), vec![What::StaleRead]);
        // A trim concurrent with the read explains them.
        h.op(Kind::Trim, 0, 8, 31, None);
        assert_eq!(h.check().violation_count, 0);
    }

    #[test]
    fn lost_flushed_write_is_flagged() {
        let mut h = H(Vec::new());
        let w1 = h.w(0, 8, 10, Some(20));
        let _w2 = h.w(0, 8, 30, Some(40));
        h.op(Kind::Flush, 0, 0, 41, Some(50));
        h.final_read(100, &[(0, 8, Val::Write(w1))]);
        assert_eq!(whats(&h.check()), vec![What::LostWrite { flushed: true }]);
        // Back to zeros is just as lost.
        let mut h = H(Vec::new());
        h.w(8, 8, 10, Some(20));
        h.op(Kind::Flush, 0, 0, 21, Some(22));
        h.final_read(100, &[(8, 8, Val::Zero)]);
        assert_eq!(whats(&h.check()), vec![What::LostWrite { flushed: true }]);
        // Unflushed, it is still lost (a SIGKILL is no power loss), and said so.
        let mut h = H(Vec::new());
        h.w(8, 8, 10, Some(20));
        h.final_read(100, &[(8, 8, Val::Zero)]);
        assert_eq!(whats(&h.check()), vec![What::LostWrite { flushed: false }]);
    }

    #[test]
    fn torn_misplaced_and_future_values_are_flagged() {
        let mut h = H(Vec::new());
        let w1 = h.w(0, 8, 10, Some(20));
        h.r(
            21,
            22,
            &[
                (0, 3, Val::Write(w1)),
                (3, 1, Val::Torn { word0: 1, word1: 2 }),
                (4, 4, Val::Write(w1)),
            ],
        );
        h.r(23, 24, &[(8, 8, Val::Write(w1))]);
        h.r(25, 26, &[(0, 1, Val::Misplaced { id: w1, from: 9 })]);
        let w2 = h.w(16, 8, 50, Some(60));
        h.r(30, 40, &[(16, 8, Val::Write(w2))]);
        let c = h.check();
        assert_eq!(
            whats(&c),
            vec![
                What::Torn,
                What::Misplaced,
                What::Misplaced,
                What::FromTheFuture
            ]
        );
    }

    /// A read racing a write of the same sector may see part of it; a read with no write of
    /// that sector in flight may not.
    #[test]
    fn a_torn_sector_is_allowed_only_under_a_concurrent_write() {
        let mut h = H(Vec::new());
        let w1 = h.w(0, 8, 10, Some(20));
        // In flight while the read runs (21..25), acknowledged at 30.
        let w2 = h.w(0, 1, 22, Some(30));
        h.r(
            21,
            25,
            &[
                (0, 1, Val::Torn { word0: 1, word1: 2 }),
                (1, 7, Val::Write(w1)),
            ],
        );
        // Sector 5 had no write in flight: torn there is a violation.
        h.r(
            31,
            32,
            &[
                (0, 1, Val::Write(w2)),
                (1, 4, Val::Write(w1)),
                (5, 1, Val::Torn { word0: 3, word1: 4 }),
            ],
        );
        assert_eq!(whats(&h.check()), vec![What::Torn]);
        // Nor is an indeterminate write that began after the read completed any excuse.
        let mut h = H(Vec::new());
        h.w(0, 8, 10, Some(20));
        h.r(21, 25, &[(0, 1, Val::Torn { word0: 1, word1: 2 })]);
        h.w(0, 8, 26, None);
        assert_eq!(whats(&h.check()), vec![What::Torn]);
    }

    #[test]
    fn a_fenced_primary_may_not_acknowledge_after_its_lease() {
        let mut h = H(Vec::new());
        let fence = Fence {
            engine: 0,
            cut: 100,
            granted: 0,
            lease: 50,
            until: 1000,
            unpinned: 160,
            promotable: Some(170),
        };
        // Acknowledged by engine 0 before the cut, within the lease, and a read after it.
        h.w(0, 8, 10, Some(90));
        h.w(0, 8, 95, Some(140));
        h.r(150, 200, &[(0, 8, Val::Zero)]);
        h.op(Kind::Flush, 0, 0, 141, Some(149));
        for o in &mut h.0 {
            o.engine = 0;
        }
        // Engine 1 (the new primary) acknowledges whenever it likes.
        let w = h.w(8, 8, 300, Some(400));
        h.0[w as usize - 1].engine = 1;
        let c = check_leases(&h.0, &[fence], 5);
        assert!(c.late.is_empty(), "{:?}", c.late);
        assert_eq!(c.acks_after_cut, 2);
        assert_eq!(c.after_cut_max, 49);
        assert_eq!(c.margin_max, Some(-1));
        // A flush acknowledged 10 past the lease's end is late; so is a trim; an error is not.
        h.op(Kind::Flush, 0, 0, 150, Some(160));
        h.op(Kind::Trim, 0, 8, 150, Some(156));
        h.op(Kind::Write, 0, 8, 150, None);
        h.op(Kind::Write, 0, 8, 150, Some(2000));
        for o in h.0.iter_mut().skip(5) {
            o.engine = 0;
        }
        let c = check_leases(&h.0, &[fence], 5);
        let late: Vec<(usize, i64)> = c.late.iter().map(|l| (l.op, l.late)).collect();
        assert_eq!(late, vec![(5, 10), (6, 6)]);
        assert_eq!(c.margin_max, Some(10));
        assert!(explain_late(&h.0, &[fence], &c.late[0]).contains("AckAfterLease"));
        // A witness grant that ended after the cut extends the bound.
        let granted = Fence {
            granted: 120,
            ..fence
        };
        assert!(check_leases(&h.0, &[granted], 5).late.is_empty());
    }

    #[test]
    fn a_forced_promotion_may_drop_only_what_it_reported() {
        let mut h = H(Vec::new());
        let w1 = h.w(0, 8, 10, Some(20));
        // Acknowledged by the old primary alone, which goes down at 45; promoted at 50.
        let _w2 = h.w(0, 16, 30, Some(40));
        h.r(60, 61, &[(0, 8, Val::Write(w1)), (8, 8, Val::Zero)]);
        h.final_read(100, &[(0, 8, Val::Write(w1)), (8, 8, Val::Zero)]);
        let loss = |n| Loss {
            cut: 45,
            promoted: 50,
            lost_blocks: n,
        };
        // Two reads, each with two stale runs.
        assert_eq!(h.check().violation_count, 4);
        let c = h.check_losses(&[loss(2)]);
        assert_eq!(c.violation_count, 0, "{:?}", c.violations);
        assert_eq!((c.reported_losses, c.reported_loss_blocks), (4, 2));
        // One block reported, two gone: every one of them is a violation.
        let c = h.check_losses(&[loss(1)]);
        assert_eq!(c.violation_count, 4);
        assert_eq!(c.by_kind.get("UnreportedLoss"), Some(&4));
        // A write acknowledged after the promotion is never covered.
        let mut h = H(Vec::new());
        let w1 = h.w(0, 8, 10, Some(20));
        let _w2 = h.w(0, 8, 55, Some(58));
        h.r(60, 61, &[(0, 8, Val::Write(w1))]);
        assert_eq!(h.check_losses(&[loss(100)]).violation_count, 1);
        // Nor a stale read begun before the old primary went down.
        let mut h = H(Vec::new());
        let w1 = h.w(0, 8, 10, Some(20));
        let _w2 = h.w(0, 8, 30, Some(40));
        h.r(42, 61, &[(0, 8, Val::Write(w1))]);
        assert_eq!(h.check_losses(&[loss(100)]).violation_count, 1);
    }
}
